"""``compare``: every method of ``config.methods`` on every seed (+ single-task references).

One phase per run (``<method>__seed<s>``); the report is the base comparison table and plots,
and, with two or more tasks, the conflict summary (:mod:`experiments.conflict_summary`):
``conflict_summary.json`` at the work dir's root (per method, seed and task pair the mean
cosine over training and Recon's bin shares on the shared encoder; per module its S-conflict
score and the ranking's stability across seeds; test metrics and Δm%), a pair x pair heat map
and the per-module ranking. It owns no config section: ``methods``, ``method_kwargs`` and
``single_task`` are base keys.
"""

from __future__ import annotations

import json
import os

import ml_collections

from experiments import conflict_summary as summary_lib
from experiments.logs import atomic_write_text
from experiments.phases import Phase
from experiments.studies.base import (
    Study,
    StudyContext,
    check_methods,
    method_spec,
    single_task_runs,
    train_phase,
)
from experiments.train import RunSpec, bn_recompute_note, objectives_note


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


def methods(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(config.methods)


def validate(config: ml_collections.ConfigDict) -> None:
    check_methods(config, methods(config))


def report(records, tasks, config, workdir: str) -> str:
    """The conflict summary section (and its JSON and plots; empty with a single task), and the
    line on recomputed BatchNorm statistics (``eval.recompute_bn_batches``)."""
    note = "\n\n".join(
        n for n in (objectives_note(config, len(tasks)), bn_recompute_note(config)) if n
    )
    if len(tasks) < 2:
        return note
    summary = summary_lib.conflict_summary(records, tasks)
    atomic_write_text(
        os.path.join(workdir, "conflict_summary.json"),
        json.dumps(summary, indent=2, allow_nan=True) + "\n",
    )
    text = summary_lib.conflict_summary_section(summary)
    if config.report.plots:
        plots = os.path.join(workdir, "plots")
        os.makedirs(plots, exist_ok=True)
        for name, plot in (
            ("pair_cosines", summary_lib.plot_pair_heatmap),
            ("module_ranking", summary_lib.plot_module_ranking),
        ):
            try:
                plot(summary, os.path.join(plots, f"{name}.png"))
            except ValueError:  # nothing to plot (e.g. no per-module scores)
                continue
            text += f"\n\n![{name}.png](plots/{name}.png)"
    return f"{note}\n\n{text}" if note else text


STUDY = Study(
    name="compare",
    description="every method of config.methods on every seed, plus single-task references",
    phases=phases,
    validate=validate,
    report=report,
    methods=methods,
)
