"""Opening TFDS data sets as random-access sources (``tfds.data_source``), without TensorFlow.

``tfds.data_source`` reads the ArrayRecord files of a prepared data set and decodes examples with
NumPy/Pillow; it needs no TensorFlow. When the data set is not prepared yet it downloads and
prepares it (``download=True``), which for some builders needs manual steps; the error raised then
is re-raised with the data set name, the data directory and what to do.
"""

from __future__ import annotations

from typing import Any

from absl import logging

__all__ = ["OneByOne", "open_split"]


class OneByOne:
    """A source that exposes only ``len`` and ``__getitem__`` of a TFDS data source.

    Readers then fetch examples one at a time. (TFDS's batched ``__getitems__`` is not used: the
    ``tfds.testing.mock_data`` mock breaks it, and grain reads item by item anyway.)
    """

    def __init__(self, source: Any, description: str):
        self.source = source
        self.description = description
        self._length = len(source)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        return self.source[int(index)]

    def __repr__(self) -> str:
        return f"OneByOne({self.description}, {self._length} examples)"


class DataUnavailableError(RuntimeError):
    """A data set that is not on this machine and cannot be downloaded here."""


class MissingPackageError(DataUnavailableError):
    """Opening a data set failed on a package that is not installed (not on missing data)."""


def _decoders_work(source: Any) -> bool:
    """Whether the first example can be read (custom decoders can need TensorFlow).

    Under ``tfds.testing.mock_data`` (and in TFDS builds whose NumPy path lacks a decoder) any
    ``decoders`` argument makes reading go through TensorFlow's encoder, which is not installed.
    """
    if len(source) == 0:
        return True
    try:
        source[0]
    except ModuleNotFoundError as error:
        if "tensorflow" in str(error):
            return False
        raise
    return True


def open_split(
    name: str,
    split: str,
    *,
    data_dir: str | None,
    download: bool,
    decoders: dict | None = None,
) -> OneByOne:
    """``tfds.data_source(name, split=split)`` wrapped as a :class:`OneByOne` source.

    Args:
      name: the TFDS builder name (``"mnist"``, ``"celeb_a"``, ...).
      split: a TFDS split (``"train"``, ``"test"``, ``"validation"``).
      data_dir: TFDS data directory; ``None`` is TFDS's default (``~/tensorflow_datasets`` or
        ``$TFDS_DATA_DIR``).
      download: download and prepare the data set when it is missing.
      decoders: optional TFDS decoders (``{"image": tfds.decode.SkipDecoding()}``). When reading
        with them would need TensorFlow (see :func:`_decoders_work`), the split is reopened
        without them, with a warning: examples then hold decoded images.

    Raises:
      MissingPackageError: when an import fails on the way (names the package to install).
      DataUnavailableError: when TFDS cannot open the split; the message names the data set,
        the data directory and how to prepare it.
    """
    import tensorflow_datasets as tfds  # slow import, kept out of module import time

    kwargs: dict[str, Any] = {"split": split, "data_dir": data_dir, "download": download}
    try:
        source = tfds.data_source(name, **kwargs, **({"decoders": decoders} if decoders else {}))
        if decoders and not _decoders_work(source):
            logging.warning(
                "TFDS %s/%s: reading with decoders %s needs TensorFlow here; reading decoded "
                "examples instead.",
                name,
                split,
                sorted(decoders),
            )
            source = tfds.data_source(name, **kwargs)
    except ImportError as error:  # a missing package, not missing data
        cause = error
        while cause.__cause__ is not None and not getattr(cause, "name", None):
            cause = cause.__cause__
        package = getattr(cause, "name", None) or str(error)
        raise MissingPackageError(
            f"TFDS cannot open {name!r}: the package {package!r} is not installed "
            f"({type(error).__name__}: {error}). Install the experiment requirements "
            f"(`pip install -r requirements.txt`, or `pip install {package}`)."
        ) from error
    except Exception as error:
        where = data_dir or "the TFDS default data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        raise DataUnavailableError(
            f"Could not open TFDS data set {name!r} split {split!r} in {where}: "
            f"{type(error).__name__}: {str(error)[:400]}\n"
            f"The data set is not downloaded (no network here?). Prepare it once on a machine "
            f"with internet access (`tfds build {name} --file_format=array_record` or "
            f"`tfds.data_source({name!r}, download=True)`) and set the data set's `data_dir` "
            "config key to that directory."
        ) from error
    return OneByOne(source, f"tfds:{name}/{split}")
