"""Studies as phases: named steps that save artifacts for the phases after them.

A study is an ordered list of :class:`Phase`. A phase trains or computes something and saves
what later phases need -- final parameters and model state, masks, scores, chosen layers, a
learned architecture -- as **artifacts** under the work dir, by name:

* arrays (pytrees of arrays) with orbax: ``phases/<phase>/arrays/<name>/``;
* small readable facts as JSON: ``phases/<phase>/<name>.json``.

A later phase reads them by ``(phase name, artifact name)`` through :class:`Artifacts`. A phase
that records its own completion (``Phase.finished``: a training run, whose completion is its
summary record, :mod:`experiments.lifecycle`) is finished when that record exists; any other
phase when its ``done.json`` exists (written last, atomically). :func:`run_phases` skips finished
phases, and re-runs an unfinished one, which resumes from its own checkpoints when it trains
(``Artifacts.phase_dir(name)/checkpoints``). So a killed study, rerun with the same command,
continues inside the phase it was in and ends as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import orbax.checkpoint as ocp

from experiments.logs import atomic_write_text, to_jsonable

PyTree = Any

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=:,@-]")


def phase_dirname(name: str) -> str:
    """A file-system-safe directory name for a phase name (``/`` and spaces become ``~``/``_``)."""
    return _UNSAFE.sub("_", name.replace("/", "~"))


class MissingArtifactError(FileNotFoundError):
    """A phase asked for an artifact that no finished phase has saved."""


def _existing_artifact(path: str, phase: str, name: str) -> str:
    """``path``, or :class:`MissingArtifactError` naming the phase that must finish first."""
    if not os.path.exists(path):
        raise MissingArtifactError(
            f"Artifact {name!r} of phase {phase!r} not found ({path}): that phase must finish "
            "before the phase that reads it."
        )
    return path


@dataclasses.dataclass(frozen=True)
class Artifacts:
    """The artifact store of one work dir."""

    workdir: str

    def phase_dir(self, phase: str) -> str:
        return os.path.abspath(os.path.join(self.workdir, "phases", phase_dirname(phase)))

    # -- arrays (orbax) ---------------------------------------------------------------------

    def array_path(self, phase: str, name: str) -> str:
        return os.path.join(self.phase_dir(phase), "arrays", name)

    def save_arrays(self, phase: str, name: str, tree: PyTree) -> str:
        """Saves a pytree of arrays (atomically; a second save of the same name is a no-op)."""
        path = self.array_path(phase, name)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(path, tree)
        return path

    def load_arrays(self, phase: str, name: str) -> PyTree:
        path = _existing_artifact(self.array_path(phase, name), phase, name)
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path)

    # -- JSON facts ---------------------------------------------------------------------------

    def json_path(self, phase: str, name: str) -> str:
        return os.path.join(self.phase_dir(phase), f"{name}.json")

    def save_json(self, phase: str, name: str, value: Any) -> str:
        path = self.json_path(phase, name)
        atomic_write_text(path, json.dumps(to_jsonable(value), indent=2, allow_nan=True) + "\n")
        return path

    def load_json(self, phase: str, name: str) -> Any:
        path = _existing_artifact(self.json_path(phase, name), phase, name)
        with open(path) as f:
            return json.load(f)

    def has(self, phase: str, name: str) -> bool:
        return os.path.exists(self.array_path(phase, name)) or os.path.exists(
            self.json_path(phase, name)
        )

    # -- completion ---------------------------------------------------------------------------

    def is_done(self, phase: str) -> bool:
        return os.path.exists(self.json_path(phase, "done"))

    def mark_done(self, phase: str, result: Any = None) -> None:
        self.save_json(phase, "done", {"phase": phase, "result": result})


@dataclasses.dataclass(frozen=True)
class Phase:
    """One named step of a study.

    Attributes:
      name: unique within the study (e.g. ``"search/seed0"``, ``"retrain:pcgrad/seed0"``).
      run: ``artifacts -> result``; saves its artifacts under its own name and returns a small
        JSON-able result (kept in ``done.json``). It may resume from its own checkpoints.
      needs: names of earlier phases whose artifacts it reads (checked before it starts).
      info: free-form facts for listings and reports.
      finished: ``artifacts -> result or None``, for a phase that records its own completion (a
        training run: its summary record, :func:`experiments.lifecycle.run_lifecycle`); no
        ``done.json`` is written for it. ``None``: the phase is finished when its ``done.json``
        exists.
    """

    name: str
    run: Callable[[Artifacts], Any]
    needs: tuple[str, ...] = ()
    info: dict = dataclasses.field(default_factory=dict)
    finished: Callable[[Artifacts], Any] | None = None


def check_phases(phases: Sequence[Phase]) -> None:
    """Names are unique and every ``needs`` names an earlier phase."""
    seen: set[str] = set()
    for phase in phases:
        if phase.name in seen:
            raise ValueError(f"Two phases are named {phase.name!r}; phase names must be unique.")
        missing = [n for n in phase.needs if n not in seen]
        if missing:
            raise ValueError(
                f"Phase {phase.name!r} needs {missing}, which do not come before it in the study."
            )
        seen.add(phase.name)


def run_phases(
    phases: Sequence[Phase],
    artifacts: Artifacts,
    *,
    on_start: Callable[[Phase], None] | None = None,
) -> dict[str, Any]:
    """Runs the phases in order, skipping finished ones; returns ``{phase: result}``."""
    check_phases(phases)
    results = {}
    for phase in phases:
        done, result = phase_result(phase, artifacts)
        if not done:
            if on_start is not None:
                on_start(phase)
            result = phase.run(artifacts)
            if phase.finished is None:
                artifacts.mark_done(phase.name, result)
        results[phase.name] = result
    return results


def phase_result(phase: Phase, artifacts: Artifacts) -> tuple[bool, Any]:
    """``(finished, result)``: from the phase's own completion record (``Phase.finished``), else
    from its ``done.json``; ``(False, None)`` for a phase that has not finished."""
    if phase.finished is not None:
        result = phase.finished(artifacts)
        return result is not None, result
    if artifacts.is_done(phase.name):
        return True, artifacts.load_json(phase.name, "done")["result"]
    return False, None
