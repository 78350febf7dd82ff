"""``multi_mnist``, ``multi_fashion`` and ``multi_fashion_mnist``: two items on a 36x36 canvas.

Built deterministically from TFDS ``mnist`` / ``fashion_mnist`` (``tfds.data_source``; 60,000
train and 10,000 test 28x28 grey images each) as in Sener & Koltun (2018) and Lin et al. (2019,
Pareto MTL): two items on a 36x36 canvas, one at the top-left and one at the bottom-right corner,
each moved towards the centre by 0..4 pixels per axis, the overlap combined with ``max``
(:mod:`experiments.data.overlay`). Task ``left`` classifies the top-left item, task ``right`` the
bottom-right item (10 classes each).

* ``multi_mnist``: MNIST + MNIST.
* ``multi_fashion``: FashionMNIST + FashionMNIST.
* ``multi_fashion_mnist`` (Multi-Fashion+MNIST): the left item is an MNIST digit and the right one
  a FashionMNIST item. The literature does not say which slot holds which data set; the reported
  accuracies (about 98% vs 89%) suggest task 1 is MNIST (docs/design/METHODS.md).

Train composites pair items of the TFDS ``train`` splits and test composites items of the ``test``
splits, so no test item is seen in training. Which items and shifts composite ``i`` uses is fixed
by ``split_seed`` alone (a :class:`~experiments.data.overlay.PairPlan` of a few integers per
composite); the images are read and composed lazily, when a composite is indexed, through a
``grain.MapDataset``, so building the data set reads no image. The defaults give the released
pickle's sizes, 120,000 train and 20,000 test composites. Departures: the released data were
drawn once with an unknown seed, so ours are a different draw of the same construction; pixels are
scaled to [0, 1] and not resized (Sener & Koltun resize to 28x28; the Pareto MTL pickle keeps 36x36).

Example: ``{"image": float32[36, 36, 1], "left": int32, "right": int32}``.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from experiments.data.core import Example, MultiTaskData, RandomAccess, first_n
from experiments.data.images import to_unit_float
from experiments.data.overlay import PairPlan, compose, make_pair_plan
from experiments.data.tfds_io import open_split
from experiments.tasks import TaskSpec

__all__ = ["DEFAULTS", "TASKS", "VARIANTS", "build", "composite_dataset"]

TASKS = (
    TaskSpec("left", "classification", 10),
    TaskSpec("right", "classification", 10),
)

# registry name -> (TFDS builder of the left item, TFDS builder of the right item)
VARIANTS = {
    "multi_mnist": ("mnist", "mnist"),
    "multi_fashion": ("fashion_mnist", "fashion_mnist"),
    "multi_fashion_mnist": ("mnist", "fashion_mnist"),
}

DEFAULTS = {
    "num_train": 120_000,
    "num_test": 20_000,
    "canvas_size": 36,
    "max_shift": 4,
    "split_seed": 0,
    "data_dir": None,
    "download": True,
    "max_train_examples": 0,
    "max_test_examples": 0,
}

_ITEM_SHAPE = (28, 28, 1)


class _Composer:
    """``composer(i)``: composite ``i`` of a plan, reading its two items from their sources."""

    def __init__(
        self,
        left: RandomAccess,
        right: RandomAccess,
        plan: PairPlan,
        canvas_size: int,
        item_shape: tuple[int, ...] = _ITEM_SHAPE,
    ):
        self.left, self.right, self.plan, self.canvas_size = left, right, plan, canvas_size
        self.item_shape = tuple(item_shape)

    def _item(self, source: RandomAccess, index: int) -> tuple[np.ndarray, np.int32]:
        example = source[int(index)]
        image = np.asarray(example["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != self.item_shape:
            raise ValueError(
                f"Expected a {self.item_shape} item from {source!r}; got {image.shape}."
            )
        return image, np.int32(example["label"])

    def __call__(self, index: int) -> Example:
        plan = self.plan
        left_image, left_label = self._item(self.left, plan.left[index])
        right_image, right_label = self._item(self.right, plan.right[index])
        canvas = compose(
            left_image,
            right_image,
            plan.left_shift[index],
            plan.right_shift[index],
            self.canvas_size,
        )
        return {"image": to_unit_float(canvas), "left": left_label, "right": right_label}


def _composites(
    left: RandomAccess,
    right: RandomAccess,
    num: int,
    canvas_size: int,
    max_shift: int,
    seed: int,
    item_shape: tuple[int, ...] = _ITEM_SHAPE,
) -> grain.MapDataset:
    plan = make_pair_plan(num, len(left), len(right), max_shift, seed)
    return grain.MapDataset.range(num).map(_Composer(left, right, plan, canvas_size, item_shape))


def _item_shape(pool: RandomAccess) -> tuple[int, ...]:
    image = np.asarray(pool[0]["image"])
    return (*image.shape, 1) if image.ndim == 2 else tuple(image.shape)


def composite_dataset(
    *,
    name: str,
    left_train: RandomAccess,
    right_train: RandomAccess,
    left_test: RandomAccess,
    right_test: RandomAccess,
    num_train: int,
    num_test: int,
    canvas_size: int | None = None,
    max_shift: int = 4,
    split_seed: int = 0,
    source: str = "",
    left_classes: int = 10,
    right_classes: int = 10,
    item_shape: tuple[int, ...] | None = None,
) -> MultiTaskData:
    """The Multi-MNIST construction from any two pools of items (your own data).

    Each pool is a random-access source of ``{"image": uint8 [S, S] or [S, S, C], "label":
    int}`` (an :class:`~experiments.data.core.ArraySource` of NumPy arrays, a TFDS data source,
    ...); all items share one shape. Train composites pair train items, test composites test
    items. ``canvas_size`` defaults to ``S + 2 * max_shift`` (36 for 28x28 items and shift 4).
    ``item_shape`` ``(S, S, C)``: given, no item is read before a composite is indexed; else the
    first item of every pool is read to find and check it.
    """
    if item_shape is not None:
        shape = tuple(item_shape)
    else:
        shape = _item_shape(left_train)
        pools = {"right_train": right_train, "left_test": left_test, "right_test": right_test}
        for label, pool in pools.items():
            if _item_shape(pool) != shape:
                raise ValueError(
                    f"{name}: {label} items have shape {_item_shape(pool)}; left_train's have "
                    f"{shape}. All items must share one shape."
                )
    canvas = int(canvas_size) if canvas_size else shape[0] + 2 * max_shift
    if max_shift < 0 or canvas < shape[0] + max_shift:
        raise ValueError(
            f"{name}: canvas_size={canvas} cannot hold a {shape[0]}x{shape[1]} item shifted by up "
            f"to max_shift={max_shift}; need canvas_size >= {shape[0]} + max_shift."
        )
    train_seed, test_seed = (
        int(s) for s in np.random.SeedSequence([split_seed, 2]).generate_state(2)
    )
    train = _composites(left_train, right_train, num_train, canvas, max_shift, train_seed, shape)
    test = _composites(left_test, right_test, num_test, canvas, max_shift, test_seed, shape)
    return MultiTaskData(
        name=name,
        tasks=(
            TaskSpec("left", "classification", left_classes),
            TaskSpec("right", "classification", right_classes),
        ),
        train=train,
        test=test,
        val=None,
        input_shape=(canvas, canvas, shape[2]),
        info={
            "source": source or f"{name}: two item pools",
            "sizes": {"train": len(train), "test": len(test)},
            "split_seed": split_seed,
            "canvas_size": canvas,
            "max_shift": max_shift,
            "preprocessing": "uint8 / 255 -> [0, 1]; two items overlaid with max; composed lazily",
        },
    )


def build(
    *,
    name: str,
    num_train: int,
    num_test: int,
    canvas_size: int,
    max_shift: int,
    split_seed: int,
    data_dir: str | None,
    download: bool,
    max_train_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """Builds one of :data:`VARIANTS` (see the module docstring).

    Raises:
      ValueError: for an unknown variant, a canvas too small for two shifted 28x28 items, or
        non-positive sizes.
      RuntimeError: when TFDS cannot open ``mnist`` / ``fashion_mnist`` (names what to prepare).
    """
    if name not in VARIANTS:
        raise ValueError(f"Unknown Multi-MNIST variant {name!r}; valid: {sorted(VARIANTS)}.")
    if max_shift < 0 or canvas_size < _ITEM_SHAPE[0] + max_shift:
        raise ValueError(
            f"{name}: canvas_size={canvas_size} cannot hold a 28x28 item shifted by up to "
            f"max_shift={max_shift}; need canvas_size >= 28 + max_shift and max_shift >= 0."
        )
    if num_train < 1 or num_test < 1:
        raise ValueError(
            f"{name}: num_train and num_test must be >= 1; got {num_train}, {num_test}."
        )
    left_name, right_name = VARIANTS[name]
    opened: dict[tuple[str, str], RandomAccess] = {}

    def pool(builder: str, split: str) -> RandomAccess:
        if (builder, split) not in opened:
            opened[builder, split] = open_split(
                builder, split, data_dir=data_dir, download=download
            )
        return opened[builder, split]

    data = composite_dataset(
        name=name,
        left_train=pool(left_name, "train"),
        right_train=pool(right_name, "train"),
        left_test=pool(left_name, "test"),
        right_test=pool(right_name, "test"),
        num_train=num_train,
        num_test=num_test,
        canvas_size=canvas_size,
        max_shift=max_shift,
        split_seed=split_seed,
        source=f"TFDS {left_name} (left) + {right_name} (right) via tfds.data_source",
        item_shape=_ITEM_SHAPE,
    )
    train, test = first_n(data.train, max_train_examples), first_n(data.test, max_test_examples)
    info = {
        **data.info,
        "sizes": {"train": len(train), "test": len(test)},
        "item_pools": {f"{b}/{s}": len(src) for (b, s), src in opened.items()},
    }
    return dataclasses.replace(data, train=train, test=test, info=info)
