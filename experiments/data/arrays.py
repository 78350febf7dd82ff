"""``arrays``: your own multi-task data from one local ``.npz`` file, without editing the package.

    python -m experiments.run --config experiments/configs/default.py:dataset=arrays,model=small_cnn \
        --config.dataset.path=my_data.npz --workdir workdirs/mine

The file holds NumPy arrays named by split and key (``numpy.savez(path, **arrays)``):

* ``train_image``, ``test_image`` (and optionally ``val_image``): ``[N, H, W]`` or
  ``[N, H, W, C]``; ``uint8`` is scaled to ``[0, 1]``, floating point is used as is;
* one array per task and split, ``train_<task>``, ``test_<task>`` (``val_<task>``), whose dtype
  and shape give the task's kind (:class:`~experiments.tasks.TaskSpec`):

  ==========================  ===============================================================
  target array                task
  ==========================  ===============================================================
  integer ``[N]``             classification; labels ``0 .. num_classes - 1``
  integer ``[N, H, W]``       segmentation; labels ``0 .. num_classes - 1``, -1 = ignore
  float ``[N, H, W, 1]``      depth (0 = missing)
  float ``[N, H, W, 3]``      normals (all-zero = missing)
  ==========================  ===============================================================

A task's class count is the integer scalar ``num_classes_<task>`` when the file has one (a class
absent from the training split still gets its logit), else the largest label + 1 over all splits.
Labels outside ``[0, num_classes)`` (or below -1 for segmentation) are refused when the data is
loaded; so are float class labels, pickled (object) arrays and arrays of unequal length, each with
a :class:`~experiments.data.core.DataError` naming the array and the fix.

``tasks`` (comma-separated names) chooses and orders the tasks; empty = every task found, in
sorted order. Which examples are train and test is the file's: nothing is re-split. For other
formats, register a builder from your config file with
:func:`experiments.data.register_dataset` (the config file is Python and runs first).
"""

from __future__ import annotations

import os

import numpy as np

from experiments.data.core import ArraySource, DataError, MultiTaskData, check_label_range, first_n
from experiments.tasks import TaskSpec

__all__ = ["DEFAULTS", "build", "given_num_classes", "read_npz", "task_from_targets"]

DEFAULTS = {
    "path": "",
    "tasks": "",
    "split_seed": 0,
    "max_train_examples": 0,
    "max_test_examples": 0,
}

SPLITS = ("train", "val", "test")


def task_from_targets(
    name: str, targets: list[np.ndarray], num_classes: int | None = None
) -> TaskSpec:
    """The :class:`TaskSpec` a task's target arrays (all splits) describe (table above);
    ``num_classes`` given, or the largest label + 1."""
    first = targets[0]
    integer = np.issubdtype(first.dtype, np.integer)
    if integer and first.ndim in (1, 3):
        if num_classes is None:
            num_classes = max(int(max(int(np.max(t)) for t in targets if t.size)) + 1, 2)
        elif num_classes < 2:
            raise DataError(
                f"Task {name!r}: num_classes_{name} is {num_classes}; a classification or "
                "segmentation task needs at least 2 classes."
            )
        kind = "classification" if first.ndim == 1 else "segmentation"
        return TaskSpec(name, kind, num_classes)
    if np.issubdtype(first.dtype, np.floating) and first.ndim == 4 and first.shape[-1] in (1, 3):
        return TaskSpec(name, "depth" if first.shape[-1] == 1 else "normals")
    hint = ""
    if np.issubdtype(first.dtype, np.floating) and first.ndim in (1, 3):
        hint = (
            f" Class labels must be integers: save train_{name} / test_{name} with "
            ".astype(np.int64)."
        )
    raise DataError(
        f"Task {name!r}: targets of dtype {first.dtype} and shape {first.shape} match no task "
        "kind; use integer [N] (classification), integer [N, H, W] (segmentation), float "
        f"[N, H, W, 1] (depth) or float [N, H, W, 3] (normals).{hint}"
    )


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, never unpickling (object arrays are refused)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # not a NumPy file, truncated, or a pickle
        raise DataError(
            f"{path} cannot be read as an .npz archive ({type(e).__name__}: {e}); write it with "
            "numpy.savez."
        ) from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} is a single .npy array, not an .npz archive; save the arrays with "
            "numpy.savez(path, train_image=..., test_image=..., train_<task>=..., ...)."
        )
    arrays = {}
    with loaded as f:
        for key in f.files:
            try:
                arrays[key] = f[key]
            except ValueError as e:  # numpy: "Object arrays cannot be loaded ..."
                raise DataError(
                    f"{path}: array {key!r} holds Python objects (a pickled object array), "
                    "which are not loaded; save it as a numeric array (e.g. "
                    "np.asarray(values, np.int64) or np.stack(images)) before numpy.savez."
                ) from e
    return arrays


def given_num_classes(arrays: dict[str, np.ndarray], task: str, path: str) -> int | None:
    """The class count the file gives for ``task`` (the scalar ``num_classes_<task>``), if any."""
    key = f"num_classes_{task}"
    if key not in arrays:
        return None
    value = arrays[key]
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise DataError(
            f"{path}: {key} must be an integer scalar (np.int64(10)); got {value.dtype} of "
            f"shape {value.shape}."
        )
    return int(value)


def _images(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise DataError(f"Images must be [N, H, W] or [N, H, W, C]; got shape {array.shape}.")
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
      DataError: no ``path``, a missing or unreadable file, a missing array, a pickled array,
        arrays of unequal length, targets that match no task kind, or labels out of range --
        each message names the file, array and fix.
    """
    if not path:
        raise DataError(
            "The 'arrays' data set needs --config.dataset.path=<file.npz> (arrays train_image, "
            "test_image, train_<task>, test_<task>; see experiments/data/arrays.py)."
        )
    if not os.path.isfile(path):
        raise DataError(
            f"The 'arrays' data set: {path!r} does not exist or is not a file; give "
            "--config.dataset.path the .npz written by numpy.savez (relative paths start at "
            f"{os.getcwd()})."
        )
    arrays = read_npz(path)
    for split in ("train", "test"):
        if f"{split}_image" not in arrays:
            raise DataError(
                f"{path}: no array {split}_image; found {sorted(arrays)}. Save the images as "
                "train_image / test_image."
            )
    found = sorted(
        k[len("train_") :] for k in arrays if k.startswith("train_") and k != "train_image"
    )
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else found
    absent = [f"{s}_{n}" for n in names for s in ("train", "test") if f"{s}_{n}" not in arrays]
    if absent or not names:
        raise DataError(
            f"{path}: every task needs a train_<task> and a test_<task> array; missing "
            f"{absent or ['train_<task>']}. Tasks found (from train_*): {found}; add the missing "
            "arrays, or choose tasks with --config.dataset.tasks=<name,...>."
        )
    splits = [s for s in SPLITS if f"{s}_image" in arrays]
    specs = tuple(
        task_from_targets(
            n,
            [arrays[f"{s}_{n}"] for s in splits if f"{s}_{n}" in arrays],
            given_num_classes(arrays, n, path),
        )
        for n in names
    )
    sources = {}
    for split in splits:
        columns = {"image": _images(arrays[f"{split}_image"])}
        for spec in specs:
            target = arrays[f"{split}_{spec.name}"]
            check_label_range(target, spec, f"{path}, array {split}_{spec.name}")
            integer = spec.kind in ("classification", "segmentation")
            columns[spec.name] = target.astype(np.int32 if integer else np.float32)
        try:
            sources[split] = ArraySource(columns)
        except DataError as e:
            raise DataError(f"{path}, split {split!r}: {e}") from e
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
