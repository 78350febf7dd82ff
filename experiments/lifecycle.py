"""One run lifecycle: finished? -> restore -> stale records -> start record -> loop -> finish.

Every training run of the suite -- the standard run (:func:`experiments.train.train_run`), the
CoNAL search and the CoNAL retrain (:mod:`experiments.studies.conal`) -- goes through
:func:`run_lifecycle`, which does, in this order:

1. **Finished?** The run's completion record (:class:`SummaryRecord`: its ``summary`` record in
   ``metrics.jsonl``; the CoNAL search: its ``search`` artifact, :class:`ArtifactRecord`) is the
   one source of truth. When it exists the run is returned as is, before anything is built.
2. **Build** what differs between the runs (``build() -> RunParts``: the jitted step, the state
   template, the batches, the record builders, the eval hook, ``on_finish``).
3. **Restore** the latest checkpoint of the run's phase directory into the template (or start
   from the template).
4. **Stale records**: the run's records after the restored step are dropped (a killed process
   wrote them after its last checkpoint; the resumed loop writes them again).
5. **Start record** (``kind="start"``), for a run that starts from scratch.
6. **The loop** (:func:`experiments.loop.run_loop`): ``on_log``, ``check``, ``on_epoch_end`` and
   the evaluation every ``eval_every_epochs`` epochs and at the last step (``kind="eval"``).
   ``stop_after_steps`` (tests) ends it as a kill would: the ``interrupted`` record is returned,
   not written.
7. **Finish**: ``finalize`` (precise BN, extra artifacts), the ``final`` artifact (parameters and
   model state), then ``on_finish`` builds the summary and the completion record is written,
   last. A ``summary`` line cut short by a kill does not parse, so it is no completion; the
   rerun's step 4 rewrites the log without it.

So a training run is finished exactly when its summary record is in the log (the CoNAL search:
when its artifact exists); the study's phase of a run asks the same record (``Phase.finished``),
and nothing else (no ``done.json``, no ``summary`` artifact) records it. Work dirs written before this module hold ``done.json`` and ``summary.json``
too; they are ignored (their summary records say the same).

Timing: the summary's ``seconds_per_step`` is the median of the loop's logging windows (compile,
evaluation and checkpointing excluded), or, when ``step_fn`` times its own parts
(``RunParts.timer``, :class:`StepTimer`: the standard run's conflict probe beside the method's
step, timed apart), the timer's medians. ``wall_seconds`` is cumulative over the processes of a
resumed run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from experiments.logs import JsonlLog
from experiments.loop import (
    LoopHooks,
    LoopResult,
    checkpoint_manager,
    fresh_buffers,
    restore_checkpoint,
    run_loop,
)
from experiments.phases import Artifacts

PyTree = Any
Batch = Any

FINAL = "final"  # the artifact of a finished run's parameters and model state


class IncompleteWorkdirError(FileNotFoundError):
    """A run's completion record exists but its ``final`` artifact is missing (a
    ``FileNotFoundError``: the command line reports it as one ``error:`` line, exit 2)."""


# ---------------------------------------------------------------------------------------------
# Who owns a record, and where a run records its completion.


@dataclasses.dataclass(frozen=True)
class RunKey:
    """A run of a work dir: ``label`` and ``seed`` (the ``run`` and ``seed`` of its records) and
    ``phase``, the phase directory of its checkpoints and artifacts (``"<label>__seed<s>"``)."""

    label: str
    seed: int
    phase: str

    def owns(self, record: dict) -> bool:
        return record.get("run") == self.label and record.get("seed") == self.seed

    def record(self, kind: str, step: int, **fields: Any) -> dict:
        """A log record of this run: ``kind``, ``run``, ``seed``, ``step``, then ``fields``."""
        return {"kind": kind, "run": self.label, "seed": self.seed, "step": step, **fields}


def run_records(log: JsonlLog, key: RunKey, kind: str) -> list[dict]:
    """The run's records of ``kind``, in log order."""
    return [r for r in log.records() if r.get("kind") == kind and key.owns(r)]


