"""Reports from ``metrics.jsonl``: the comparison table (Markdown) and PNG plots.

Everything here reads the log only, so a report can be rebuilt from a finished (or resumed) work
dir: ``python -m experiments.report --workdir DIR``.

Plots (matplotlib, Agg): ``losses.png`` (training loss per task), ``test_metrics.png`` (main test
metric per task and epoch), ``conflict_incidence.png`` (p% over training), ``cos_histogram.png``
(Recon's bins, Table 6), ``weights.png`` (aggregator weights over training). Curves are means over
seeds, with the min-max band.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from experiments import metrics as metrics_lib
from experiments.tasks import TaskSpec
from mtl_jax.conflict import RECON_BINS

#: The metrics reported per task kind (the first is the one plotted) and used in Δm.
REPORTED_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1"),
    "segmentation": ("miou", "pixel_acc"),
    "depth": ("abs_err", "rel_err"),
    "normals": ("angle_mean", "angle_median", "within_11_25", "within_22_5", "within_30"),
}
DELTA_M_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "segmentation": ("miou", "pixel_acc"),
    "depth": ("abs_err", "rel_err"),
    "normals": ("angle_mean", "angle_median", "within_11_25", "within_22_5", "within_30"),
}
SINGLE_PREFIX = "single:"


def _by_run(records: Iterable[dict], kind: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("kind") == kind:
            out[r["run"]].append(r)
    return out


def run_order(records: Sequence[dict]) -> list[str]:
    """Run labels in order of first appearance."""
    return list(dict.fromkeys(r["run"] for r in records if "run" in r))


def _mean_std(values: Sequence[float], digits: int | None = None) -> str:
    """``mean ± std`` over seeds; ``digits`` fixed decimals, else 4 significant digits."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "–"
    if digits is not None:
        if len(vals) == 1:
            return f"{vals[0]:.{digits}f}"
        return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"
    if len(vals) == 1:
        return f"{vals[0]:.4g}"
    return f"{np.mean(vals):.4g} ± {np.std(vals, ddof=1):.2g}"


#: Metrics stored as fractions in [0, 1] and shown in % (accuracy is already a percentage).
PERCENT_FRACTIONS = ("macro_f1",)


def display_name(metric: str) -> str:
    return f"{metric} %" if metric in PERCENT_FRACTIONS else metric


def _display(metric: str, value: float | None) -> float | None:
    if value is None:
        return None
    return 100.0 * value if metric in PERCENT_FRACTIONS else value


def single_task_reference(
    records: Sequence[dict], tasks: Sequence[TaskSpec]
) -> dict[str, dict[str, float]]:
    """Mean over seeds of the single-task runs' final test metrics: ``{task: {metric: value}}``."""
    summaries = _by_run(records, "summary")
    ref = {}
    for task in tasks:
        runs = summaries.get(SINGLE_PREFIX + task.name, [])
        if runs:
            keys = DELTA_M_METRICS[task.kind]
            ref[task.name] = {
                k: float(np.mean([r["test"][task.name][k] for r in runs])) for k in keys
            }
    return ref


def _delta_m(
    summary: dict,
    tasks: Sequence[TaskSpec],
    ref: Mapping[str, Mapping[str, float]],
    aggregation: str,
):
    results = {
        t.name: {k: summary["test"][t.name][k] for k in DELTA_M_METRICS[t.kind]} for t in tasks
    }
    return metrics_lib.delta_m(results, ref, aggregation)


