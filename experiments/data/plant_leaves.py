"""``plant_leaves``: leaf photographs split into two tasks, species (12 classes) and health (2).

From TFDS ``plant_leaves`` (v0.1.1; Chouhan et al. 2019, Mendeley hb74ynkjcn): one ``train``
split of 4,502 6000x4000 RGB JPEGs with 22 labels, the TFDS label order of :data:`LABELS`
(healthy 0..10, diseased 11..21; docs/design/METHODS.md). The two tasks of Alison et al. (CommIT 2024):

* ``species``: the P-code of the plant, P0..P11 (12 classes). Bael (P4) has only diseased images,
  Basil (P8) only healthy ones.
* ``health``: 0 = healthy (label 0..10), 1 = diseased (label >= 11).

There is no official split, and the paper's is unknown: :func:`build` makes a fixed split by
``split_seed``, stratified on the 22 labels (``val_fraction`` and ``test_fraction`` of every label,
default 70/15/15). Images are resized to ``image_size`` x ``image_size`` (bilinear, antialiased,
aspect ratio 3:2 not kept) and scaled to [0, 1]. Reading the labels for the split scans every
record once with the image left undecoded. With ``jpeg_draft`` the JPEGs are decoded by Pillow
directly at reduced size (its *draft* mode), and with ``cache_images`` each resized image is kept
in memory after its first read (4,502 x 64 x 64 x 3 bytes = 55 MB at 64 px), so only the first
epoch pays for decoding.

Example: ``{"image": float32[S, S, 3], "species": int32 in 0..11, "health": int32 in {0, 1}}``.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np

from experiments.data.core import (
    Example,
    MultiTaskData,
    RandomAccess,
    first_n,
    map_source,
    stratified_split,
    take,
)
from experiments.data.images import decode_resized, to_unit_float
from experiments.data.tfds_io import open_split
from experiments.tasks import TaskSpec

__all__ = ["DEFAULTS", "HEALTH", "LABELS", "SPECIES", "TASKS", "build"]

# TFDS label index -> class name (datasets/plant_leaves builder, file prefixes 0001..0022).
LABELS = (
    "Mango (P0) healthy", "Arjun (P1) healthy", "Alstonia Scholaris (P2) healthy",
    "Gauva (P3) healthy", "Jamun (P5) healthy", "Jatropha (P6) healthy",
    "Pongamia Pinnata (P7) healthy", "Basil (P8) healthy", "Pomegranate (P9) healthy",
    "Lemon (P10) healthy", "Chinar (P11) healthy", "Mango (P0) diseased", "Arjun (P1) diseased",
    "Alstonia Scholaris (P2) diseased", "Gauva (P3) diseased", "Bael (P4) diseased",
    "Jamun (P5) diseased", "Jatropha (P6) diseased", "Pongamia Pinnata (P7) diseased",
    "Pomegranate (P9) diseased", "Lemon (P10) diseased", "Chinar (P11) diseased",
)  # fmt: skip

SPECIES = np.array([int(re.search(r"\(P(\d+)\)", n).group(1)) for n in LABELS], np.int32)
HEALTH = np.array([0 if n.endswith("healthy") else 1 for n in LABELS], np.int32)

TASKS = (
    TaskSpec("species", "classification", 12),
    TaskSpec("health", "classification", 2),
)

DEFAULTS = {
    "image_size": 64,
    "val_fraction": 0.15,
    "test_fraction": 0.15,
    "split_seed": 0,
    "jpeg_draft": True,
    "cache_images": True,
    "data_dir": None,
    "download": True,
    "max_train_examples": 0,
    "max_val_examples": 0,
    "max_test_examples": 0,
}


class _ResizedImages:
    """``images[i]``: record ``i``'s image as ``uint8[S, S, 3]``, optionally kept after first use."""

    def __init__(self, source: RandomAccess, image_size: int, cache: bool):
        self.source, self.size, self.cache = source, (image_size, image_size), cache
        self._memo: dict[int, tuple[np.ndarray, int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = int(index)
        if index in self._memo:
            return self._memo[index]
        example = self.source[index]
        item = decode_resized(example["image"], self.size, channels=3), int(example["label"])
        if self.cache:
            with self._lock:
                self._memo[index] = item
        return item

    def __getstate__(self) -> dict[str, Any]:  # picklable for grain worker processes
        return {"source": self.source, "size": self.size, "cache": self.cache}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.source, self.size, self.cache = state["source"], state["size"], state["cache"]
        self._memo, self._lock = {}, threading.Lock()


def _to_example(item: tuple[np.ndarray, int]) -> Example:
    image, label = item
    return {
        "image": to_unit_float(image),
        "species": SPECIES[label],
        "health": HEALTH[label],
    }


def _check_label_names(source: RandomAccess) -> None:
    """Checks the TFDS label names against :data:`LABELS` (when the info is readable)."""
    info = getattr(getattr(source, "source", None), "dataset_info", None)
    try:
        names = tuple(info.features["label"].names)
    except (AttributeError, KeyError, TypeError):
        return
    if names != LABELS:
        raise ValueError(
            f"plant_leaves: TFDS label names {names} differ from the expected {LABELS}."
        )


def read_labels(source: RandomAccess) -> np.ndarray:
    """``int64[N]`` TFDS label of every record (one pass over the records)."""
    labels = np.array([int(source[i]["label"]) for i in range(len(source))], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(LABELS)):
        raise ValueError(f"plant_leaves: labels outside 0..{len(LABELS) - 1}: {np.unique(labels)}.")
    return labels


def build(
    *,
    name: str = "plant_leaves",
    image_size: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    jpeg_draft: bool,
    cache_images: bool,
    data_dir: str | None,
    download: bool,
    max_train_examples: int,
    max_val_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """Builds the two-task plant_leaves data with a stratified split (see the module docstring)."""
    if image_size < 1:
        raise ValueError(f"plant_leaves: image_size must be >= 1; got {image_size}.")
    if val_fraction < 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            "plant_leaves: need val_fraction >= 0, test_fraction > 0 and val_fraction + "
            f"test_fraction < 1; got {val_fraction}, {test_fraction}."
        )
    import tensorflow_datasets as tfds

    skip = {"image": tfds.decode.SkipDecoding()}
    undecoded = open_split(
        "plant_leaves", "train", data_dir=data_dir, download=download, decoders=skip
    )
    _check_label_names(undecoded)
    labels = read_labels(undecoded)
    reader = (
        undecoded
        if jpeg_draft
        else open_split("plant_leaves", "train", data_dir=data_dir, download=download)
    )
    images = _ResizedImages(reader, image_size, cache_images)

    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    train_idx, val_idx, test_idx = stratified_split(labels, fractions, split_seed)
    limited = {
        "train": first_n(take(images, train_idx), max_train_examples),
        "val": first_n(take(images, val_idx), max_val_examples),
        "test": first_n(take(images, test_idx), max_test_examples),
    }
    splits = {key: map_source(src, _to_example) for key, src in limited.items()}
    return MultiTaskData(
        name=name,
        tasks=TASKS,
        train=splits["train"],
        test=splits["test"],
        val=splits["val"] if len(val_idx) else None,
        input_shape=(image_size, image_size, 3),
        info={
            "source": "TFDS plant_leaves (single train split) via tfds.data_source",
            "sizes": {key: len(src) for key, src in splits.items()},
            "records": len(labels),
            "split": f"stratified on the 22 labels, fractions {fractions}",
            "split_seed": split_seed,
            "label_counts": np.bincount(labels, minlength=len(LABELS)).tolist(),
            "preprocessing": f"resize to {image_size}x{image_size} (Pillow bilinear), / 255 -> [0, 1]",
        },
    )
