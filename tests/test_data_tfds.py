"""TFDS data sets through tfds.data_source, offline, with tfds.testing.mock_data.

Two kinds of mock:

* the stock one (``MockPolicy.USE_CODE``): random examples generated from the builders' real
  feature specs (mnist 28x28x1, celeb_a 218x178x3 with its 40 attributes, plant_leaves with random
  image sizes and its 22 labels). Reading with ``decoders`` would need TensorFlow there, so the
  loaders fall back to decoded examples (which the tests also check).
* ``as_data_source_fn`` fakes: per-builder examples whose content is known (constant images, JPEG
  bytes for ``SkipDecoding``), to check slot assignment, label mapping, laziness and the
  encoded-JPEG path that the real, prepared data sets take.
"""

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments.data import batches, check_example, default_dataset_config, make_dataset
from experiments.data.celeb_a import ATTRIBUTES
from experiments.data.plant_leaves import HEALTH, LABELS, SPECIES
from experiments.data.tfds_io import DataUnavailableError, MissingPackageError, open_split

MOCK_EXAMPLES = 24


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        yield


def _jpeg(value, size):
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


class FakeSource:
    """A list of examples that counts reads (a stand-in for a TFDS data source)."""

    def __init__(self, make, n):
        self.make, self.n, self.reads = make, n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return self.make(int(i))


def fake_tfds(make_by_builder, num_examples, sources=None):
    """mock_data whose data sources are FakeSource(make_by_builder[name](i, split, decoders))."""

    def as_data_source(self, split, decoders=None, **_):
        source = FakeSource(lambda i: make_by_builder[self.name](i, split, decoders), num_examples)
        if sources is not None:
            sources.append(source)
        return source

    return tfds.testing.mock_data(
        num_examples=num_examples,
        policy=tfds.testing.MockPolicy.USE_CODE,
        as_data_source_fn=as_data_source,
    )


# ----- multi_mnist / multi_fashion / multi_fashion_mnist -----------------------------------------


@pytest.mark.parametrize("name", ["multi_mnist", "multi_fashion", "multi_fashion_mnist"])
def test_multi_mnist_variants_with_the_stock_mock(mock_tfds, name):
    config = default_dataset_config(name)
    config.update(num_train=40, num_test=16)
    data = make_dataset(config)
    assert data.task_names == ("left", "right") and data.input_shape == (36, 36, 1)
    assert (len(data.train), len(data.test), data.val) == (40, 16, None)
    check_example(data.train[3], data.tasks, name)
    batch = next(batches(data.train, 8, seed=0, epoch=0))
    assert batch["image"].shape == (8, 36, 36, 1) and batch["left"].dtype == np.int32


def test_multi_mnist_composites_are_the_tfds_items_with_their_labels(mock_tfds):
    # No shift on a 56x56 canvas: the corners hold the two items unchanged.
    config = default_dataset_config("multi_mnist")
    config.update(num_train=30, num_test=10, canvas_size=56, max_shift=0)
    data = make_dataset(config)
    pool = open_split("mnist", "train", data_dir=None, download=True)
    items = [pool[i] for i in range(len(pool))]
    for i in range(len(data.train)):
        example = data.train[i]
        corners = {"left": example["image"][:28, :28], "right": example["image"][28:, 28:]}
        for task, crop in corners.items():
            found = [it for it in items if np.array_equal(it["image"] / np.float32(255), crop)]
            assert found, f"composite {i}: the {task} corner is no mnist item"
            assert any(int(it["label"]) == int(example[task]) for it in found)


def test_multi_mnist_is_deterministic_by_split_seed(mock_tfds):
    config = default_dataset_config("multi_mnist")
    config.update(num_train=50, num_test=10)
    a, b = make_dataset(config), make_dataset(config)
    assert all(np.array_equal(a.train[i]["image"], b.train[i]["image"]) for i in (0, 7, 49))
    config.split_seed = 1
    c = make_dataset(config)
    assert not all(np.array_equal(a.train[i]["image"], c.train[i]["image"]) for i in range(10))


