"""``multi_digits``: the embedded benchmark, a Multi-MNIST-style task that needs no download.

Built from the 1,797 real 8x8 handwritten digits that ship inside scikit-learn
(``sklearn.datasets.load_digits``, the UCI "Optical Recognition of Handwritten Digits" test set,
43 writers). Steps:

1. The digit *images* are split first, stratified by class with ``split_seed``, into disjoint
   train and test pools (``test_fraction`` of every class goes to the test pool), so every test
   composite is made of digits never seen in training.
2. ``num_train`` composites are drawn from the train pool and ``num_test`` from the test pool with
   :func:`experiments.data.overlay.make_pair_plan` (seeded by ``split_seed``): two digits on a
   ``canvas_size`` x ``canvas_size`` canvas, one at the top-left and one at the bottom-right
   corner, each moved towards the centre by ``0 .. max_shift`` pixels per axis, the overlap
   combined with ``max``.
3. Pixels are scaled from the data set's 0..16 to [0, 1].

Two tasks, ``left`` and ``right``: classify the top-left and the bottom-right digit (10 classes
each). With the defaults (12x12 canvas, shifts up to 2 px) the two digits always share a band of
4 to 8 pixel rows and columns, so both tasks read the same input pixels through a small shared
trunk and their trunk gradients conflict measurably (see ``python -m
experiments.data.multi_digits_check``). Departures from Multi-MNIST: 8x8 digits instead of 28x28
(the canvas is scaled down with them), a few thousand composites rather than 120,000, and the
test digits come from a held-out pool of the same writers rather than from a separate test set.

Example: ``{"image": float32[12, 12, 1], "left": int32, "right": int32}``.
"""

from __future__ import annotations

import functools

import numpy as np

from experiments.data.core import ArraySource, MultiTaskData, first_n, stratified_split
from experiments.data.overlay import compose, make_pair_plan
from experiments.tasks import TaskSpec

__all__ = ["DEFAULTS", "TASKS", "build", "digit_pools", "load_digit_images"]

TASKS = (
    TaskSpec("left", "classification", 10),
    TaskSpec("right", "classification", 10),
)

DEFAULTS = {
    "num_train": 10_000,
    "num_test": 2_000,
    "canvas_size": 12,
    "max_shift": 2,
    "test_fraction": 0.25,
    "split_seed": 0,
    "max_train_examples": 0,
    "max_test_examples": 0,
}

_DIGIT_SIZE = 8
_MAX_PIXEL = 16.0


@functools.cache
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: ``(float32[1797, 8, 8, 1] in [0, 1], int64[1797])``.

    Loaded once per process; the arrays are read-only.
    """
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    digits = load_digits()
    images = (digits.images / _MAX_PIXEL).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def digit_pools(
    labels: np.ndarray, test_fraction: float, split_seed: int, name: str = "multi_digits"
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint ``(train, test)`` indices into the digit images, stratified by class
    (``name``: the data set named in the error)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{name}: test_fraction must be in (0, 1); got {test_fraction}.")
    train_pool, test_pool = stratified_split(
        labels, (1.0 - test_fraction, test_fraction), split_seed
    )
    return train_pool, test_pool


def _composites(
    images: np.ndarray,
    labels: np.ndarray,
    num: int,
    canvas_size: int,
    max_shift: int,
    seed: int,
) -> ArraySource:
    """``num`` two-digit composites drawn from ``images`` (one pool for both slots)."""
    plan = make_pair_plan(num, len(images), len(images), max_shift, seed)
    canvases = np.stack(
        [
            compose(images[a], images[b], plan.left_shift[i], plan.right_shift[i], canvas_size)
            for i, (a, b) in enumerate(zip(plan.left, plan.right, strict=True))
        ]
    )
    return ArraySource(
        {
            "image": canvases.astype(np.float32),
            "left": labels[plan.left].astype(np.int32),
            "right": labels[plan.right].astype(np.int32),
        }
    )


def build(
    *,
    name: str = "multi_digits",
    num_train: int,
    num_test: int,
    canvas_size: int,
    max_shift: int,
    test_fraction: float,
    split_seed: int,
    max_train_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """Builds the embedded benchmark (see the module docstring for the construction).

    Raises:
      ValueError: when the canvas cannot hold two shifted digits, a count is negative, or
        ``test_fraction`` leaves an empty pool.
    """
    if canvas_size < _DIGIT_SIZE + max_shift or max_shift < 0:
        raise ValueError(
            f"multi_digits: canvas_size={canvas_size} cannot hold an {_DIGIT_SIZE}x{_DIGIT_SIZE} "
            f"digit shifted by up to max_shift={max_shift}; need canvas_size >= "
            f"{_DIGIT_SIZE} + max_shift and max_shift >= 0."
        )
    if num_train < 1 or num_test < 1:
        raise ValueError(
            f"multi_digits: num_train and num_test must be >= 1; got {num_train}, {num_test}."
        )
    images, labels = load_digit_images()
    train_pool, test_pool = digit_pools(labels, test_fraction, split_seed)
    # Distinct seeds for the two plans, derived from split_seed.
    train_seed, test_seed = np.random.SeedSequence([split_seed, 1]).generate_state(2)
    train = _composites(
        images[train_pool], labels[train_pool], num_train, canvas_size, max_shift, int(train_seed)
    )
    test = _composites(
        images[test_pool], labels[test_pool], num_test, canvas_size, max_shift, int(test_seed)
    )
    train, test = first_n(train, max_train_examples), first_n(test, max_test_examples)
    return MultiTaskData(
        name=name,
        tasks=TASKS,
        train=train,
        test=test,
        val=None,
        input_shape=(canvas_size, canvas_size, 1),
        info={
            "source": "sklearn.datasets.load_digits (1,797 8x8 digits, bundled with scikit-learn)",
            "sizes": {"train": len(train), "test": len(test)},
            "digit_pools": {"train": len(train_pool), "test": len(test_pool)},
            "split_seed": split_seed,
            "canvas_size": canvas_size,
            "max_shift": max_shift,
            "preprocessing": "pixels / 16 -> [0, 1]; two digits overlaid with max",
        },
    )
