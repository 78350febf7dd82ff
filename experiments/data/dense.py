"""``nyuv2`` and ``cityscapes``: dense prediction from the preprocessed .npy folders of MTAN.

The folders are the ones released with MTAN (Liu et al. 2019, lorenmt/mtan) and used unchanged
by CAGrad (Cranial-XIX/CAGrad) and LibMTL (median-research-group/LibMTL): one ``.npy`` file per
image and target, numbered from 0::

    <root>/train/image/<i>.npy    float  [H, W, 3]  RGB in [0, 1]
    <root>/train/label/<i>.npy    float  [H, W]     class id, -1 = ignore      (NYUv2: 13 classes)
    <root>/train/depth/<i>.npy    float  [H, W, 1]  depth, 0 = missing
    <root>/train/normal/<i>.npy   float  [H, W, 3]  unit normal, 0 = missing   (NYUv2 only)
    <root>/val/...                the same; the literature's "val" folder is its test set

* NYUv2 (MTAN ``nyuv2.zip``): 795 train / 654 val images of 288x384; tasks ``segmentation``
  (13 classes), ``depth`` and ``normals``.
* CityScapes (MTAN ``cityscapes2.zip``, 128x256): 2,975 train / 500 val; the segmentation labels
  are in ``label_7`` (7 classes; CAGrad reads these), ``label_19`` and ``label_2``, and LibMTL's
  re-packaged copy has the 7-class labels in ``label``; tasks ``segmentation`` and ``depth``
  (MTAN's inverse depth, 0 = missing).

Examples: ``{"image": float32[H, W, 3], "segmentation": int32[H, W] (-1 = ignore), "depth":
float32[H, W, 1], "normals": float32[H, W, 3]}`` (no ``normals`` for CityScapes). Images are
used as stored (already in [0, 1]; uint8 files are divided by 255). ``downsample`` = f > 1 is a
departure for quick CPU runs: the image is averaged over f x f blocks and the targets keep the
top-left pixel of each block (nearest neighbour, so ignore/missing markers survive).
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import numpy as np

from experiments.data.core import Example, MultiTaskData, check_example, first_n
from experiments.tasks import TaskSpec

__all__ = ["CITYSCAPES_DEFAULTS", "NYUV2_DEFAULTS", "build_cityscapes", "build_nyuv2"]

NYUV2_DEFAULTS = {
    "root": "data/nyuv2",
    "downsample": 1,
    "split_seed": 0,
    "max_train_examples": 0,
    "max_test_examples": 0,
}

CITYSCAPES_DEFAULTS = {
    "root": "data/cityscapes",
    "num_classes": 7,
    "downsample": 1,
    "split_seed": 0,
    "max_train_examples": 0,
    "max_test_examples": 0,
}

_DOWNLOADS = {
    "nyuv2": (
        "the preprocessed NYUv2 of MTAN, nyuv2.zip (288x384, 795 train / 654 val): "
        "https://www.dropbox.com/s/p2nn02wijg7peiy/nyuv2.zip (linked from the READMEs of "
        "lorenmt/mtan, Cranial-XIX/CAGrad and median-research-group/LibMTL examples/nyu)"
    ),
    "cityscapes": (
        "the preprocessed CityScapes of MTAN, cityscapes2.zip (128x256, 2,975 train / 500 val): "
        "https://www.dropbox.com/s/lg2ktu7o8hzwf99/cityscapes2.zip (linked from the READMEs of "
        "lorenmt/mtan, Cranial-XIX/CAGrad and median-research-group/LibMTL examples/cityscapes)"
    ),
}


def _layout(folders: dict[str, str]) -> str:
    lines = [
        f"  <root>/{split}/{folder}/<i>.npy"
        for split in ("train", "val")
        for folder in folders.values()
    ]
    return "\n".join(lines)


def _missing_error(
    dataset: str, root: str, problem: str, folders: dict[str, str]
) -> FileNotFoundError:
    return FileNotFoundError(
        f"{dataset}: {problem}.\n"
        f"Download {_DOWNLOADS[dataset]},\n"
        f"unzip it and point the config key `root` at the folder "
        f"(--config.dataset.root=/path/to/{dataset}); it must contain\n{_layout(folders)}\n"
        "with i = 0 .. N-1 in every folder."
    )


def _count_files(dataset: str, root: str, split: str, folders: dict[str, str]) -> int:
    """Checks ``<root>/<split>/<folder>/{0..N-1}.npy`` for every folder; returns N."""
    counts = {}
    for folder in folders.values():
        path = os.path.join(root, split, folder)
        if not os.path.isdir(path):
            raise _missing_error(dataset, root, f"folder {path!r} not found", folders)
        names = set(fnmatch.filter(os.listdir(path), "*.npy"))
        if names != {f"{i}.npy" for i in range(len(names))}:
            raise _missing_error(
                dataset,
                root,
                f"{path!r} does not hold files 0.npy .. {len(names) - 1}.npy",
                folders,
            )
        counts[folder] = len(names)
    if len(set(counts.values())) != 1 or not next(iter(counts.values())):
        raise _missing_error(
            dataset, root, f"{root}/{split} has unequal or zero file counts {counts}", folders
        )
    return next(iter(counts.values()))


def _downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, -1)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _downsample_target(target: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return target
    h, w = target.shape[0] // factor, target.shape[1] // factor
    return target[: h * factor : factor, : w * factor : factor]


class NpyFolder:
    """Random access to ``<root>/<split>/<folder>/<i>.npy``, converted to the TaskSpec formats.

    Args:
      root: the data set folder.
      split: ``"train"`` or ``"val"``.
      folders: ``{task or "image": subfolder}``, e.g. ``{"image": "image", "segmentation":
        "label_7", "depth": "depth"}``.
      tasks: the tasks, for their kinds.
      size: number of files per folder (from :func:`_count_files`).
      downsample: the ``downsample`` factor.
    """

    def __init__(
        self,
        root: str,
        split: str,
        folders: dict[str, str],
        tasks: tuple[TaskSpec, ...],
        size: int,
        downsample: int,
    ):
        self.root, self.split, self.folders = root, split, dict(folders)
        self.kinds = {task.name: task.kind for task in tasks}
        self.size, self.downsample = size, downsample

    def __len__(self) -> int:
        return self.size

    def _load(self, key: str, index: int) -> np.ndarray:
        return np.load(os.path.join(self.root, self.split, self.folders[key], f"{index}.npy"))

    def _convert(self, key: str, value: np.ndarray, index: int) -> np.ndarray:
        kind = self.kinds.get(key, "image")
        where = f"{self.root}/{self.split}/{self.folders[key]}/{index}.npy"
        if kind == "depth" and value.ndim == 2:
            value = value[..., None]
        expected_ndim = 2 if kind == "segmentation" else 3
        channels = {"image": 3, "depth": 1, "normals": 3}.get(kind)
        if value.ndim != expected_ndim or (channels and value.shape[-1] != channels):
            layout = "[H, W]" if kind == "segmentation" else f"[H, W, {channels}]"
            raise ValueError(f"{where}: expected {kind} of shape {layout}; got {value.shape}.")
        if kind == "image":
            scale = 255.0 if value.dtype == np.uint8 else 1.0
            return _downsample_image(value.astype(np.float32) / np.float32(scale), self.downsample)
        if kind == "segmentation":
            labels = np.rint(value).astype(np.int32)
            labels[labels < 0] = -1
            return _downsample_target(labels, self.downsample)
        return _downsample_target(value.astype(np.float32), self.downsample)

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples.")
        example = {key: self._convert(key, self._load(key, index), index) for key in self.folders}
        shapes = {key: value.shape[:2] for key, value in example.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(
                f"{self.root}/{self.split} example {index}: spatial sizes differ: {shapes}."
            )
        return example


def _check_class_ids(example: Example, tasks: tuple[TaskSpec, ...], where: str) -> None:
    """Segmentation ids must lie in ``-1 .. num_classes - 1`` (catches a wrong label folder)."""
    for task in tasks:
        if task.kind == "segmentation":
            ids = example[task.name]
            if ids.size and (ids.min() < -1 or ids.max() >= task.num_classes):
                raise ValueError(
                    f"{where}: {task.name} ids span {ids.min()}..{ids.max()}, outside -1.."
                    f"{task.num_classes - 1} (-1 = ignore)."
                )


def _build_dense(
    dataset: str,
    name: str,
    root: str,
    folders: dict[str, str],
    tasks: tuple[TaskSpec, ...],
    downsample: int,
    split_seed: int,
    max_train_examples: int,
    max_test_examples: int,
    extra_info: dict[str, Any],
) -> MultiTaskData:
    if downsample < 1:
        raise ValueError(f"{dataset}: downsample must be >= 1; got {downsample}.")
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise _missing_error(dataset, root, f"folder {root!r} not found", folders)
    sources = {}
    for split in ("train", "val"):
        size = _count_files(dataset, root, split, folders)
        sources[split] = NpyFolder(root, split, folders, tasks, size, downsample)
    first = sources["train"][0]
    check_example(first, tasks, f"{dataset} {root}/train/0")
    _check_class_ids(first, tasks, f"{dataset} {root}/train/0")
    train = first_n(sources["train"], max_train_examples)
    test = first_n(sources["val"], max_test_examples)
    return MultiTaskData(
        name=name,
        tasks=tasks,
        train=train,
        test=test,
        val=None,
        input_shape=tuple(first["image"].shape),
        info={
            "source": f"preprocessed .npy folders of MTAN/CAGrad/LibMTL at {root}",
            "sizes": {"train": len(train), "test": len(test)},
            "test_folder": "val (the literature's test set)",
            "folders": dict(folders),
            "split_seed": split_seed,
            "downsample": downsample,
            **extra_info,
        },
    )


def build_nyuv2(
    *,
    name: str = "nyuv2",
    root: str,
    downsample: int,
    split_seed: int,
    max_train_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """NYUv2: 13-class segmentation, depth and surface normals (see the module docstring)."""
    tasks = (
        TaskSpec("segmentation", "segmentation", 13),
        TaskSpec("depth", "depth"),
        TaskSpec("normals", "normals"),
    )
    folders = {"image": "image", "segmentation": "label", "depth": "depth", "normals": "normal"}
    return _build_dense(
        "nyuv2", name, root, folders, tasks, downsample, split_seed,
        max_train_examples, max_test_examples, {},
    )  # fmt: skip


def build_cityscapes(
    *,
    name: str = "cityscapes",
    root: str,
    num_classes: int,
    downsample: int,
    split_seed: int,
    max_train_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """CityScapes: ``num_classes``-class segmentation (7, 19 or 2) and depth.

    The labels come from ``label_<num_classes>``; for 7 classes, LibMTL's ``label`` folder is used
    when ``label_7`` is absent.
    """
    if num_classes not in (2, 7, 19):
        raise ValueError(f"cityscapes: num_classes must be 2, 7 or 19; got {num_classes}.")
    label_folder = f"label_{num_classes}"
    root_path = os.path.expanduser(str(root))
    if num_classes == 7 and not os.path.isdir(os.path.join(root_path, "train", label_folder)):
        if os.path.isdir(os.path.join(root_path, "train", "label")):
            label_folder = "label"  # LibMTL's copy
    tasks = (TaskSpec("segmentation", "segmentation", num_classes), TaskSpec("depth", "depth"))
    folders = {"image": "image", "segmentation": label_folder, "depth": "depth"}
    return _build_dense(
        "cityscapes", name, root, folders, tasks, downsample, split_seed,
        max_train_examples, max_test_examples, {"num_classes": num_classes},
    )  # fmt: skip
