"""A run's work dir: refuse one that cannot be written or holds another config; create it.

Every run of a study keys its results by seed and method under one work dir (``config.json``,
``metrics.jsonl``, ``phases/``, ``report.md``). :func:`check_workdir` says, writing nothing,
whether a config may run there (the only change a work dir accepts is added seeds);
:func:`prepare_workdir` then creates it. :func:`load_workdir_config` reads the config back (the
report and the BatchNorm check).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import ml_collections

from experiments.logs import atomic_write_text

__all__ = [
    "RESULT_NEUTRAL",
    "ConfigMismatchError",
    "WorkdirError",
    "check_config_change",
    "check_workdir",
    "check_writable",
    "config_differences",
    "load_workdir_config",
    "prepare_workdir",
]


class WorkdirError(ValueError):
    """The work dir cannot be used (e.g. it is a file)."""


class ConfigMismatchError(ValueError):
    """The work dir holds results of a different config."""


#: Sections that do not change results: plots / progress bars, and the devices a run is laid out
#: on (equal up to float rounding; a run may resume on another number of devices).
RESULT_NEUTRAL = ("report", "parallel")


def _comparable(config: ml_collections.ConfigDict | dict) -> dict:
    as_dict = dict(config) if isinstance(config, dict) else json.loads(config.to_json_best_effort())
    return {k: v for k, v in as_dict.items() if k not in RESULT_NEUTRAL}


def config_differences(previous: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like configs (sorted; a key only one of
    them has counts as different)."""
    if isinstance(previous, dict) and isinstance(current, dict):
        keys = sorted(set(previous) | set(current))
        return [
            diff
            for key in keys
            for diff in config_differences(
                previous.get(key, _MISSING), current.get(key, _MISSING), f"{prefix}{key}."
            )
        ]
    return [] if previous == current else [prefix.rstrip(".")]


_MISSING = object()

#: Keys added after work dirs were written, with the value that reproduces the runs made before
#: they existed: a previous config without one compares as if it held that value.
BACKWARD_DEFAULTS = {("train", "objectives"): "tasks"}


def _with_backward_defaults(config: dict) -> dict:
    out = dict(config)
    for (section, key), value in BACKWARD_DEFAULTS.items():
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section] = {**out[section], key: value}
    return out


def check_config_change(previous: dict, current: dict, workdir: str) -> list[int]:
    """The seeds ``current`` adds to a work dir made with ``previous`` (``[]``: the same config).

    Seeds may only grow: every run and phase is keyed by its seed, so the finished seeds' results
    stay valid and only the added seeds train.

    Raises:
      ConfigMismatchError: a seed was removed, or a key other than ``seeds`` changed (names the
        keys and what to do).
    """
    old, new = _with_backward_defaults(_comparable(previous)), _comparable(current)
    changed = config_differences(
        {k: v for k, v in old.items() if k != "seeds"},
        {k: v for k, v in new.items() if k != "seeds"},
    )
    path = os.path.join(workdir, "config.json")
    if changed:
        shown = ", ".join(changed[:8]) + (
            f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
        )
        raise ConfigMismatchError(
            f"{workdir} holds results of a different config ({path}; changed: {shown}); use "
            "another --workdir, or --fresh to delete it. (Only config.seeds may change in a "
            "work dir, by adding seeds.)"
        )
    old_seeds = [int(s) for s in old.get("seeds", [])]
    new_seeds = [int(s) for s in new.get("seeds", [])]
    removed = [s for s in old_seeds if s not in new_seeds]
    if removed:
        raise ConfigMismatchError(
            f"{workdir} holds results of seeds {old_seeds} ({path}); this config drops seeds "
            f"{removed}. Seeds may only be added to a work dir: keep {old_seeds} in config.seeds "
            "(and add new ones), use another --workdir, or --fresh to delete it."
        )
    return [s for s in new_seeds if s not in old_seeds]


def check_workdir(
    config: ml_collections.ConfigDict, workdir: str, fresh: bool = False
) -> list[int]:
    """Checks, writing nothing, that ``config`` may run in ``workdir``; returns the seeds it adds
    (``[]`` for a new work dir, ``--fresh`` or the same config).

    Raises:
      WorkdirError: the work dir is a file, or it (or, for a new one, its nearest existing
        parent) cannot be written.
      ConfigMismatchError: it holds results of another config (see :func:`check_config_change`).
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"The work dir {workdir!r} is a file; give --workdir a directory.")
    check_writable(workdir)
    path = os.path.join(workdir, "config.json")
    if fresh or not os.path.exists(path):
        return []
    with open(path) as f:
        previous = json.load(f)
    return check_config_change(previous, json.loads(config.to_json_best_effort()), workdir)


def prepare_workdir(
    config: ml_collections.ConfigDict, workdir: str, fresh: bool = False
) -> list[int]:
    """Creates the work dir and ``config.json`` after :func:`check_workdir` (which refuses a work
    dir made by another config; nothing is created or deleted then).

    A config that differs from the stored one only by added seeds is accepted: ``config.json``
    gets the new seeds, the finished seeds' phases are skipped and only the added seeds train.
    Returns the added seeds (``[]`` for a new work dir or the same config).
    """
    added = check_workdir(config, workdir, fresh)
    if fresh and os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    atomic_write_text(
        os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2) + "\n"
    )
    return added


def check_writable(workdir: str, purpose: str = "", fix: str = "") -> None:
    """Raises :class:`WorkdirError` when ``workdir`` (or the nearest existing parent of a new one)
    does not take a new file: a read-only file system, no permission, an immutable directory.

    ``purpose`` says what would be written there and ``fix`` what to do instead (defaults: a run's).
    """
    target = os.path.abspath(workdir)
    while not os.path.exists(target):
        target = os.path.dirname(target)
    try:
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        purpose = purpose or "a run writes its config, log, checkpoints and report there"
        fix = fix or (
            "Give --workdir a writable directory (a finished run's report is its report.md; to "
            f"rebuild it, copy the work dir: cp -r {workdir} <dir> && python -m experiments.report "
            "--workdir <dir>)."
        )
        raise WorkdirError(
            f"The work dir {workdir!r} cannot be written ({e.strerror}: {target}); {purpose}. {fix}"
        ) from e


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples config files use."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a work dir was made with (its ``config.json``, written by
    :func:`prepare_workdir`), lists back as tuples.

    Raises:
      FileNotFoundError: the work dir has no ``config.json``.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: give --workdir a work dir of experiments.run.")
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))
