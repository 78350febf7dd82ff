"""``digit_transforms``: embedded benchmark whose tasks compete: *what* the digit is vs. *how* it
was transformed.

Built, with no download, from the 1,797 real 8x8 handwritten digits that ship inside
scikit-learn (``sklearn.datasets.load_digits``, as :mod:`experiments.data.multi_digits`). Every
example is one digit drawn from a pool and transformed by independently drawn *factors*; each
factor listed in ``tasks`` is a classification task whose label is that factor:

==============  =========  ===========================================================
task            classes    construction (applied in this order)
==============  =========  ===========================================================
``digit``       10         the source digit's class (the image drawn from the pool)
``scale``       2          bilinear zoom of the 8x8 digit to 10 px (0) or 14 px (1)
``thickness``   3          grey erosion (0, thinner), none (1), grey dilation (2, thicker)
                           with a 2x2 footprint at the zoomed size
``rotation``    4          ``np.rot90`` by 0, 90, 180, 270 degrees (exact, no resampling)
``flip``        2          mirrored left-right (1) or not (0), after the rotation
==============  =========  ===========================================================

The transformed digit is pasted at the centre of an ``image_size`` x ``image_size`` canvas
(pixels scaled from 0..16 to [0, 1], then clipped to [0, 1]). A factor not listed in ``tasks`` is
held at its identity (12 px, no morphology, upright, unmirrored), so it adds no nuisance.

Why these tasks compete: the digit task is best served by features invariant to orientation,
mirroring and stroke width, while the rotation, flip and thickness tasks must keep exactly what
the digit task wants to discard, through one shared trunk; rotation and flip of an asymmetric
digit are also confusable with each other (a mirrored 2 rotated by 180 degrees is close to an
upright 2 mirrored upside down). No label is computed from another task's label: every factor is
drawn independently (uniformly) per example, and the digit class is the data set's own label.
Because labels are independent, a 6 rotated by 180 degrees (which looks like a 9) is labelled
``digit=6, rotation=2``: the confusion is part of the benchmark.

Measured (BUILD.md, "Conflict benchmark"; ``small_resnet`` at widths 4/8/16, 5 epochs, 3 seeds):
with the default tasks (digit, rotation, thickness) every pair's mean gradient cosine over joint
training is between -0.07 and -0.19 on every seed and single-task training beats joint training
on every task (digit by 35 points). Adding ``flip`` gives one cooperating pair (rotation-flip,
+0.03 .. +0.11) and a flip task near chance; ``scale`` is trivial (100%). Part of the conflict
comes from the small shared encoder: the same model on ``multi_digits`` also has negative
cosines (about -0.12).

Train/test separation: the digit *images* are split first, stratified by class with
``split_seed`` (``test_fraction`` of each class to the test pool, as ``multi_digits`` does), so no
test example is made from a digit sample seen in training; the factors of the train and test
examples are drawn with distinct seeds derived from ``split_seed``.

Example: ``{"image": float32[16, 16, 1], "digit": int32, "rotation": int32, ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiments.data.core import ArraySource, MultiTaskData, first_n
from experiments.data.multi_digits import digit_pools, load_digit_images
from experiments.tasks import TaskSpec

__all__ = ["DEFAULTS", "FACTORS", "build", "transform_digit"]

#: Every factor: ``name -> number of classes``, in the order the transformations are applied.
FACTORS: dict[str, int] = {"digit": 10, "scale": 2, "thickness": 3, "rotation": 4, "flip": 2}

#: Zoomed digit side per scale class; the identity (factor not a task) is 12 px.
SCALE_SIZES = (10, 14)
IDENTITY = {"scale": None, "thickness": 1, "rotation": 0, "flip": 0}
_IDENTITY_SIZE = 12

DEFAULTS = {
    "tasks": ("digit", "rotation", "thickness"),
    "num_train": 6_000,
    "num_test": 1_500,
    "image_size": 16,
    "test_fraction": 0.25,
    "split_seed": 0,
    "max_train_examples": 0,
    "max_test_examples": 0,
}


def _zoom(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize ``[8, 8] -> [size, size]`` (``scipy.ndimage.zoom``, order 1)."""
    from scipy import ndimage  # scipy ships with scikit-learn

    return ndimage.zoom(image, size / image.shape[0], order=1, grid_mode=True, mode="nearest")


