"""``celeb_a``: CelebA faces, one binary task per attribute (40, or a chosen subset).

From TFDS ``celeb_a`` (v2.1.0; aligned and cropped 218x178 RGB JPEGs; official splits: 162,770
train, 19,867 validation, 19,962 test) through ``tfds.data_source``. Every attribute is a binary
classification task (``0`` = absent, ``1`` = present), named by its CelebA attribute name.

Attribute order: :data:`ATTRIBUTES`, the column order of CelebA's ``list_attr_celeba.txt`` (the
order used by the papers: "the first 10" in ST means ``ATTRIBUTES[:10]``). It coincides with the
sorted order of the TFDS feature dict; :func:`build` checks that. ``attributes`` selects and orders
a subset by name; otherwise ``num_tasks`` takes the first ``num_tasks``.

Images: resized to ``image_size`` x ``image_size`` (bilinear, antialiased, aspect ratio not kept,
as in Sener & Koltun's 64x64 loader) and scaled to [0, 1]. With ``jpeg_draft`` the stored JPEG is
read undecoded (``tfds.decode.SkipDecoding``) and decoded by Pillow at reduced size (its *draft*
mode), which is faster and gives pixels within a few grey levels of a full decode + resize.
``split_seed`` is accepted for uniformity and unused: CelebA has official splits.

Example: ``{"image": float32[S, S, 3], "<attribute>": int32 in {0, 1}, ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.data.core import Example, MultiTaskData, RandomAccess, first_n, map_source
from experiments.data.images import decode_resized, to_unit_float
from experiments.data.tfds_io import open_split
from experiments.tasks import TaskSpec

__all__ = ["ATTRIBUTES", "DEFAULTS", "build", "select_attributes"]

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip

DEFAULTS = {
    "image_size": 64,
    "num_tasks": 40,
    "attributes": (),
    "jpeg_draft": True,
    "data_dir": None,
    "download": True,
    "split_seed": 0,
    "max_train_examples": 0,
    "max_val_examples": 0,
    "max_test_examples": 0,
}


def select_attributes(num_tasks: int, attributes: Sequence[str]) -> tuple[str, ...]:
    """The attribute tasks: ``attributes`` when given, else the first ``num_tasks``.

    Raises:
      ValueError: for an unknown or repeated attribute name, or ``num_tasks`` outside 1..40.
    """
    if attributes:
        if isinstance(attributes, str):
            attributes = (attributes,)
        unknown = [a for a in attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"celeb_a: unknown attributes {unknown}; valid: {list(ATTRIBUTES)}.")
        if len(set(attributes)) != len(attributes):
            raise ValueError(f"celeb_a: attributes repeat a name: {list(attributes)}.")
        return tuple(attributes)
    if not 1 <= num_tasks <= len(ATTRIBUTES):
        raise ValueError(f"celeb_a: num_tasks must be in 1..{len(ATTRIBUTES)}; got {num_tasks}.")
    return ATTRIBUTES[:num_tasks]


class _Preprocess:
    """TFDS celeb_a example -> ``{"image": float32[S, S, 3], attribute: int32, ...}``."""

    def __init__(self, attributes: tuple[str, ...], image_size: int):
        self.attributes, self.image_size = attributes, image_size

    def __call__(self, example: dict[str, Any]) -> Example:
        size = (self.image_size, self.image_size)
        out = {"image": to_unit_float(decode_resized(example["image"], size, channels=3))}
        flags = example["attributes"]
        for name in self.attributes:
            out[name] = np.int32(bool(flags[name]))
        return out


def _check_feature_order(source: RandomAccess) -> None:
    """Checks that the TFDS attribute names are :data:`ATTRIBUTES` (when the info is readable)."""
    info = getattr(getattr(source, "source", None), "dataset_info", None)
    try:
        names = tuple(info.features["attributes"].keys())
    except (AttributeError, KeyError, TypeError):
        return
    if sorted(names) != sorted(ATTRIBUTES):
        raise ValueError(f"celeb_a: TFDS attribute names {names} differ from {ATTRIBUTES}.")


def build(
    *,
    name: str = "celeb_a",
    image_size: int,
    num_tasks: int,
    attributes: Sequence[str],
    jpeg_draft: bool,
    data_dir: str | None,
    download: bool,
    split_seed: int,
    max_train_examples: int,
    max_val_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """Builds CelebA with the chosen attribute tasks (see the module docstring)."""
    if image_size < 1:
        raise ValueError(f"celeb_a: image_size must be >= 1; got {image_size}.")
    chosen = select_attributes(num_tasks, attributes)
    decoders = None
    if jpeg_draft:
        import tensorflow_datasets as tfds

        decoders = {"image": tfds.decode.SkipDecoding()}
    preprocess = _Preprocess(chosen, image_size)
    limits = {
        "train": max_train_examples,
        "validation": max_val_examples,
        "test": max_test_examples,
    }
    splits = {}
    for split, limit in limits.items():
        raw = open_split("celeb_a", split, data_dir=data_dir, download=download, decoders=decoders)
        _check_feature_order(raw)
        splits[split] = map_source(first_n(raw, limit), preprocess)
    return MultiTaskData(
        name=name,
        tasks=tuple(TaskSpec(a, "classification", 2) for a in chosen),
        train=splits["train"],
        test=splits["test"],
        val=splits["validation"],
        input_shape=(image_size, image_size, 3),
        info={
            "source": "TFDS celeb_a (official train/validation/test splits) via tfds.data_source",
            "sizes": {
                "train": len(splits["train"]),
                "val": len(splits["validation"]),
                "test": len(splits["test"]),
            },
            "attributes": list(chosen),
            "attribute_order": "list_attr_celeba.txt column order (= sorted TFDS feature order)",
            "split_seed": split_seed,
            "preprocessing": f"resize to {image_size}x{image_size} (Pillow bilinear), / 255 -> [0, 1]",
        },
    )