class Completion(Protocol):
    """Where a run records that it finished: ``read()`` -> the summary or ``None``."""

    def read(self) -> dict | None: ...

    def write(self, summary: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class SummaryRecord:
    """A training run's completion: its last ``summary`` record in the log, written after its
    ``final`` artifact. ``read`` raises :class:`IncompleteWorkdirError` when the record exists but
    the artifact does not (a work dir edited by hand, or copied without ``phases/``)."""

    log: JsonlLog
    artifacts: Artifacts
    key: RunKey

    def read(self) -> dict | None:
        found = run_records(self.log, self.key, "summary")
        if not found:
            return None
        if not self.artifacts.has(self.key.phase, FINAL):
            raise IncompleteWorkdirError(
                f"{self.log.path} records run {self.key.label!r} (seed {self.key.seed}) as "
                f"finished, but its artifact {FINAL!r} "
                f"({self.artifacts.array_path(self.key.phase, FINAL)}) is missing; later phases "
                "start from it. Rerun with --fresh (or restore the work dir's phases/ directory)."
            )
        return found[-1]

    def write(self, summary: dict) -> None:
        self.log.write(summary)


@dataclasses.dataclass(frozen=True)
class ArtifactRecord:
    """A run whose result is one JSON artifact (the CoNAL search's ``search``): the artifact,
    written atomically and last, is its completion."""

    artifacts: Artifacts
    phase: str
    name: str

    def read(self) -> dict | None:
        if not self.artifacts.has(self.phase, self.name):
            return None
        return self.artifacts.load_json(self.phase, self.name)

    def write(self, summary: dict) -> None:
        self.artifacts.save_json(self.phase, self.name, summary)


def run_finished(log: JsonlLog, key: RunKey) -> Callable[[Artifacts], dict | None]:
    """``Phase.finished`` of a training run's phase: its summary record (:class:`SummaryRecord`)."""
    return lambda artifacts: SummaryRecord(log, artifacts, key).read()


# ---------------------------------------------------------------------------------------------
# What differs between the runs.


class StepTimer(Protocol):
    """A step wrapper that times the parts of its step apart (the standard run's
    :class:`experiments.train.ProbedStep`: the method's step, and the conflict probe every N
    steps); ``medians()`` -> summary fields, ``{"seconds_per_step": ..., "probe_seconds": ...}``.
    Its ``seconds_per_step`` replaces the loop's (which would count the probe in)."""

    def medians(self) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How often :func:`experiments.loop.run_loop` logs and checkpoints, and its progress bar."""

    log_every: int = 10
    checkpoint_every_steps: int = 0
    checkpoint_every_epochs: int = 1
    progress: bool = False
    desc: str = ""


def loop_settings(
    train_config: Any, *, progress: bool, desc: str, log_every: int | None = None
) -> LoopSettings:
    """The settings of ``config.train`` (``log_every_steps`` unless ``log_every`` is given)."""
    return LoopSettings(
        log_every=int(train_config.log_every_steps if log_every is None else log_every),
        checkpoint_every_steps=int(train_config.checkpoint_every_steps),
        checkpoint_every_epochs=int(train_config.checkpoint_every_epochs),
        progress=progress,
        desc=desc,
    )


@dataclasses.dataclass(frozen=True)
class Finish:
    """What ``on_finish`` builds the summary from."""

    key: RunKey
    log: JsonlLog
    state: PyTree  # after ``finalize``
    loop: LoopResult  # this process's loop (its ``state`` is before ``finalize``)
    total_steps: int
    timings: dict[str, float]  # ``seconds_per_step`` and what the step timer adds
    wall_seconds: float  # all processes of the run, up to the final artifact

    def records(self, kind: str) -> list[dict]:
        return run_records(self.log, self.key, kind)

    def last_test_metrics(self) -> dict:
        """The metrics of the run's last ``eval`` record (``{}`` without one)."""
        evals = self.records("eval")
        return evals[-1]["metrics"] if evals else {}


def params_and_model_state(state: PyTree) -> PyTree:
    """The ``final`` artifact of a state with ``params`` and ``model_state``."""
    return {"params": state.params, "model_state": state.model_state}


@dataclasses.dataclass(frozen=True)
class RunParts:
    """What differs between the runs; built only for a run that is not finished.

    Attributes:
      step_fn: ``(state, batch) -> (state, outputs)``, jitted (a plain argument: a wrapper that
        runs a second jitted function beside it is a ``step_fn`` too).
      template: the initial state (restored into, shardings included).
      batches: ``(epoch, start_batch) -> batches`` (:func:`experiments.loop.run_loop`).
      start_fields: ``state -> fields`` of the ``start`` record (``None``: no start record).
      on_log: ``(state, step, epoch, outputs)``, every ``loop.log_every`` steps.
      check: ``(state, outputs, has_checkpoint)``, raises to stop the run before a bad state is
        logged or checkpointed (``has_checkpoint``: whether the run can resume from one).
      on_epoch_end: ``(state, epoch, wall_seconds)``, before the evaluation.
      evaluate: ``state -> test metrics``; an ``eval`` record every ``eval_every_epochs`` epochs
        and at the last step.
      on_restore: ``step ->``, told the step the loop starts from (0, or the restored
        checkpoint's), before the first call of ``step_fn``.
      finalize: ``state -> state`` after the loop, before the final artifact (precise BN).
      final_arrays: ``state -> the final artifact`` (``None``: no ``final`` artifact).
      on_finish: ``Finish -> summary`` (the completion record).
      timer: ``step_fn`` itself when it times its parts (:class:`StepTimer`), or ``None``: the
        loop's logging windows give ``seconds_per_step``.
    """

    step_fn: Callable[[PyTree, Batch], tuple[PyTree, dict]]
    template: PyTree
    batches: Callable[[int, int], Iterable[Batch]]
    steps_per_epoch: int
    total_steps: int
    on_finish: Callable[[Finish], dict]
    loop: LoopSettings = LoopSettings()
    start_fields: Callable[[PyTree], dict] | None = None
    on_log: Callable[[PyTree, int, int, dict], None] | None = None
    check: Callable[[PyTree, dict, bool], None] | None = None
    on_epoch_end: Callable[[PyTree, int, float], None] | None = None
    evaluate: Callable[[PyTree], dict] | None = None
    eval_every_epochs: int = 1
    on_restore: Callable[[int], None] | None = None
    finalize: Callable[[PyTree], PyTree] | None = None
    final_arrays: Callable[[PyTree], PyTree] | None = params_and_model_state
    timer: StepTimer | None = None


# ---------------------------------------------------------------------------------------------
# The lifecycle.


def drop_stale_records(log: JsonlLog, key: RunKey, restored_step: int) -> int:
    """Drops the run's records after ``restored_step`` (and any line cut short by a kill);
    returns how many records were dropped."""
    return log.drop(lambda r: key.owns(r) and r.get("step", -1) > restored_step)


def wall_seconds_before(log: JsonlLog, key: RunKey, restored_step: int) -> float:
    """Wall time of the run's earlier processes up to the restored step: the last
    ``wall_seconds`` the run logged at or before it (0 for a run from scratch)."""
    walls = [
        r["wall_seconds"]
        for r in log.records()
        if key.owns(r) and "wall_seconds" in r and r.get("step", -1) <= restored_step
    ]
    return float(walls[-1]) if walls else 0.0


def step_timings(loop: LoopResult, timer: StepTimer | None) -> dict[str, float]:
    """The summary's timing fields: the timer's medians, else ``seconds_per_step`` = the median
    of the loop's logging windows (NaN without one)."""
    if timer is not None:
        return dict(timer.medians())
    median = float(np.median(loop.step_seconds)) if loop.step_seconds else math.nan
    return {"seconds_per_step": median}


def run_lifecycle(
    key: RunKey,
    log: JsonlLog,
    artifacts: Artifacts,
    build: Callable[[], RunParts],
    *,
    completion: Completion | None = None,
    stop_after_steps: int | None = None,
) -> dict:
    """Runs ``key``'s run to the end (or to ``stop_after_steps``), resuming from its latest
    checkpoint; returns its summary (or the ``interrupted`` record). See the module docstring.

    ``completion`` defaults to the run's summary record (:class:`SummaryRecord`)."""
    completion = completion or SummaryRecord(log, artifacts, key)
    finished = completion.read()
    if finished is not None:
        return finished
    parts = build()
    manager = checkpoint_manager(os.path.join(artifacts.phase_dir(key.phase), "checkpoints"))
    restored = restore_checkpoint(manager, parts.template)
    state = fresh_buffers(parts.template if restored is None else restored)
    start = int(state.step)
    drop_stale_records(log, key, start)
    wall_before = float(wall_seconds_before(log, key, start))
    began = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - began

    if parts.on_restore is not None:
        parts.on_restore(start)
    if restored is None and parts.start_fields is not None:
        log.write(key.record("start", 0, **parts.start_fields(state)))
    eval_every = max(1, int(parts.eval_every_epochs))

    def check(state: PyTree, outputs: dict) -> None:
        parts.check(state, outputs, manager.latest_step() is not None)

    def on_epoch_end(state: PyTree, epoch: int) -> None:
        if parts.on_epoch_end is not None:
            parts.on_epoch_end(state, epoch, wall())
        step = int(state.step)
        if parts.evaluate is not None and (
            (epoch + 1) % eval_every == 0 or step == parts.total_steps
        ):
            metrics = parts.evaluate(state)
            log.write(eval_record(key, step, epoch + 1, metrics, wall_seconds=wall()))

    settings = parts.loop
    result = run_loop(
        step_fn=parts.step_fn,
        state=state,
        batches=parts.batches,
        steps_per_epoch=parts.steps_per_epoch,
        total_steps=parts.total_steps,
        manager=manager,
        hooks=LoopHooks(
            on_log=parts.on_log,
            on_epoch_end=on_epoch_end,
            check=check if parts.check is not None else None,
        ),
        log_every=settings.log_every,
        checkpoint_every_steps=settings.checkpoint_every_steps,
        checkpoint_every_epochs=settings.checkpoint_every_epochs,
        progress=settings.progress,
        desc=settings.desc,
        stop_after_steps=stop_after_steps,
    )
    if not result.finished:
        return key.record("interrupted", int(result.state.step))
    state = result.state if parts.finalize is None else parts.finalize(result.state)
    if parts.final_arrays is not None:
        artifacts.save_arrays(key.phase, FINAL, parts.final_arrays(state))
    summary = parts.on_finish(
        Finish(
            key=key,
            log=log,
            state=state,
            loop=result,
            total_steps=parts.total_steps,
            timings=step_timings(result, parts.timer),
            wall_seconds=wall(),
        )
    )
    completion.write(summary)
    return summary


def eval_record(key: RunKey, step: int, epoch: int, metrics: dict, **fields: Any) -> dict:
    """An ``eval`` record of the test split."""
    return key.record("eval", step, epoch=epoch, split="test", metrics=metrics, **fields)


def summary_record(finish: Finish, **fields: Any) -> dict:
    """A ``summary`` record: ``run``, ``seed``, ``step`` (the last), ``test`` (the last
    evaluation's metrics), then ``fields``, the timings (``seconds_per_step``, ...) and
    ``wall_seconds``."""
    return finish.key.record(
        "summary",
        finish.total_steps,
        **{
            "test": finish.last_test_metrics(),
            **fields,
            **finish.timings,
            "wall_seconds": finish.wall_seconds,
        },
    )
