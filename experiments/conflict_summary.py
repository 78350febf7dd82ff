"""Conflict summary of a comparison: per-pair cosines, Recon's bins, per-module S-scores, Δm%.

Pure functions of the ``metrics.jsonl`` records (:mod:`experiments.train` writes them), so the
summary can be rebuilt from any finished work dir:

* :func:`conflict_summary` ``(records, tasks) -> dict`` (JSON-serialisable; the compare study
  writes it to ``conflict_summary.json`` at the work dir's root);
* :func:`plot_pair_heatmap`: task x task heat map of the mean cosine over training, one panel per
  method (mean over seeds);
* :func:`plot_module_ranking`: per-module S-conflict scores of one method, sorted (bars: mean over
  seeds, whiskers: min-max);
* :func:`conflict_summary_section`: the same as a Markdown section.

Records read (per run label and seed; single-task runs are labelled ``"single:<task>"``):

* the **last** ``conflict`` record: ``steps``; ``pair_cos_sum[group]`` (``float[C(K, 2)]``, the
  sum over steps of each pair's cosine) and ``pair_histogram[group]`` (``int[C(K, 2)][nbins]``,
  counts per Recon bin) -- the :class:`mtl_jax.conflict.ConflictState` fields of the same names; pairs in
  the order of :func:`mtl_jax.conflict.pair_indices` over the run's ``tasks``;
* the ``summary`` record: ``tasks``, ``test`` (final test metrics), ``s_scores`` (Recon's
  S-conflict score per module: (step, pair) events with ``cos < S``).

Definitions. Mean cosine of pair (i, j) over training = ``pair_cos_sum / steps`` (every step,
not only logged ones). Bin shares = ``pair_histogram / steps`` (each row sums to 1). Δm% =
:func:`experiments.metrics.delta_m` (``"per_task"``, Recon's; higher is better) against the mean
over seeds of the single-task runs. Ranking stability = Spearman's rank correlation between the
per-module S-scores of every two seeds of a method (ties get average ranks), averaged over the
seed pairs, plus the overlap of their top-5 modules.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from experiments import metrics as metrics_lib
from experiments.tasks import TaskSpec
from mtl_jax.conflict import RECON_BINS

__all__ = [
    "SINGLE_PREFIX",
    "bin_labels",
    "conflict_summary",
    "conflict_summary_section",
    "plot_module_ranking",
    "plot_pair_heatmap",
    "spearman",
]

SINGLE_PREFIX = "single:"
#: Metrics compared in Δm per task kind (the reports' choice).
DELTA_M_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "segmentation": ("miou", "pixel_acc"),
    "depth": ("abs_err", "rel_err"),
    "normals": ("angle_mean", "angle_median", "within_11_25", "within_22_5", "within_30"),
}
TOP_K = 5


def bin_labels(edges: Sequence[float] = RECON_BINS) -> list[str]:
    """``["[0, 1]", "[-0.01, 0)", ...]``: Recon's bins, highest cosines first."""
    return [f"[{edges[1]:g}, {edges[0]:g}]"] + [
        f"[{edges[i + 1]:g}, {edges[i]:g})" for i in range(1, len(edges) - 1)
    ]


def pair_names(tasks: Sequence[str]) -> list[str]:
    """``"a-b"`` for the pairs i < j (the order of ``pair_indices``)."""
    return [f"{a}-{b}" for a, b in itertools.combinations(tasks, 2)]


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), float)
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks); NaN when either
    side is constant or has fewer than 2 values."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"spearman: the two score vectors differ in length: {a.shape}, {b.shape}.")
    if len(a) < 2:
        return math.nan
    ra, rb = _rank(a), _rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _last_by_run(records: Sequence[dict], kind: str) -> dict[tuple[str, int], dict]:
    last: dict[tuple[str, int], dict] = {}
    for r in records:
        if r.get("kind") == kind:
            key = (r["run"], int(r["seed"]))
            if key not in last or r.get("step", 0) >= last[key].get("step", 0):
                last[key] = r
    return last


def _run_order(records: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["run"] for r in records if "run" in r))


def _reference(
    summaries: Mapping[tuple[str, int], dict], tasks: Sequence[TaskSpec]
) -> dict[str, dict[str, float]]:
    """Single-task reference: mean over seeds of ``single:<task>``'s final test metrics."""
    ref = {}
    for task in tasks:
        runs = [s for (label, _), s in summaries.items() if label == SINGLE_PREFIX + task.name]
        if runs:
            ref[task.name] = {
                m: float(np.mean([r["test"][task.name][m] for r in runs]))
                for m in DELTA_M_METRICS[task.kind]
            }
    return ref


