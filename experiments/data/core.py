"""What every data set returns: :class:`MultiTaskData`, random-access sources and index splits.

A *source* is anything with ``len(source)`` and ``source[i] -> dict[str, np.ndarray]`` (the
``grain`` random-access protocol): a :class:`ArraySource` of in-memory arrays, a TFDS
``data_source`` wrapped by a map, or a ``grain.MapDataset``. Every example is a flat dict with an
``"image"`` (float32 ``[H, W, C]``) and one target per task, keyed by the task's name, in the
formats of :class:`experiments.tasks.TaskSpec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import grain
import numpy as np

from experiments.tasks import TaskSpec

Example = dict[str, np.ndarray]

__all__ = [
    "ArraySource",
    "DataError",
    "Example",
    "MultiTaskData",
    "RandomAccess",
    "check_example",
    "check_label_range",
    "first_n",
    "map_source",
    "stratified_split",
    "take",
]


class DataError(ValueError):
    """The data cannot be used as given (a missing or unreadable file, arrays of unequal length,
    labels outside ``[0, num_classes)``); the message names the file or array and the fix."""


@runtime_checkable
class RandomAccess(Protocol):
    """A finite random-access sequence of examples: ``len(src)`` and ``src[i] -> Example``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


@dataclasses.dataclass
class MultiTaskData:
    """One multi-task data set, ready for :func:`experiments.data.batches`.

    Attributes:
      name: the registry name (``"multi_digits"``, ``"celeb_a"``, ...).
      tasks: the tasks; this order is the order of the loss vector everywhere.
      train: the training examples.
      test: the held-out test examples.
      val: validation examples, or ``None`` when the data set has no validation split.
      input_shape: ``(H, W, C)`` of ``example["image"]``.
      info: provenance for reports: ``source``, ``sizes``, ``split_seed``, preprocessing notes.
    """

    name: str
    tasks: tuple[TaskSpec, ...]
    train: RandomAccess
    test: RandomAccess
    val: RandomAccess | None
    input_shape: tuple[int, ...]
    info: dict

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names in loss-vector order."""
        return tuple(task.name for task in self.tasks)

    def splits(self) -> dict[str, RandomAccess]:
        """``{"train": ..., "val": ..., "test": ...}`` without the missing ones."""
        found = {"train": self.train, "val": self.val, "test": self.test}
        return {name: src for name, src in found.items() if src is not None}


class ArraySource:
    """Examples stored as equal-length NumPy arrays: ``src[i] = {key: arrays[key][i]}``.

    Args:
      arrays: ``{key: array[N, ...]}``; every array has the same leading length N.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        lengths = {key: len(value) for key, value in arrays.items()}
        if not lengths:
            raise DataError("ArraySource needs at least one array.")
        if len(set(lengths.values())) != 1:
            raise DataError(
                f"ArraySource arrays differ in length: {lengths}; every array of a split needs "
                "one entry per example (the same leading length)."
            )
        self.arrays = {key: np.asarray(value) for key, value in arrays.items()}
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Example:
        index = _check_index(index, self._length)
        return {key: value[index] for key, value in self.arrays.items()}

    def __repr__(self) -> str:
        shapes = {key: (value.shape, str(value.dtype)) for key, value in self.arrays.items()}
        return f"ArraySource({shapes})"


def _check_index(index: Any, length: int) -> int:
    index = int(index)
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for a source of {length} examples.")
    return index % length


class _Take:
    """``_Take(parent, indices)[i] = parent[indices[i]]`` (a lazy, picklable index view)."""

    def __init__(self, parent: RandomAccess, indices: np.ndarray):
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.parent[int(self.indices[_check_index(index, len(self.indices))])]


