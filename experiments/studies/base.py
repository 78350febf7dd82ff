"""What a study is, and the pieces every study uses.

A :class:`Study` (one module per study under ``experiments/studies/``) owns:

* its config section (``section`` + ``defaults()``; e.g. ``config.sparse``), which
  :func:`experiments.studies.study_config` adds to the base config;
* its validation (``validate(config)``; unknown keys name the valid ones through
  :func:`experiments.config.check_keys`);
* its phases (``phases(ctx) -> [Phase]``, :mod:`experiments.phases`): training runs are phases
  made by :func:`train_phase`, and a study may add phases that compute artifacts (masks, scores,
  chosen layers, architectures) from earlier ones;
* its report section (``report(records, tasks, config, workdir) -> markdown``).

:func:`train_phase` wraps one :class:`~experiments.train.RunSpec` as a phase named
``spec.run_id``: it trains (resuming from the phase's checkpoints), and leaves the artifact
``final`` (parameters and model state) and the run's summary record in ``metrics.jsonl``, which
is its completion (:mod:`experiments.lifecycle`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

import mtl_jax as mtl
from experiments import lifecycle, reports
from experiments.config import parse_method
from experiments.logs import JsonlLog
from experiments.phases import Artifacts, Phase
from experiments.train import RunSpec, get_method, run_key, train_run


@dataclasses.dataclass(frozen=True)
class StudyContext:
    """What a study's phases work with."""

    config: ml_collections.ConfigDict
    data: Any
    model: Any
    workdir: str
    log: JsonlLog
    progress: bool = True

    @property
    def artifacts(self) -> Artifacts:
        return Artifacts(self.workdir)


@dataclasses.dataclass(frozen=True)
class Study:
    """A study: its config section, validation (of the config alone, and of the config against
    the built data and model), phases and report section."""

    name: str
    description: str
    phases: Callable[[StudyContext], list[Phase]]
    section: str | None = None
    defaults: Callable[[], ml_collections.ConfigDict] | None = None
    validate: Callable[[ml_collections.ConfigDict], None] | None = None
    report: Callable[..., str] | None = None
    #: ``(config, data, model) -> None``: checks of the config against the built data and model,
    #: before anything is written to the work dir (raises ``ConfigError``).
    check_inputs: Callable[..., None] | None = None
    #: ``config -> the method strings the study trains`` (each built for the data's K before
    #: anything is written: :func:`check_methods`).
    methods: Callable[[ml_collections.ConfigDict], Sequence[str]] | None = None


def train_phase(ctx: StudyContext, spec: RunSpec, needs: Sequence[str] = ()) -> Phase:
    """The phase that trains ``spec`` (named ``spec.run_id``); its result, and its completion,
    is the run's summary record (:mod:`experiments.lifecycle`)."""
    needs = tuple(needs) + ((spec.init_from,) if spec.init_from else ())

    def run(artifacts: Artifacts) -> dict:
        return train_run(
            ctx.config, ctx.data, ctx.model, spec, ctx.workdir, ctx.log, progress=ctx.progress
        )

    return Phase(
        name=spec.run_id,
        run=run,
        needs=tuple(dict.fromkeys(needs)),
        info={"label": spec.label, "seed": spec.seed, "method": spec.method},
        finished=lifecycle.run_finished(ctx.log, run_key(spec)),
    )


def method_spec(config: ml_collections.ConfigDict, method: str) -> tuple[str, dict]:
    """``"cagrad:c=0.4"`` -> ``("cagrad", {"c": 0.4, **config.method_kwargs.cagrad})``."""
    return parse_method(method, config.method_kwargs.get(method.partition(":")[0]))


def check_methods(
    config: ml_collections.ConfigDict, methods: Sequence[str], num_tasks: int | None = None
) -> None:
    """Checks every method: without ``num_tasks``, its name and hyper-parameters (config
    validation, before the data is built: unknown ones raise, listing the valid ones); with it,
    by building it for K tasks (a K the method cannot take raises, e.g. TrimmedMean's)."""
    for method in methods:
        name, kwargs = method_spec(config, method)
        if num_tasks is None:
            mtl.methods.resolve_method(name, **kwargs)
            continue
        built = get_method(name, kwargs, num_tasks=num_tasks)
        batch_size = int(config.train.batch_size)
        halves = built.batches == 2 or "lambda_grad" in built.inputs
        if halves and batch_size % 2:
            raise ValueError(
                f"{name} reads the two halves of the batch (two independent batches; "
                f"Auto-Lambda's look-ahead and validation batches), but "
                f"config.train.batch_size={batch_size} is odd; use an even batch size."
            )


def single_task_runs(data, seed: int, epochs: int | None = None) -> list[RunSpec]:
    """One single-task reference run per task (``single:<task>``), for Δm."""
    return [
        RunSpec(
            label=f"{reports.SINGLE_PREFIX}{t.name}",
            method="mean",
            seed=seed,
            tasks=(t.name,),
            epochs=epochs,
        )
        for t in data.tasks
    ]


def summaries(records) -> dict[str, list[dict]]:
    """``{run label: [summary record per seed]}``."""
    out: dict[str, list[dict]] = {}
    for r in records:
        if r.get("kind") == "summary":
            out.setdefault(r["run"], []).append(r)
    return out


def fmt(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± std`` over seeds (sample std), one value as is, ``–`` for none."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"
