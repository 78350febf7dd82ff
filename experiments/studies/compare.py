"""``compare``: every method of ``config.methods`` on every seed (+ single-task references).

One phase per run (``<method>__seed<s>``); the report is the base comparison table and plots.
It owns no config section: ``methods``, ``method_kwargs`` and ``single_task`` are base keys.
"""

from __future__ import annotations

import ml_collections

from experiments.phases import Phase
from experiments.studies.base import (
    Study,
    StudyContext,
    check_methods,
    method_spec,
    single_task_runs,
    train_phase,
)
from experiments.train import RunSpec


def runs(config: ml_collections.ConfigDict, data) -> list[RunSpec]:
    """Every method on every seed, plus one single-task run per task if ``config.single_task``."""
    out = []
    for seed in config.seeds:
        for method in config.methods:
            name, kwargs = method_spec(config, method)
            out.append(RunSpec(label=method, method=name, method_kwargs=kwargs, seed=int(seed)))
        if config.single_task:
            out += single_task_runs(data, int(seed))
    return out


def phases(ctx: StudyContext) -> list[Phase]:
    return [train_phase(ctx, spec) for spec in runs(ctx.config, ctx.data)]


def validate(config: ml_collections.ConfigDict) -> None:
    check_methods(config, config.methods)


STUDY = Study(
    name="compare",
    description="every method of config.methods on every seed, plus single-task references",
    phases=phases,
    validate=validate,
)
