"""Multi-task data sets for the experiments: TFDS (no TensorFlow), local .npy folders, embedded.

``make_dataset(config)`` builds a :class:`MultiTaskData` (tasks, train/val/test random-access
sources, input shape, provenance) from a config made by ``default_dataset_config(name)``;
``batches(...)`` turns a source into seeded, resumable batches through ``grain``.

Registered data sets (:data:`DATASETS`):

* ``multi_digits``: the embedded benchmark (scikit-learn's 8x8 digits, two per canvas); offline.
* ``digit_transforms``: embedded, one digit per image, transformed; tasks digit vs rotation vs
  stroke thickness, whose gradients conflict; offline.
* ``multi_mnist``, ``multi_fashion``, ``multi_fashion_mnist``: TFDS mnist / fashion_mnist
  composites on a 36x36 canvas.
* ``celeb_a``: TFDS celeb_a, 40 (or a subset of) binary attribute tasks.
* ``plant_leaves``: TFDS plant_leaves, species (12) and health (2), stratified split by seed.
* ``nyuv2``, ``cityscapes``: the preprocessed .npy folders of MTAN / CAGrad / LibMTL.
* ``arrays``: your own data from one local ``.npz`` file (:mod:`experiments.data.arrays`);
  other formats: :func:`register_dataset` from a config file, and
  :func:`experiments.data.multi_mnist.composite_dataset` builds the Multi-MNIST construction from
  any two pools of items.

Every example is ``{"image": float32[H, W, C], <task name>: target}`` with the target formats of
:class:`experiments.tasks.TaskSpec`.
"""

from experiments.data.core import (
    ArraySource,
    DataError,
    Example,
    MultiTaskData,
    RandomAccess,
    check_example,
    check_label_range,
    first_n,
    stratified_split,
    take,
)
from experiments.data.pipeline import batches, epoch_seed, num_batches
from experiments.data.registry import (
    DATASETS,
    DatasetEntry,
    default_dataset_config,
    make_dataset,
    register_dataset,
)

__all__ = [
    "DATASETS",
    "ArraySource",
    "DataError",
    "DatasetEntry",
    "Example",
    "MultiTaskData",
    "RandomAccess",
    "batches",
    "check_example",
    "check_label_range",
    "default_dataset_config",
    "epoch_seed",
    "first_n",
    "make_dataset",
    "num_batches",
    "register_dataset",
    "stratified_split",
    "take",
]