def transform_digit(
    image: np.ndarray, scale: int | None, thickness: int, rotation: int, flip: int, canvas: int
) -> np.ndarray:
    """One digit ``[8, 8]`` in [0, 1] -> the transformed digit centred on ``[canvas, canvas]``.

    ``scale`` None is the identity size (12 px); ``thickness`` 0 / 1 / 2 = erosion / none /
    dilation; ``rotation`` in quarter turns (counter-clockwise); ``flip`` 1 mirrors left-right.
    """
    from scipy import ndimage

    size = _IDENTITY_SIZE if scale is None else SCALE_SIZES[scale]
    if size > canvas:
        raise ValueError(
            f"digit_transforms: a {size} px digit does not fit on image_size={canvas}; "
            f"use image_size >= {max(SCALE_SIZES)}."
        )
    x = _zoom(image, size)
    if thickness == 0:
        x = ndimage.grey_erosion(x, size=(2, 2))
    elif thickness == 2:
        x = ndimage.grey_dilation(x, size=(2, 2))
    x = np.rot90(x, k=rotation)
    if flip:
        x = x[:, ::-1]
    out = np.zeros((canvas, canvas), np.float32)
    top = (canvas - size) // 2
    out[top : top + size, top : top + size] = x
    return np.clip(out, 0.0, 1.0)


def _examples(
    images: np.ndarray,
    labels: np.ndarray,
    tasks: Sequence[str],
    num: int,
    canvas: int,
    seed: int,
) -> ArraySource:
    """``num`` examples from one pool: a digit drawn uniformly, every task factor uniformly."""
    rng = np.random.default_rng(seed)
    source = rng.integers(0, len(images), num)
    factors = {
        name: rng.integers(0, FACTORS[name], num) if name in tasks else None
        for name in ("scale", "thickness", "rotation", "flip")
    }

    def factor(name: str, i: int):
        values = factors[name]
        return IDENTITY[name] if values is None else int(values[i])

    canvases = np.stack(
        [
            transform_digit(
                images[s, :, :, 0],
                factor("scale", i),
                factor("thickness", i),
                factor("rotation", i),
                factor("flip", i),
                canvas,
            )
            for i, s in enumerate(source)
        ]
    )[..., None]
    arrays = {"image": canvases.astype(np.float32)}
    for name in tasks:
        values = labels[source] if name == "digit" else factors[name]
        arrays[name] = np.asarray(values, np.int32)
    return ArraySource(arrays)


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in FACTORS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(
            f"digit_transforms: tasks must be distinct names among {list(FACTORS)}; got "
            f"{list(tasks)}."
        )
    return tasks


def build(
    *,
    name: str = "digit_transforms",
    tasks: Sequence[str],
    num_train: int,
    num_test: int,
    image_size: int,
    test_fraction: float,
    split_seed: int,
    max_train_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """Builds the benchmark (see the module docstring for the construction).

    Raises:
      ValueError: unknown or repeated task names, a canvas too small for the largest digit, a
        count below 1, or a ``test_fraction`` outside (0, 1).
    """
    tasks = check_tasks(tasks)
    largest = max(SCALE_SIZES) if "scale" in tasks else _IDENTITY_SIZE
    if image_size < largest:
        raise ValueError(
            f"digit_transforms: image_size={image_size} cannot hold a {largest} px digit; "
            f"use image_size >= {largest}."
        )
    if num_train < 1 or num_test < 1:
        raise ValueError(
            f"digit_transforms: num_train and num_test must be >= 1; got {num_train}, {num_test}."
        )
    images, labels = load_digit_images()
    train_pool, test_pool = digit_pools(labels, test_fraction, split_seed)
    train_seed, test_seed = np.random.SeedSequence([split_seed, 2]).generate_state(2)
    train = _examples(
        images[train_pool], labels[train_pool], tasks, num_train, image_size, int(train_seed)
    )
    test = _examples(
        images[test_pool], labels[test_pool], tasks, num_test, image_size, int(test_seed)
    )
    train, test = first_n(train, max_train_examples), first_n(test, max_test_examples)
    return MultiTaskData(
        name=name,
        tasks=tuple(TaskSpec(t, "classification", FACTORS[t]) for t in tasks),
        train=train,
        test=test,
        val=None,
        input_shape=(image_size, image_size, 1),
        info={
            "source": "sklearn.datasets.load_digits (1,797 8x8 digits, bundled with scikit-learn)",
            "sizes": {"train": len(train), "test": len(test)},
            "digit_pools": {"train": len(train_pool), "test": len(test_pool)},
            "split_seed": split_seed,
            "image_size": image_size,
            "tasks": list(tasks),
            "preprocessing": "pixels / 16; zoom, erode/dilate, rot90, mirror; centred; clip [0, 1]",
        },
    )