def test_multi_fashion_mnist_puts_mnist_left_and_fashion_right_lazily():
    value = {"mnist": 100, "fashion_mnist": 200}

    def item(builder):
        return lambda i, split, decoders: {
            "image": np.full((28, 28, 1), value[builder], np.uint8),
            "label": np.int64(i % 10),
        }

    sources = []
    with fake_tfds({b: item(b) for b in value}, num_examples=12, sources=sources):
        data = make_dataset(default_dataset_config("multi_fashion_mnist"))  # 120,000 composites
        assert len(data.train) == 120_000 and len(data.test) == 20_000
        assert sum(s.reads for s in sources) == 0, "building must not read any image"
        data.train[123]
        assert sum(s.reads for s in sources) == 2
        config = default_dataset_config("multi_fashion_mnist")
        config.update(canvas_size=56, max_shift=0)  # no overlap: each corner is one item
        image = make_dataset(config).test[7]["image"][..., 0] * 255
    assert np.isclose(image[0, 0], 100) and np.isclose(image[-1, -1], 200)


# ----- celeb_a -----------------------------------------------------------------------------------


def test_celeb_a_all_40_attributes_in_paper_order(mock_tfds):
    config = default_dataset_config("celeb_a")
    config.update(max_train_examples=10)
    data = make_dataset(config)
    assert data.task_names == ATTRIBUTES and len(ATTRIBUTES) == 40
    assert list(ATTRIBUTES) == sorted(ATTRIBUTES)  # the file order is also the TFDS (sorted) order
    assert all(t.kind == "classification" and t.num_classes == 2 for t in data.tasks)
    assert data.input_shape == (64, 64, 3)
    assert (len(data.train), len(data.val), len(data.test)) == (10, MOCK_EXAMPLES, MOCK_EXAMPLES)
    example = data.train[2]
    check_example(example, data.tasks, "celeb_a")
    raw = open_split("celeb_a", "train", data_dir=None, download=True)[2]
    assert all(int(example[a]) == int(raw["attributes"][a]) for a in ATTRIBUTES)


def test_celeb_a_subsets_and_image_size(mock_tfds):
    config = default_dataset_config("celeb_a")
    config.update(
        num_tasks=10, image_size=32, max_train_examples=4, max_val_examples=2, max_test_examples=3
    )
    data = make_dataset(config)
    assert data.task_names == ATTRIBUTES[:10]
    assert data.train[0]["image"].shape == (32, 32, 3)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 3)
    config.attributes = ("Smiling", "Male")
    assert make_dataset(config).task_names == ("Smiling", "Male")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attributes": ("Smiling", "Grumpy")}, r"unknown attributes \['Grumpy'\]"),
        ({"num_tasks": 41}, "1..40"),
    ],
)
def test_celeb_a_bad_attributes(mock_tfds, overrides, message):
    config = default_dataset_config("celeb_a")
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        make_dataset(config)


def test_celeb_a_decodes_undecoded_jpeg_bytes():
    def example(i, split, decoders):
        assert decoders is not None and "image" in decoders  # jpeg_draft asks for SkipDecoding
        flags = {a: bool((i + k) % 2) for k, a in enumerate(ATTRIBUTES)}
        return {"image": _jpeg(10 * i, (218, 178)), "attributes": flags}

    with fake_tfds({"celeb_a": example}, num_examples=5):
        data = make_dataset(default_dataset_config("celeb_a"))
        ex = data.test[3]
    assert ex["image"].shape == (64, 64, 3) and abs(float(ex["image"].mean()) * 255 - 30) < 3
    assert int(ex["5_o_Clock_Shadow"]) == 1 and int(ex["Arched_Eyebrows"]) == 0


# ----- plant_leaves ------------------------------------------------------------------------------