def take(source: RandomAccess, indices: Sequence[int] | np.ndarray) -> RandomAccess:
    """The examples ``source[indices[0]], source[indices[1]], ...`` without reading them now."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
        raise IndexError(f"take: indices outside [0, {len(source)}).")
    if isinstance(source, ArraySource):
        return ArraySource({key: value[indices] for key, value in source.arrays.items()})
    return _Take(source, indices)


def first_n(source: RandomAccess, limit: int) -> RandomAccess:
    """The first ``limit`` examples of ``source``; all of them when ``limit`` is 0.

    Backs the ``max_train_examples`` / ``max_val_examples`` / ``max_test_examples`` config keys.
    """
    if limit < 0:
        raise ValueError(f"An example limit must be >= 0 (0 = all); got {limit}.")
    if limit == 0 or limit >= len(source):
        return source
    return take(source, np.arange(limit))


def map_source(source: RandomAccess, fn: Callable[[Any], Example]) -> grain.MapDataset:
    """``grain.MapDataset`` whose item ``i`` is ``fn(source[i])``, computed when it is read."""
    return grain.MapDataset.source(source).map(fn)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Splits ``range(len(labels))`` into parts with the given fractions of every label.

    For every label value the ``n`` indices carrying it are permuted with ``seed`` and cut at
    ``round(n * cumsum(fractions))``, so every part holds the same share of every class up to one
    example. Each part is then shuffled with the same
    generator, so that its first examples are a random, roughly stratified subset.

    Args:
      labels: ``int[N]`` class of every example.
      fractions: the share of each part; they must sum to 1.
      seed: the split seed; the same seed gives the same split.

    Returns:
      One ``int64`` index array per fraction; together they are a partition of ``range(N)``.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size < 1 or np.any(fractions < 0):
        raise ValueError(f"fractions must be non-negative; got {fractions.tolist()}.")
    if not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must sum to 1; got {fractions.tolist()}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        bounds = np.round(len(members) * np.cumsum(fractions[:-1])).astype(np.int64)
        for part, chunk in zip(parts, np.split(members, bounds), strict=True):
            part.append(chunk)
    return [rng.permutation(np.concatenate(part)).astype(np.int64) for part in parts]


def check_example(example: Mapping[str, Any], tasks: Sequence[TaskSpec], where: str) -> None:
    """Raises :class:`DataError` when ``example`` lacks the image or a task target, or has bad dtypes.

    Checks the formats of :class:`TaskSpec`: ``image`` float32 ``[H, W, C]``; classification
    int32 scalar; segmentation int32 ``[H, W]``; depth float32 ``[H, W, 1]``; normals float32
    ``[H, W, 3]``.
    """
    expected = {"image": (np.float32, 3)}
    for task in tasks:
        expected[task.name] = {
            "classification": (np.int32, 0),
            "segmentation": (np.int32, 2),
            "depth": (np.float32, 3),
            "normals": (np.float32, 3),
        }[task.kind]
    for key, (dtype, ndim) in expected.items():
        if key not in example:
            raise DataError(f"{where}: example has no {key!r}; keys: {sorted(example)}.")
        value = np.asarray(example[key])
        if value.dtype != dtype or value.ndim != ndim:
            raise DataError(
                f"{where}: example[{key!r}] is {value.dtype}{list(value.shape)}; "
                f"expected {np.dtype(dtype)} with {ndim} dimensions."
            )


def check_label_range(labels: np.ndarray, task: TaskSpec, where: str) -> None:
    """Raises :class:`DataError` when class labels fall outside ``[0, num_classes)``.

    Labels are indices (one-hot encodings, ``take_along_axis``): a negative one or one past the
    class count would silently wrap or be dropped. Segmentation maps may also hold -1 (ignore).
    """
    if task.kind not in ("classification", "segmentation") or not np.size(labels):
        return
    lowest = -1 if task.kind == "segmentation" else 0
    low, high = int(np.min(labels)), int(np.max(labels))
    if low < lowest or high >= task.num_classes:
        allowed = "-1 (ignore) or " if lowest < 0 else ""
        raise DataError(
            f"{where}: task {task.name!r} has labels in [{low}, {high}], but a {task.kind} "
            f"label must be {allowed}a class index in [0, {task.num_classes - 1}] "
            f"(num_classes={task.num_classes}); relabel the classes as 0..num_classes-1."
        )
