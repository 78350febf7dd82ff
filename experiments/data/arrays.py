"""``arrays``: your own multi-task data from one local ``.npz`` file, without editing the package.

    python -m experiments.run --config.dataset.name=arrays --config.dataset.path=my_data.npz \
        --config.model.name=small_cnn --workdir workdirs/mine

The file holds NumPy arrays named by split and key (``numpy.savez(path, **arrays)``):

* ``train_image``, ``test_image`` (and optionally ``val_image``): ``[N, H, W]`` or
  ``[N, H, W, C]``; ``uint8`` is scaled to ``[0, 1]``, floating point is used as is;
* one array per task and split, ``train_<task>``, ``test_<task>`` (``val_<task>``), whose dtype
  and shape give the task's kind (:class:`~experiments.tasks.TaskSpec`):

  ==========================  ===============================================================
  target array                task
  ==========================  ===============================================================
  integer ``[N]``             classification; ``num_classes`` = largest label + 1
  integer ``[N, H, W]``       segmentation (-1 = ignore); ``num_classes`` = largest label + 1
  float ``[N, H, W, 1]``      depth (0 = missing)
  float ``[N, H, W, 3]``      normals (all-zero = missing)
  ==========================  ===============================================================

``tasks`` (comma-separated names) chooses and orders the tasks; empty = every task found, in
sorted order. Which examples are train and test is the file's: nothing is re-split. For other
formats, register a builder from your config file with
:func:`experiments.data.register_dataset` (the config file is Python and runs first).
"""

from __future__ import annotations

import os

import numpy as np

from experiments.data.core import ArraySource, MultiTaskData, first_n
from experiments.tasks import TaskSpec

__all__ = ["DEFAULTS", "build", "task_from_targets"]

DEFAULTS = {
    "path": "",
    "tasks": "",
    "split_seed": 0,
    "max_train_examples": 0,
    "max_test_examples": 0,
}

SPLITS = ("train", "val", "test")


def task_from_targets(name: str, targets: list[np.ndarray]) -> TaskSpec:
    """The :class:`TaskSpec` a task's target arrays (all splits) describe (table above)."""
    first = targets[0]
    integer = np.issubdtype(first.dtype, np.integer)
    if integer and first.ndim in (1, 3):
        classes = int(max(int(np.max(t)) for t in targets if t.size)) + 1
        kind = "classification" if first.ndim == 1 else "segmentation"
        return TaskSpec(name, kind, max(classes, 2))
    if np.issubdtype(first.dtype, np.floating) and first.ndim == 4 and first.shape[-1] in (1, 3):
        return TaskSpec(name, "depth" if first.shape[-1] == 1 else "normals")
    raise ValueError(
        f"Task {name!r}: targets of dtype {first.dtype} and shape {first.shape} match no task "
        "kind; use integer [N] (classification), integer [N, H, W] (segmentation), float "
        "[N, H, W, 1] (depth) or float [N, H, W, 3] (normals)."
    )


def _images(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"Images must be [N, H, W] or [N, H, W, C]; got shape {array.shape}.")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def build(
    *,
    name: str,
    path: str,
    tasks: str,
    split_seed: int,
    max_train_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """Reads ``path`` (see the module docstring).

    Raises:
      ValueError: no ``path``, a missing file or array, arrays of unequal length, or targets that
        match no task kind -- each message names the file, array and fix.
    """
    if not path:
        raise ValueError(
            "The 'arrays' data set needs --config.dataset.path=<file.npz> (arrays train_image, "
            "test_image, train_<task>, test_<task>; see experiments/data/arrays.py)."
        )
    if not os.path.exists(path):
        raise ValueError(f"The 'arrays' data set: {path!r} does not exist.")
    with np.load(path) as f:
        arrays = {key: f[key] for key in f.files}
    for split in ("train", "test"):
        if f"{split}_image" not in arrays:
            raise ValueError(
                f"{path}: no array {split}_image; found {sorted(arrays)}. Save the images as "
                "train_image / test_image."
            )
    found = sorted(
        k[len("train_") :] for k in arrays if k.startswith("train_") and k != "train_image"
    )
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else found
    missing = [n for n in names if f"train_{n}" not in arrays or f"test_{n}" not in arrays]
    if missing or not names:
        raise ValueError(
            f"{path}: tasks {missing or names} need arrays train_<task> and test_<task>; tasks "
            f"found: {found}."
        )
    splits = [s for s in SPLITS if f"{s}_image" in arrays]
    specs = tuple(
        task_from_targets(n, [arrays[f"{s}_{n}"] for s in splits if f"{s}_{n}" in arrays])
        for n in names
    )
    sources = {}
    for split in splits:
        columns = {"image": _images(arrays[f"{split}_image"])}
        for spec in specs:
            target = arrays[f"{split}_{spec.name}"]
            integer = spec.kind in ("classification", "segmentation")
            columns[spec.name] = target.astype(np.int32 if integer else np.float32)
        try:
            sources[split] = ArraySource(columns)
        except ValueError as e:
            raise ValueError(f"{path}, split {split!r}: {e}") from e
    train = first_n(sources["train"], max_train_examples)
    test = first_n(sources["test"], max_test_examples)
    return MultiTaskData(
        name=name,
        tasks=specs,
        train=train,
        test=test,
        val=sources.get("val"),
        input_shape=tuple(sources["train"].arrays["image"].shape[1:]),
        info={
            "source": f"local arrays {os.path.abspath(path)}",
            "sizes": {s: len(src) for s, src in (("train", train), ("test", test))},
            "split_seed": split_seed,
            "preprocessing": "uint8 images / 255; float images as stored",
        },
    )