def test_plant_leaves_with_the_stock_mock(mock_tfds):
    config = default_dataset_config("plant_leaves")
    config.update(image_size=16, val_fraction=0.2, test_fraction=0.2)
    data = make_dataset(config)
    assert data.task_names == ("species", "health")
    assert [t.num_classes for t in data.tasks] == [12, 2]
    assert data.input_shape == (16, 16, 3)
    assert sum(data.info["sizes"].values()) == data.info["records"] == MOCK_EXAMPLES
    check_example(data.train[0], data.tasks, "plant_leaves")  # mock images have random sizes


def test_plant_leaves_label_mapping_is_the_methods_table():
    assert SPECIES.tolist() == [
        0,
        1,
        2,
        3,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        9,
        10,
        11,
    ]
    assert HEALTH.tolist() == [0] * 11 + [1] * 11
    assert (
        len(LABELS) == 22
        and LABELS[15].startswith("Bael (P4)")
        and LABELS[7].startswith("Basil (P8)")
    )


def _leaf(i, split, decoders):
    """Record i has label i % 22 and a constant image of grey level 10 * label."""
    label = i % 22
    if decoders is not None:
        return {
            "image": _jpeg(10 * label, (40, 60)),
            "image/filename": f"{i}.JPG",
            "label": np.int64(label),
        }
    image = np.full((40, 60, 3), 10 * label, np.uint8)
    return {"image": image, "image/filename": f"{i}.JPG", "label": np.int64(label)}


@pytest.mark.parametrize("jpeg_draft", [True, False])
def test_plant_leaves_tasks_split_and_decoding(jpeg_draft):
    with fake_tfds({"plant_leaves": _leaf}, num_examples=22 * 20):
        config = default_dataset_config("plant_leaves")
        config.update(image_size=8, jpeg_draft=jpeg_draft)
        data = make_dataset(config)
        assert data.info["sizes"] == {"train": 308, "val": 66, "test": 66}
        json.dumps(data.info)  # reports write it as JSON
        for split in (data.train, data.val, data.test):
            labels = []
            for i in range(len(split)):
                ex = split[i]
                label = round(float(ex["image"].mean()) * 255 / 10)
                assert ex["species"] == SPECIES[label] and ex["health"] == HEALTH[label]
                labels.append(label)
            counts = np.bincount(labels, minlength=22)
            assert counts.min() == counts.max(), "every label gets the same share of each split"


def test_plant_leaves_split_is_fixed_by_the_seed_and_images_are_cached():
    sources = []
    with fake_tfds({"plant_leaves": _leaf}, num_examples=88, sources=sources):
        config = default_dataset_config("plant_leaves")
        config.image_size = 8
        a, b = make_dataset(config), make_dataset(config)
        order = [float(a.train[i]["image"].mean()) for i in range(len(a.train))]
        assert order == [float(b.train[i]["image"].mean()) for i in range(len(b.train))]
        config.split_seed = 5
        c = make_dataset(config)
        assert order != [float(c.train[i]["image"].mean()) for i in range(len(c.train))]
        reader = sources[0]
        before = reader.reads
        a.test[0], a.test[0], a.train[0]
        assert reader.reads == before + 1  # later reads come from the cache


# ----- errors ------------------------------------------------------------------------------------


def test_an_unprepared_tfds_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises(
        DataUnavailableError,
        match=r"(?s)Could not open TFDS data set .mnist.*not downloaded.*tfds build mnist",
    ):
        open_split("mnist", "train", data_dir=str(tmp_path), download=False)


def test_a_missing_package_is_named_not_blamed_on_the_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def broken(*args, **kwargs):
        raise FileNotFoundError("no dataset_info.json")

    def missing(*args, **kwargs):
        raise ModuleNotFoundError(
            "No module named 'importlib_resources'", name="importlib_resources"
        )

    monkeypatch.setattr(tfds, "data_source", missing)
    with pytest.raises(
        MissingPackageError, match=r"package 'importlib_resources' is not installed"
    ):
        open_split("mnist", "train", data_dir=str(tmp_path), download=True)
    monkeypatch.setattr(tfds, "data_source", broken)
    with pytest.raises(DataUnavailableError, match="not downloaded"):
        open_split("mnist", "train", data_dir=str(tmp_path), download=True)
