"""The embedded conflict benchmark digit_transforms: offline, deterministic, independent factor
labels, the transformations by hand, and test examples made only of held-out digits."""

import json

import numpy as np
import pytest

from experiments.data import check_example, default_dataset_config, make_dataset
from experiments.data.digit_transforms import FACTORS, transform_digit
from experiments.data.multi_digits import digit_pools, load_digit_images

ALL = ("digit", "scale", "thickness", "rotation", "flip")


@pytest.fixture(scope="module")
def small():
    config = default_dataset_config("digit_transforms")
    config.update(tasks=ALL, num_train=400, num_test=120)
    return make_dataset(config)


def test_format_tasks_and_sizes(small):
    assert small.task_names == ALL
    assert [t.num_classes for t in small.tasks] == [10, 2, 3, 4, 2]
    assert all(t.kind == "classification" for t in small.tasks)
    assert small.input_shape == (16, 16, 1) and small.val is None
    assert (len(small.train), len(small.test)) == (400, 120)
    example = small.train[0]
    check_example(example, small.tasks, "digit_transforms")
    images = small.train.arrays["image"]
    assert images.min() >= 0.0 and images.max() <= 1.0
    json.dumps(small.info)


def test_default_tasks_are_a_subset_and_unlisted_factors_stay_at_identity():
    data = make_dataset({"name": "digit_transforms", "num_train": 30, "num_test": 10})
    assert set(data.task_names) <= set(FACTORS) and len(data.task_names) >= 3
    assert set(data.train[0]) == {"image", *data.task_names}


def test_factor_labels_are_independent_and_cover_every_class(small):
    arrays = small.train.arrays
    for name in ALL:
        assert set(np.unique(arrays[name]).tolist()) == set(range(FACTORS[name]))
    # every (rotation, flip) and (digit, rotation) combination occurs: no label is a function
    # of another
    combos = set(zip(arrays["rotation"].tolist(), arrays["flip"].tolist(), strict=True))
    assert len(combos) == 8
    combos = set(zip(arrays["digit"].tolist(), arrays["rotation"].tolist(), strict=True))
    assert len(combos) >= 35


def test_transformations_by_hand():
    images, _ = load_digit_images()
    digit = images[3, :, :, 0]
    upright = transform_digit(digit, None, 1, 0, 0, 16)
    for k in range(4):  # exact quarter turns about the canvas centre (12 px digit, 2 px margin)
        np.testing.assert_array_equal(
            transform_digit(digit, None, 1, k, 0, 16), np.rot90(upright, k)
        )
    np.testing.assert_array_equal(transform_digit(digit, None, 1, 0, 1, 16), upright[:, ::-1])
    thin, thick = (transform_digit(digit, None, t, 0, 0, 16) for t in (0, 2))
    assert thin.sum() < upright.sum() < thick.sum()
    small, large = (transform_digit(digit, s, 1, 0, 0, 16) for s in (0, 1))
    rows = lambda x: np.flatnonzero(x.any(axis=1))
    assert rows(small).size <= 10 < rows(large).size <= 14
    with pytest.raises(ValueError, match="does not fit"):
        transform_digit(digit, 1, 1, 0, 0, 12)


def test_same_config_same_data_other_seed_other_data(small):
    config = default_dataset_config("digit_transforms")
    config.update(tasks=ALL, num_train=400, num_test=120)
    again = make_dataset(config)
    np.testing.assert_array_equal(again.train.arrays["image"], small.train.arrays["image"])
    config.split_seed = 1
    other = make_dataset(config)
    assert not np.array_equal(other.train.arrays["image"], small.train.arrays["image"])


def test_test_examples_are_made_of_held_out_digits(small):
    images, labels = load_digit_images()
    train_pool, test_pool = digit_pools(labels, 0.25, split_seed=0)

    def sources(example, pool):
        f = [int(example[n]) for n in ("scale", "thickness", "rotation", "flip")]
        return [
            i
            for i in pool
            if labels[i] == example["digit"]
            and np.array_equal(
                transform_digit(images[i, :, :, 0], *f, 16), example["image"][..., 0]
            )
        ]

    for split, own, other in (
        (small.test, test_pool, train_pool),
        (small.train, train_pool, test_pool),
    ):
        for index in range(4):
            example = split[index]
            assert sources(example, own), "no digit of its own pool makes this example"
            assert not sources(example, other), "an example is made of the other pool's digit"


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match=r"tasks must be distinct names among"):
        make_dataset({"name": "digit_transforms", "tasks": ("digit", "colour")})
    with pytest.raises(ValueError, match=r"tasks must be distinct"):
        make_dataset({"name": "digit_transforms", "tasks": ("digit", "digit")})
    with pytest.raises(ValueError, match="image_size=12 cannot hold a 14 px digit"):
        make_dataset({"name": "digit_transforms", "tasks": ("digit", "scale"), "image_size": 12})
    with pytest.raises(ValueError, match="num_train and num_test must be >= 1"):
        make_dataset({"name": "digit_transforms", "num_train": 0})
