"""BatchNorm statistics at evaluation: every finished run of a work dir, three ways.

    python -m experiments.bn_check --workdir DIR [--batches N]

For every run with a ``final`` artifact (:func:`experiments.train.load_final_params`) the run's
problem is rebuilt from the work dir's ``config.json`` and the artifact's shapes (a branched
encoder's COPIED leaves are the ones with a leading task axis), and the test split is evaluated
with

* **A**: the stored running statistics (what the run reported);
* **B**: train mode, every test batch normalised with its own statistics (per task stream);
* **C**: statistics recomputed on ``N`` training batches per stream
  (:func:`mtl_jax.batchnorm.recompute_statistics` through
  :func:`experiments.train.recompute_bn`; precise BN).

A per-task (branched) run is evaluated with per-task statistics (:func:`experiments.train.
per_task_state`): a run saved before per-task statistics existed has shared statistics after
the branch -- the average over the streams -- which A uses for every stream, and which C
recomputes per stream. The tool prints a markdown table (run x task: A, B, C; the first reported
metric of the task, accuracy for classification) and its mean over seeds, and writes
``bn_check.json`` in the work dir. Runs it cannot rebuild (a model variant, LaSS masks, CoNAL's
trees) are listed as skipped with the reason.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from experiments import data as data_lib
from experiments import models as models_lib
from experiments import reports
from experiments import run as run_lib
from experiments import runner as runner_lib
from experiments import train as train_lib
from experiments import workdir as workdir_lib
from experiments.logs import JsonlLog, atomic_write_text
from experiments.phases import Artifacts
from mtl_jax import sharing as sharing_lib

PyTree = Any
MODES = ("A", "B", "C")
MODE_NAMES = {
    "A": "stored statistics",
    "B": "train mode (batch statistics)",
    "C": "recomputed statistics",
}


def finished_runs(records: Sequence[dict], artifacts: Artifacts) -> list[tuple[str, int, dict]]:
    """``(label, seed, start record)`` of every run with a summary and a ``final`` artifact."""
    starts = {(r["run"], r["seed"]): r for r in records if r.get("kind") == "start"}
    keys = dict.fromkeys((r["run"], r["seed"]) for r in records if r.get("kind") == "summary")
    return [
        (label, seed, starts.get((label, seed), {}))
        for label, seed in keys
        if artifacts.has(f"{label}__seed{seed}", train_lib.FINAL)
    ]


def copied_spec(params: PyTree, template: PyTree, num_streams: int) -> PyTree | None:
    """The sharing spec of ``params`` from their shapes (:func:`experiments.train.
    task_axis_markers`); ``None`` when nothing is copied.

    Raises ValueError when the trees or a shape differ otherwise (another model variant)."""
    if jax.tree.structure(params) != jax.tree.structure(template):
        raise ValueError("its parameters do not have the structure of the config's model")
    spec = train_lib.task_axis_markers(params, template, num_streams, "Parameter")
    return spec if sharing_lib.COPIED in jax.tree.leaves(spec) else None


def _first_metric(metrics: dict, task) -> float:
    name = reports.REPORTED_METRICS[task.kind][0]
    return float(reports._display(name, metrics[task.name][name]))


def check_run(
    config: ml_collections.ConfigDict,
    data: Any,
    model: Any,
    artifacts: Artifacts,
    label: str,
    seed: int,
    start: dict,
    batches: int,
) -> dict:
    """A, B and C for one run: ``{"per_task": bool, "tasks": [...], "A": {task: value}, ...}``."""
    spec = train_lib.RunSpec(label=label, seed=seed, tasks=tuple(start.get("tasks") or ()) or None)
    tasks, streams = train_lib.run_tasks(data, spec)
    params, model_state = train_lib.parallel_lib.to_host(
        train_lib.load_final_params(artifacts, spec.run_id)
    )
    shapes = train_lib.init_shapes(model, streams, data.input_shape)
    sharing = copied_spec(params["encoder"], shapes[0]["encoder"], len(streams))
    state_sharing = None
    if sharing is not None:
        model_state["encoder"], state_sharing = train_lib.per_task_state(
            model_state["encoder"], shapes[1]["encoder"], len(streams)
        )
    batch_size = int(config.train.batch_size)
    steps = data_lib.num_batches(data.train, batch_size, drop_remainder=True)
    problem = train_lib.build_problem(
        config, tasks, streams, model, spec, steps, sharing=sharing, state_sharing=state_sharing
    )
    state = train_lib.TrainState(None, params, model_state, None, None, None)
    eval_bs = int(config.train.eval_batch_size)

    def evaluate(predict, st) -> dict[str, float]:
        metrics = train_lib.evaluate(problem, predict, st, data.test, eval_bs)
        return {t.name: _first_metric(metrics, t) for t in tasks}

    predict = jax.jit(train_lib.make_predict(problem))
    out = {
        "label": label,
        "seed": seed,
        "per_task": sharing is not None,
        "tasks": [t.name for t in tasks],
        "A": evaluate(predict, state),
        "B": evaluate(jax.jit(train_lib.make_predict(problem, train=True)), state),
    }
    images = train_lib.training_images(data, batch_size, seed, 0, batches)
    recomputed = train_lib.recompute_bn(problem, params, model_state, images)
    out["C"] = evaluate(predict, state._replace(model_state=recomputed))
    return out


def mean_over_seeds(runs: dict[str, dict]) -> dict[str, dict]:
    """``{label: {"seeds": n, "A": {task: mean}, ...}}``."""
    by_label: dict[str, list[dict]] = {}
    for r in runs.values():
        by_label.setdefault(r["label"], []).append(r)
    out = {}
    for label, rows in by_label.items():
        entry: dict[str, Any] = {"seeds": len(rows), "tasks": rows[0]["tasks"]}
        for mode in MODES:
            entry[mode] = {t: float(np.mean([r[mode][t] for r in rows])) for t in rows[0]["tasks"]}
        out[label] = entry
    return out


def markdown_table(rows: dict[str, dict], task_names: Sequence[str]) -> str:
    """``| run | task A / B / C ... | max |A - C| |`` (``–`` for a task the run does not train)."""
    header = ["run", *[f"{t} A / B / C" for t in task_names], "max abs(A - C)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        cells = [name]
        for t in task_names:
            if t in r["A"]:
                cells.append(" / ".join(f"{r[m][t]:.1f}" for m in MODES))
            else:
                cells.append("–")
        gap = max(abs(r["A"][t] - r["C"][t]) for t in r["A"])
        cells.append(f"{gap:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bn_check(workdir: str, batches: int = 50, *, verbose: bool = True) -> dict:
    """Evaluates every finished run of ``workdir`` with A, B and C; writes ``bn_check.json``
    and returns its content."""
    workdir_lib.check_writable(
        workdir,
        "bn_check writes bn_check.json there",
        f"Copy the work dir (cp -r {workdir} <dir>) and run python -m experiments.bn_check "
        "--workdir <dir>.",
    )
    if batches < 1:
        raise ValueError(f"--batches={batches}; give a positive number of training batches.")
    config = workdir_lib.load_workdir_config(workdir)
    data = data_lib.make_dataset(config.dataset)
    model = models_lib.make_model(config.model, data.tasks, data.input_shape)
    artifacts = Artifacts(workdir)
    records = list(JsonlLog(os.path.join(workdir, "metrics.jsonl")).records())
    runs, skipped = {}, {}
    for label, seed, start in finished_runs(records, artifacts):
        run_id = f"{label}__seed{seed}"
        try:
            runs[run_id] = check_run(config, data, model, artifacts, label, seed, start, batches)
        except ValueError as e:
            skipped[run_id] = str(e)
            continue
        if verbose:
            r = runs[run_id]
            print(run_id, {m: r[m] for m in MODES}, flush=True)
    result = {
        "workdir": os.path.abspath(workdir),
        "tasks": [t.name for t in data.tasks],
        "batches": batches,
        "modes": MODE_NAMES,
        "runs": runs,
        "mean_over_seeds": mean_over_seeds(runs),
        "skipped": skipped,
    }
    atomic_write_text(
        os.path.join(workdir, "bn_check.json"), json.dumps(result, indent=2, allow_nan=True) + "\n"
    )
    return result


def report(result: dict, task_names: Sequence[str]) -> str:
    """The markdown tables: per run, and the mean over seeds per run label."""
    modes = "; ".join(f"{m}: {name}" for m, name in result["modes"].items())
    text = [
        f"BatchNorm statistics at evaluation ({modes}; C on {result['batches']} training "
        "batches per stream). Test accuracy (first reported metric) per task.",
        "",
        markdown_table(result["runs"], task_names),
        "",
        "Mean over seeds:",
        "",
        markdown_table(result["mean_over_seeds"], task_names),
    ]
    if result["skipped"]:
        text += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())]
    return "\n".join(text)


_FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Work dir of experiments.run with finished runs.")
    flags.DEFINE_integer("batches", 50, "Training batches per stream for C (recomputed).")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's per-restore INFO lines
    runner_lib.enable_compilation_cache()  # the runs of a study share their programs
    if not _FLAGS.workdir:
        print("error: give --workdir DIR (a work dir of experiments.run).", file=sys.stderr)
        sys.exit(2)
    try:
        result = bn_check(_FLAGS.workdir, int(_FLAGS.batches))
    except (FileNotFoundError, ValueError) as e:  # WorkdirError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(result, result["tasks"]))


if __name__ == "__main__":
    define_flags()
    run_lib.usage_on_help(sys.argv)
    app.run(main)