def _pair_stats(conflict: dict | None, names: list[str], group: str, nbins: int) -> dict | None:
    """``{pair: {"mean_cos", "bins"}}`` from a run's last conflict record, or None without the
    per-pair fields (logs written before they existed)."""
    if conflict is None or "pair_cos_sum" not in conflict or conflict.get("steps", 0) < 1:
        return None
    steps = float(conflict["steps"])
    sums = np.asarray(conflict["pair_cos_sum"][group], float)
    hist = np.asarray(conflict["pair_histogram"][group], float).reshape(len(sums), nbins)
    return {
        pair: {"mean_cos": float(sums[p] / steps), "bins": (hist[p] / steps).tolist()}
        for p, pair in enumerate(pair_names(names))
    }


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{mean, std (sample), min, max}`` over the finite values (NaN for none)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _ranking_stability(per_seed: Mapping[int, Mapping[str, int]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    modules = list(dict.fromkeys(m for s in seeds for m in per_seed[s]))
    scores = {s: np.array([per_seed[s].get(m, 0) for m in modules], float) for s in seeds}
    rhos, overlaps = [], []
    for a, b in itertools.combinations(seeds, 2):
        rhos.append(spearman(scores[a], scores[b]))
        top = [
            set(np.array(modules)[np.argsort(-scores[s], kind="stable")][:TOP_K]) for s in (a, b)
        ]
        overlaps.append(len(top[0] & top[1]) / max(1, min(TOP_K, len(modules))))
    mean = {m: float(np.mean([scores[s][i] for s in seeds])) for i, m in enumerate(modules)}
    return {
        "mean_scores": mean,
        "min_scores": {m: float(min(scores[s][i] for s in seeds)) for i, m in enumerate(modules)},
        "max_scores": {m: float(max(scores[s][i] for s in seeds)) for i, m in enumerate(modules)},
        "ranking": sorted(modules, key=lambda m: (-mean[m], modules.index(m))),
        "spearman_mean": float(np.nanmean(rhos))
        if rhos and not np.all(np.isnan(rhos))
        else math.nan,
        "spearman_pairs": rhos,
        f"top{TOP_K}_overlap_mean": float(np.mean(overlaps)) if overlaps else math.nan,
    }


def conflict_summary(
    records: Sequence[dict],
    tasks: Sequence[TaskSpec],
    *,
    group: str = "global",
    edges: Sequence[float] = RECON_BINS,
) -> dict[str, Any]:
    """The conflict summary of a comparison (see the module docstring for the definitions).

    Args:
      records: the ``metrics.jsonl`` records of a work dir (any order; the last ``conflict``
        record per run and seed is used).
      tasks: the data set's tasks (for Δm and the pair names).
      group: the tracker group whose per-pair statistics are summarised (``"global"``: the whole
        shared encoder).
      edges: the tracker's histogram edges (Recon's bins by default).

    Returns:
      ``{"tasks", "pairs", "bins", "group", "reference": {task: {metric}}, "runs": {label:
      {seed: {"pairs": {pair: {"mean_cos", "bins"}} | None, "s_scores", "test", "delta_m"}}},
      "methods": {label: {"seeds", "pairs": {pair: {"mean_cos": {mean, std, min, max}, "bins":
      [mean share per bin]}}, "delta_m": {mean, std, min, max}, "test": {task: {metric: mean}},
      "modules": {"mean_scores", "min_scores", "max_scores", "ranking", "spearman_mean",
      "spearman_pairs", "top5_overlap_mean"}}}}``; single-task labels have no pairs or modules.
    """
    nbins = len(edges) - 1
    summaries = _last_by_run(records, "summary")
    conflicts = _last_by_run(records, "conflict")
    reference = _reference(summaries, tasks)
    have_ref = len(reference) == len(tasks) and len(tasks) > 0
    runs: dict[str, dict[str, Any]] = {}
    methods: dict[str, dict[str, Any]] = {}
    for label in _run_order(records):
        seeds = sorted(seed for (run, seed) in summaries if run == label)
        if not seeds:
            continue
        single = label.startswith(SINGLE_PREFIX)
        per_seed: dict[str, Any] = {}
        for seed in seeds:
            summary = summaries[(label, seed)]
            names = list(summary.get("tasks", [t.name for t in tasks]))
            delta = None
            if have_ref and not single and all(t.name in summary["test"] for t in tasks):
                results = {
                    t.name: {m: summary["test"][t.name][m] for m in DELTA_M_METRICS[t.kind]}
                    for t in tasks
                }
                delta = metrics_lib.delta_m(results, reference, "per_task")
            per_seed[str(seed)] = {
                "pairs": None
                if len(names) < 2
                else _pair_stats(conflicts.get((label, seed)), names, group, nbins),
                "s_scores": {} if len(names) < 2 else dict(summary.get("s_scores", {})),
                "test": summary["test"],
                "delta_m": delta,
            }
        runs[label] = per_seed
        entry: dict[str, Any] = {"seeds": seeds}
        pair_runs = [r["pairs"] for r in per_seed.values() if r["pairs"]]
        if pair_runs:
            entry["pairs"] = {
                pair: {
                    "mean_cos": mean_std([p[pair]["mean_cos"] for p in pair_runs]),
                    "bins": np.mean([p[pair]["bins"] for p in pair_runs], axis=0).tolist(),
                }
                for pair in pair_runs[0]
            }
        deltas = [r["delta_m"] for r in per_seed.values() if r["delta_m"] is not None]
        if deltas:
            entry["delta_m"] = mean_std(deltas)
        entry["test"] = {
            task: {
                metric: float(np.mean([per_seed[str(s)]["test"][task][metric] for s in seeds]))
                for metric, value in metrics.items()
                if isinstance(value, int | float)
            }
            for task, metrics in per_seed[str(seeds[0])]["test"].items()
        }
        # with granularity "global" the tracker's only score is the whole encoder's: no modules
        scores = {
            s: per_seed[str(s)]["s_scores"]
            for s in seeds
            if set(per_seed[str(s)]["s_scores"]) - {"global"}
        }
        if scores and not single:
            entry["modules"] = _ranking_stability(scores)
        methods[label] = entry
    return {
        "tasks": [t.name for t in tasks],
        "pairs": pair_names([t.name for t in tasks]),
        "bins": bin_labels(edges),
        "group": group,
        "reference": reference,
        "runs": runs,
        "methods": methods,
    }


# ---------------------------------------------------------------------------------------------
# Plots and the Markdown section.


def _pair_methods(summary: Mapping[str, Any]) -> list[str]:
    return [label for label, m in summary["methods"].items() if "pairs" in m]


def _cos_matrix(summary: Mapping[str, Any], label: str) -> np.ndarray:
    tasks = summary["tasks"]
    k = len(tasks)
    mat = np.full((k, k), np.nan)
    for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2):
        pair = summary["methods"][label]["pairs"].get(f"{a}-{b}")
        if pair is not None:
            mat[i, j] = mat[j, i] = pair["mean_cos"]["mean"]
    return mat


def plot_pair_heatmap(summary: Mapping[str, Any], path: str) -> None:
    """Task x task heat map of the mean cosine over training (mean over seeds), one panel per
    method; the diagonal is blank. Colours are centred on 0 (red: conflict)."""
    labels = _pair_methods(summary)
    if not labels:
        raise ValueError("plot_pair_heatmap: no method has per-pair statistics in the summary.")
    tasks = summary["tasks"]
    mats = [_cos_matrix(summary, label) for label in labels]
    vmax = max(0.02, float(np.nanmax([np.nanmax(np.abs(m)) for m in mats])))
    size = 1.2 + 0.8 * len(tasks)
    fig, axes = plt.subplots(
        1,
        len(labels),
        figsize=(size * len(labels) + 1.5, size + 0.8),
        squeeze=False,
        sharey=True,
    )
    image = None
    for ax, label, mat in zip(axes[0], labels, mats, strict=True):
        image = ax.imshow(mat, cmap="RdBu", vmin=-vmax, vmax=vmax)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        for i, j in itertools.product(range(len(tasks)), repeat=2):
            if i != j and not np.isnan(mat[i, j]):
                dark = abs(mat[i, j]) > 0.6 * vmax
                ax.text(
                    j,
                    i,
                    f"{mat[i, j]:+.3f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_title(f"{label}", fontsize=10)
        ax.set_xlabel("task")
    axes[0][0].set_ylabel("task")
    cbar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    cbar.set_label(f"mean cos(g_i, g_j) over training ({summary['group']})")
    fig.suptitle("task-pair gradient cosine on the shared encoder (mean over seeds)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_module_ranking(summary: Mapping[str, Any], path: str, method: str | None = None) -> None:
    """Horizontal bars: per-module S-conflict score of ``method`` (default: the first method with
    module scores, normally joint training), mean over seeds with min-max whiskers, sorted, with
    the seeds' mean Spearman rank correlation in the title."""
    labels = [label for label, m in summary["methods"].items() if "modules" in m]
    if not labels:
        raise ValueError("plot_module_ranking: no method has per-module S-scores in the summary.")
    method = method or labels[0]
    if method not in labels:
        raise ValueError(f"plot_module_ranking: no module scores for {method!r}; have {labels}.")
    mod = summary["methods"][method]["modules"]
    order = mod["ranking"]
    mean = np.array([mod["mean_scores"][m] for m in order])
    low = mean - np.array([mod["min_scores"][m] for m in order])
    high = np.array([mod["max_scores"][m] for m in order]) - mean
    names = [m.removeprefix("params/") for m in order]
    colours = [
        "tab:orange" if ("bn" in n.split("/")[-1] or n.endswith("_1")) else "tab:blue"
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(order) + 1.4))
    y = np.arange(len(order))
    ax.barh(y, mean, xerr=np.vstack([low, high]), color=colours, capsize=2)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("S-conflict score: (step, pair) events with cos < S (mean over seeds)")
    ax.set_ylabel("encoder module (orange: BatchNorm)")
    rho = mod["spearman_mean"]
    ax.set_title(
        f"{method}: per-module conflict ranking (Spearman across seeds {rho:.2f})", fontsize=10
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(stats: Mapping[str, float] | None, digits: int = 4) -> str:
    if not stats or math.isnan(stats["mean"]):
        return "–"
    return f"{stats['mean']:+.{digits}f} ± {stats['std']:.{digits}f}"


def conflict_summary_section(summary: Mapping[str, Any], top: int = 10) -> str:
    """Markdown: per-pair mean cosines (every method; mean ± std over seeds and each seed), Recon
    bin shares, the per-module ranking with its stability, and Δm%."""
    pairs, lines = summary["pairs"], ["## Conflict summary", ""]
    labels = _pair_methods(summary)
    lines.append(
        f"Mean cosine over training of each task pair's gradients on the shared encoder "
        f"(`{summary['group']}`), mean ± std over seeds, then each seed; Δm% per task against "
        "the single-task runs (higher is better)."
    )
    lines.append("")
    header = ["method", *pairs, "Δm%"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        m = summary["methods"][label]
        row = [label]
        for pair in pairs:
            stats = m["pairs"].get(pair, {}).get("mean_cos")
            seeds = [
                f"{r['pairs'][pair]['mean_cos']:+.3f}"
                for r in summary["runs"][label].values()
                if r["pairs"] and pair in r["pairs"]
            ]
            row.append(f"{_fmt(stats)} ({', '.join(seeds)})")
        row.append(_fmt(m.get("delta_m"), 2))
        lines.append("| " + " | ".join(row) + " |")
    if labels:
        first = labels[0]
        lines += [
            "",
            f"Share of (step, pair) events per cosine bin, `{first}` (mean over seeds):",
            "",
        ]
        header = ["pair", *summary["bins"]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for pair, stats in summary["methods"][first]["pairs"].items():
            lines.append(
                "| " + " | ".join([pair, *[f"{100 * b:.1f}%" for b in stats["bins"]]]) + " |"
            )
    ranked = [label for label, m in summary["methods"].items() if "modules" in m]
    if ranked:
        lines += ["", "Per-module S-conflict ranking (mean over seeds) and its stability:", ""]
        lines += [
            "| method | Spearman across seeds | top-5 overlap | top modules |",
            "|---|---|---|---|",
        ]
        for label in ranked:
            mod = summary["methods"][label]["modules"]
            names = ", ".join(
                f"{m.removeprefix('params/')} ({mod['mean_scores'][m]:.0f})"
                for m in mod["ranking"][:top]
            )
            lines.append(
                f"| {label} | {mod['spearman_mean']:.2f} | {mod[f'top{TOP_K}_overlap_mean']:.2f} "
                f"| {names} |"
            )
    return "\n".join(lines) + "\n"
