"""Dataset registry and config errors: unknown names and keys are reported with the valid ones."""

import ml_collections
import pytest

from experiments.data import DATASETS, default_dataset_config, make_dataset
from experiments.data.registry import BUILTIN_DATASETS

EXPECTED = {
    "multi_digits",
    "digit_transforms",
    "relatedness",
    "arrays",
    "multi_mnist",
    "multi_fashion",
    "multi_fashion_mnist",
    "multi_mnist_5k",
    "celeb_a",
    "plant_leaves",
    "nyuv2",
    "cityscapes",
}
COMMON_KEYS = {"name", "split_seed", "max_train_examples", "max_test_examples"}


def test_registry_holds_every_dataset():
    # other tests in this process may have registered their own (a config file's register_dataset)
    assert set(BUILTIN_DATASETS) == EXPECTED and EXPECTED <= set(DATASETS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_default_config_has_name_and_the_common_keys(name):
    config = default_dataset_config(name)
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.name == name
    assert COMMON_KEYS <= set(config.keys())
    assert set(config.keys()) == {"name", *DATASETS[name].defaults}


@pytest.mark.parametrize("name", ["multi_mnist", "multi_fashion_mnist", "celeb_a", "plant_leaves"])
def test_tfds_configs_take_a_data_dir_settable_as_a_string(name):
    config = default_dataset_config(name)
    assert config.data_dir is None
    config.data_dir = "/some/where"  # a str placeholder, so --config.data.data_dir=... works
    assert config.data_dir == "/some/where"


def test_configurable_image_sizes_and_subsets():
    assert default_dataset_config("plant_leaves").image_size == 64
    assert default_dataset_config("celeb_a").image_size == 64
    assert default_dataset_config("celeb_a").num_tasks == 40
    assert "root" in default_dataset_config("nyuv2")


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnist3'.*'celeb_a'.*'multi_digits'"):
        make_dataset({"name": "mnist3"})
    with pytest.raises(ValueError, match="valid datasets"):
        default_dataset_config("nope")
    with pytest.raises(ValueError, match="no `name`"):
        make_dataset({})


def test_unknown_key_is_named_with_the_valid_keys():
    config = default_dataset_config("multi_digits")
    config.image_size = 32  # a celeb_a / plant_leaves key, not a multi_digits one
    with pytest.raises(ValueError, match=r"\['image_size'\].*'multi_digits'.*'canvas_size'"):
        make_dataset(config)


def test_partial_configs_take_the_defaults():
    data = make_dataset({"name": "multi_digits", "num_train": 64, "num_test": 32})
    assert (len(data.train), len(data.test)) == (64, 32)
    config = ml_collections.ConfigDict({"name": "multi_digits", "max_train_examples": 10})
    assert len(make_dataset(config).train) == 10


def test_digit_transforms_tasks_are_a_config_key():
    config = default_dataset_config("digit_transforms")
    assert config.tasks == ("digit", "rotation", "thickness")
    config.update(tasks=("digit", "flip", "scale"), num_train=20, num_test=10)
    assert make_dataset(config).task_names == ("digit", "flip", "scale")


def test_a_config_that_is_not_a_mapping_is_a_type_error():
    with pytest.raises(TypeError, match="ConfigDict or a mapping"):
        make_dataset("multi_digits")
