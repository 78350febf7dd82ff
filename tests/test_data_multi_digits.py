"""The embedded benchmark multi_digits: offline, deterministic, test digits never seen in training."""

import json

import numpy as np
import pytest

from experiments.data import batches, check_example, default_dataset_config, make_dataset
from experiments.data.multi_digits import digit_pools, load_digit_images


@pytest.fixture(scope="module")
def small():
    config = default_dataset_config("multi_digits")
    config.num_train, config.num_test = 600, 200
    return make_dataset(config)


def test_format_tasks_and_sizes(small):
    assert small.task_names == ("left", "right")
    assert all(t.kind == "classification" and t.num_classes == 10 for t in small.tasks)
    assert small.input_shape == (12, 12, 1) and small.val is None
    assert (len(small.train), len(small.test)) == (600, 200)
    example = small.train[0]
    check_example(example, small.tasks, "multi_digits")
    assert 0.0 <= example["image"].min() and example["image"].max() <= 1.0
    assert small.info["sizes"] == {"train": 600, "test": 200}
    json.dumps(small.info)  # reports write it as JSON


def test_labels_cover_all_classes_in_both_slots(small):
    batch = next(batches(small.train, 600, seed=0, epoch=0))
    for task in ("left", "right"):
        assert set(np.unique(batch[task]).tolist()) == set(range(10))


def test_same_config_same_data_other_seed_other_data(small):
    config = default_dataset_config("multi_digits")
    config.num_train, config.num_test = 600, 200
    again = make_dataset(config)
    assert np.array_equal(again.train[17]["image"], small.train[17]["image"])
    assert again.test[5]["left"] == small.test[5]["left"]
    config.split_seed = 1
    other = make_dataset(config)
    assert not np.array_equal(other.train[17]["image"], small.train[17]["image"])


def test_digit_pools_are_disjoint_and_stratified():
    _, labels = load_digit_images()
    train, test = digit_pools(labels, 0.25, split_seed=0)
    assert not set(train.tolist()) & set(test.tolist())
    assert len(train) + len(test) == len(labels) == 1797
    np.testing.assert_allclose(np.bincount(labels[test]), 0.25 * np.bincount(labels), atol=1)


def test_test_composites_are_made_of_held_out_digits():
    # Without shifts on a 16x16 canvas the two digits do not overlap: each corner is one digit.
    config = default_dataset_config("multi_digits")
    config.update(canvas_size=16, max_shift=0, num_train=50, num_test=100)
    data = make_dataset(config)
    images, labels = load_digit_images()
    train_pool, test_pool = digit_pools(labels, 0.25, split_seed=0)
    flat = images.reshape(len(images), -1)
    for i in range(len(data.test)):
        example = data.test[i]
        for crop, task in ((example["image"][:8, :8], "left"), (example["image"][8:, 8:], "right")):
            matches = set(np.flatnonzero((flat == crop.reshape(1, -1)).all(axis=1)).tolist())
            assert matches & set(test_pool.tolist()), "a test digit must come from the test pool"
            assert all(labels[m] == example[task] for m in matches)
            # exact duplicates across the pools would make this ambiguous; the data have none here
            assert not matches & set(train_pool.tolist())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"canvas_size": 9, "max_shift": 2}, "cannot hold"),
        ({"num_train": 0}, "must be >= 1"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\)"),
    ],
)
def test_bad_settings_are_reported(overrides, message):
    config = default_dataset_config("multi_digits")
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        make_dataset(config)