def comparison_table(records: Sequence[dict], tasks: Sequence[TaskSpec]) -> str:
    """One row per run label: final test metrics (mean ± std over seeds), Δm (both aggregations,
    against the single-task runs if present), conflict incidence (all steps, last half), mean
    pairwise cosine, ms per step."""
    summaries = _by_run(records, "summary")
    train = _by_run(records, "train")
    ref = single_task_reference(records, tasks)
    have_ref = len(ref) == len(tasks)
    # per-task and flat Δm can only differ when some task has more than one Δm metric
    both_dm = any(len(DELTA_M_METRICS[t.kind]) > 1 for t in tasks)
    header = ["method", "seeds"]
    for t in tasks:
        header += [f"{t.name} {display_name(m)}" for m in REPORTED_METRICS[t.kind]]
    if have_ref:
        header += ["Δm% per-task", "Δm% flat"] if both_dm else ["Δm%"]
    header += ["p% all", "p% last half", "mean cos", "ms/step", "probe ms", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in run_order(records):
        runs = summaries.get(label)
        if not runs:
            continue
        single = label.startswith(SINGLE_PREFIX)
        row = [label, str(len(runs))]
        for t in tasks:
            for m in REPORTED_METRICS[t.kind]:
                row.append(
                    _mean_std(
                        [_display(m, r["test"][t.name][m]) for r in runs if t.name in r["test"]]
                    )
                )
        if have_ref:
            aggregations = ("per_task", "flat") if both_dm else ("per_task",)
            for aggregation in aggregations:
                row.append(
                    ""
                    if single
                    else _mean_std([_delta_m(r, tasks, ref, aggregation) for r in runs])
                )
        if len(runs[0]["tasks"]) < 2:  # no task pairs
            row += ["", "", ""]
        else:
            row.append(_mean_std([r["incidence_all"].get("global", math.nan) for r in runs]))
            row.append(_mean_std([r["incidence_last_half"].get("global", math.nan) for r in runs]))
            cos = [
                np.mean(
                    [x["mean_cos"] for x in train.get(label, []) if x["seed"] == r["seed"]]
                    or [math.nan]
                )
                for r in runs
            ]
            row.append(_mean_std(cos, digits=4))
        row.append(_mean_std([1e3 * r["seconds_per_step"] for r in runs]))
        row.append(_mean_std([1e3 * r.get("probe_seconds", math.nan) for r in runs]))
        row.append(_mean_std([r.get("wall_seconds", math.nan) for r in runs]))
        lines.append("| " + " | ".join(row) + " |")
    notes = [
        "",
        "Test metrics at the end of training. p%: share of task pairs with negative cosine between "
        "their gradients on the shared parameters, over all steps and over the last half of the "
        "epochs, as measured by the conflict probe (every conflict.every steps). mean cos: mean "
        "pairwise cosine over the logged steps (the last probe's). ms/step: median of the "
        "method's own step (compilation, evaluation and checkpoints excluded); probe ms: median "
        "of one conflict probe (the encoder Jacobian and the tracker), apart; wall s: the run's "
        "wall time from its start to its last epoch (all processes of a resumed run).",
    ]
    if have_ref:
        notes.append(
            "Δm%: relative improvement over the single-task runs (higher is better); per-task: mean "
            "over each task's metrics, then over tasks (Recon); flat: mean over all metrics (ST)."
            + (
                ""
                if both_dm
                else " Here every task has one Δm metric, so the two aggregations are equal."
            )
        )
    notes.append(
        "Accuracy and macro F1 in %. plots/weights.png shows each method's weights on its own "
        "scale: mean's sum to 1, PCGrad's (the sum of projected gradients) to about K, MGDA's to 1."
    )
    return "\n".join(lines + notes)


# ---------------------------------------------------------------------------------------------
# Plots.


def _curves(
    records: Sequence[dict], x_key: str, y_fn
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``{run: (x, mean, min, max)}`` over seeds, aligned on the x values every seed has."""
    per_run: dict[str, dict[int, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        y = y_fn(r)
        if y is not None:
            per_run[r["run"]][r["seed"]][r[x_key]] = y
    out = {}
    for run, seeds in per_run.items():
        xs = sorted(set.intersection(*(set(v) for v in seeds.values())))
        if not xs:
            continue
        ys = np.array([[seeds[s][x] for x in xs] for s in seeds])
        out[run] = (np.array(xs), ys.mean(0), ys.min(0), ys.max(0))
    return out


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or y.shape[0] < width:
        return y
    kernel = np.ones(width) / width
    padded = np.concatenate([np.full(width - 1, y[0]), y])
    return np.convolve(padded, kernel, mode="valid")


def run_colors(runs: Sequence[str]) -> dict[str, Any]:
    """One distinct colour per run (tab10 up to 10 runs, tab20 up to 20, then a continuous map),
    the same in every plot of a report."""
    runs = list(dict.fromkeys(runs))
    n = len(runs)
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    return {run: cmap(i if n <= 20 else i / max(n - 1, 1)) for i, run in enumerate(runs)}


def _plot_curves(ax, curves, smooth: int = 1, colors: Mapping[str, Any] | None = None) -> None:
    colors = colors or run_colors(list(curves))
    for run, (x, mean, lo, hi) in curves.items():
        (line,) = ax.plot(x, _smooth(mean, smooth), label=run, lw=1.4, color=colors.get(run))
        if smooth <= 1:
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.grid(alpha=0.3)


def _figure_legend(fig, axes, ncol_max: int = 6) -> None:
    """One legend for the whole figure, below the panels (every panel shares the runs)."""
    handles, labels = {}, {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
            labels.setdefault(label, label)
    if handles:
        ncol = min(ncol_max, len(handles))
        fig.legend(
            list(handles.values()),
            list(labels),
            loc="lower center",
            ncol=ncol,
            fontsize=8,
            frameon=False,
        )
        rows = math.ceil(len(handles) / ncol)
        fig.tight_layout(rect=(0, 0.05 * rows + 0.02, 1, 1))
    else:
        fig.tight_layout()


def _grid(n: int, width: float = 4.2, height: float = 3.2):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_losses(records, tasks, path: str) -> None:
    train = [
        r for r in records if r.get("kind") == "train" and not r["run"].startswith(SINGLE_PREFIX)
    ]
    fig, axes = _grid(len(tasks))
    colors = run_colors(run_order(train))
    for ax, task in zip(axes, tasks, strict=True):
        curves = _curves(train, "step", lambda r, t=task.name: r["loss"].get(t))
        _plot_curves(ax, curves, smooth=5, colors=colors)
        ax.set_title(f"training loss: {task.name}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{task.name} loss (log scale)")
        ax.set_yscale("log")
    _figure_legend(fig, axes)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_test_metrics(records, tasks, path: str) -> None:
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = _grid(len(tasks))
    colors = run_colors(run_order(evals))
    for ax, task in zip(axes, tasks, strict=True):
        metric = REPORTED_METRICS[task.kind][0]
        curves = _curves(
            evals,
            "epoch",
            lambda r, t=task.name, m=metric: _display(m, r["metrics"].get(t, {}).get(m)),
        )
        _plot_curves(ax, curves, colors=colors)
        ax.set_title(f"test {metric}: {task.name}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{display_name(metric)} ({task.name})")
    _figure_legend(fig, axes)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_incidence(records, path: str) -> None:
    train = [
        r for r in records if r.get("kind") == "train" and not r["run"].startswith(SINGLE_PREFIX)
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    colors = run_colors(run_order(train))
    _plot_curves(ax1, _curves(train, "step", lambda r: r["incidence"]), smooth=20, colors=colors)
    ax1.set_title("conflict incidence p% (moving average)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("% task pairs with cos < 0")
    _plot_curves(ax2, _curves(train, "step", lambda r: r["mean_cos"]), smooth=20, colors=colors)
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_title("mean pairwise cosine (moving average)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("mean cos(g_i, g_j)")
    _figure_legend(fig, (ax1, ax2))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _final_histograms(records) -> dict[str, np.ndarray]:
    last: dict[tuple[str, int], dict] = {}
    for r in records:
        if r.get("kind") == "conflict" and not r["run"].startswith(SINGLE_PREFIX):
            key = (r["run"], r["seed"])
            if key not in last or r["step"] >= last[key]["step"]:
                last[key] = r
    totals: dict[str, np.ndarray] = {}
    for (run, _), r in last.items():
        h = np.asarray(r["histogram"]["global"], dtype=float)
        totals[run] = totals.get(run, 0) + h
    return {run: 100 * h / max(h.sum(), 1) for run, h in totals.items()}


def plot_cos_histogram(records, path: str, edges: Sequence[float] = RECON_BINS) -> None:
    hists = _final_histograms(records)
    labels = [f"[{edges[1]:g}, {edges[0]:g}]"] + [
        f"[{edges[i + 1]:g}, {edges[i]:g})" for i in range(1, len(edges) - 1)
    ]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(1, len(hists))
    x = np.arange(len(labels))
    colors = run_colors(list(hists))
    for i, (run, h) in enumerate(hists.items()):
        ax.bar(x + i * width - 0.4 + width / 2, h, width, label=run, color=colors[run])
    ax.set_xticks(x, labels)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylabel("% of (step, pair) events")
    ax.set_xlabel("cos(g_i, g_j) bin (Recon, Table 6)")
    ax.set_title("pairwise gradient cosines over training")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(records, tasks, path: str) -> None:
    train = [
        r
        for r in records
        if r.get("kind") == "train"
        and isinstance(r["weights"], list)
        and len(r["weights"]) == len(tasks)  # runs of all tasks, with a global weight vector
    ]
    runs = run_order(train)
    if not runs:
        return
    fig, axes = _grid(len(runs))
    for ax, run in zip(axes, runs, strict=True):
        for k, task in enumerate(tasks):
            curves = _curves(
                [r for r in train if r["run"] == run], "step", lambda r, k=k: r["weights"][k]
            )
            for _, (x, mean, _, _) in curves.items():
                ax.plot(x, _smooth(mean, 5), label=task.name, lw=1.2)
        ax.set_title(f"weights: {run}")
        ax.set_xlabel("step")
        ax.set_ylabel("w_k in d = sum_k w_k g_k")
        ax.grid(alpha=0.3)
        if len(tasks) <= 10:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(records: Sequence[dict], tasks: Sequence[TaskSpec], outdir: str) -> list[str]:
    os.makedirs(outdir, exist_ok=True)
    paths = {
        "losses": os.path.join(outdir, "losses.png"),
        "test_metrics": os.path.join(outdir, "test_metrics.png"),
        "conflict_incidence": os.path.join(outdir, "conflict_incidence.png"),
        "cos_histogram": os.path.join(outdir, "cos_histogram.png"),
        "weights": os.path.join(outdir, "weights.png"),
    }
    plot_losses(records, tasks, paths["losses"])
    plot_test_metrics(records, tasks, paths["test_metrics"])
    plot_incidence(records, paths["conflict_incidence"])
    plot_cos_histogram(records, paths["cos_histogram"])
    plot_weights(records, tasks, paths["weights"])
    return [p for p in paths.values() if os.path.exists(p)]


def write_report(
    records: Sequence[dict],
    tasks: Sequence[TaskSpec],
    workdir: str,
    title: str,
    plots: bool = True,
    sections: Sequence[str] = (),
) -> str:
    """Writes ``report.md`` (and the plots) into ``workdir``; returns the Markdown."""
    table = comparison_table(records, tasks)
    parts = [f"# {title}", "", *[p for s in sections for p in (s, "")], "## All runs", "", table]
    if plots:
        paths = make_plots(records, tasks, os.path.join(workdir, "plots"))
        parts += ["", "## Plots", ""] + [
            f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in paths
        ]
    text = "\n".join(parts) + "\n"
    from experiments.logs import atomic_write_text

    atomic_write_text(os.path.join(workdir, "report.md"), text)
    return text


def summary_rows(records: Sequence[dict]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "summary"]
