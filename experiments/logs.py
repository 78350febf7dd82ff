"""The run log: ``metrics.jsonl`` (one JSON record per line) with atomic truncation for resumes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """NumPy/JAX scalars and arrays -> plain Python (lists, floats, ints), recursively."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        arr = np.asarray(value)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and ``os.replace`` (atomic on POSIX)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class JsonlLog:
    """Append-only JSON-lines log. Every record is flushed on write, so a killed run keeps it."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(to_jsonable(record), allow_nan=True) + "\n")
            f.flush()

    def records(self) -> Iterator[dict[str, Any]]:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill; dropped by the next truncation

    def drop(self, predicate: Callable[[dict[str, Any]], bool]) -> int:
        """Removes the records for which ``predicate`` is true (atomically); returns how many."""
        kept, dropped = [], 0
        for record in self.records():
            if predicate(record):
                dropped += 1
            else:
                kept.append(json.dumps(record, allow_nan=True))
        if os.path.exists(self.path):
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return dropped
