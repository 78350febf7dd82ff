"""``recon``: Recon (Shi et al., ICLR 2023, arXiv 2302.11289) -- search, select, branch, retrain.

Per seed, in phases (``mtl_jax.recon`` does the maths; this module orchestrates):

1. ``search__seed<s>``: train the all-shared model jointly (``recon.search_method``) for
   ``recon.search_epochs`` (the paper: the first 25% of training) with a per-module conflict
   tracker (``conflict.granularity="module"``, probed at every step whatever ``conflict.every``
   says): its summary holds every layer's S-conflict score,
   the number of (step, pair) events with ``cos < S`` (strict), ``S = conflict.severity``.
2. ``select__seed<s>``: Recon's layers (:func:`mtl_jax.recon.select_layers`: the top
   ``recon.k`` by score, or within ``recon.budget`` parameters), and the controls: RSL (as many
   random layers) and RSP (random layers up to the same parameter count); artifact ``layers``
   (JSON: the selections, the scores, the layer sizes).
3. Retrain from scratch, same seed: every base method of ``recon.methods`` all-shared
   (``<m>``) and with Recon's layers branched (``<m>+recon``: per-task copies of the layers'
   parameters, :func:`mtl_jax.recon.branch`, and per-task statistics in every BatchNorm, so each
   task stream is evaluated with its own; the base aggregator sees only the remaining shared
   parameters), and the first method with the RSL / RSP layers (``<m>+rsl``,
   ``<m>+rsp``); single-task references with ``single_task``.

The report adds ``recon_summary.json`` at the work dir's root (per base method and variant, mean
and std over seeds: the share (%) of (step, pair) events with ``cos < S`` and with
``cos < -0.01`` on the remaining shared parameters, the reduction % against the same method
without Recon, parameter counts and increase, test metrics and Δm%), a table, the layer ranking
(bar chart, and its stability across seeds as Spearman rank correlations) and the cosine
histograms before / after.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import ml_collections
import numpy as np

from experiments import lifecycle, reports
from experiments.config import ConfigError, check_keys
from experiments.conflict_summary import mean_std, spearman
from experiments.logs import atomic_write_text
from experiments.phases import Artifacts, MissingArtifactError, Phase
from experiments.studies.base import (
    Study,
    StudyContext,
    check_methods,
    method_spec,
    single_task_runs,
    train_phase,
)
from experiments.train import (
    RunSpec,
    bn_recompute_note,
    init_shapes,
    initial_params,
    run_key,
)
from mtl_jax import recon as recon_lib
from mtl_jax.conflict import RECON_BINS

SEVERE = -0.01  # Table 6's threshold on Multi-Fashion+MNIST: the share of cos < -0.01
VARIANTS = ("base", "recon", "rsl", "rsp")
CONTROLS = ("rsl", "rsp")


def defaults() -> ml_collections.ConfigDict:
    """``config.recon``."""
    return ml_collections.ConfigDict(
        {
            "methods": ("mean", "pcgrad"),  # base methods, each without and with Recon
            "k": 6,  # the number of layers to branch (the paper's K)
            "budget": 0,  # > 0: at most this many parameters in the chosen layers (with k)
            "search_epochs": 0,  # 0: a quarter of train.epochs (the paper's first 25%)
            "search_method": "mean",  # joint training (the official code's search run)
            "init": "copy",  # the copies start from the layer's init ("copy", the paper) or
            # from another initialisation ("fresh", the official code)
            "controls": ("rsl", "rsp"),  # random layers at equal K / equal parameter count
        }
    )


def _search_epochs(config) -> int:
    return int(config.recon.search_epochs) or max(1, int(config.train.epochs) // 4)


def _select_phase(ctx: StudyContext, seed: int, search: RunSpec) -> Phase:
    name = f"select__seed{seed}"
    c = ctx.config.recon

    def run(artifacts: Artifacts) -> dict:
        summary = lifecycle.run_finished(ctx.log, run_key(search))(artifacts)
        if summary is None:
            raise MissingArtifactError(
                f"Phase {name!r} needs the summary of the search run {search.run_id!r}; that "
                "phase must finish first."
            )
        scores = {g: int(v) for g, v in summary["s_scores"].items()}
        params, _ = initial_params(ctx.model, ctx.data.tasks, ctx.data.input_shape, seed)
        sizes = recon_lib.layer_sizes(params["encoder"])
        missing = sorted(set(scores) ^ set(sizes))
        if missing:
            raise ValueError(
                f"The search run's groups and the encoder's layers differ on {missing}; run the "
                "search with conflict.granularity='module'."
            )
        k = int(c.k) if int(c.k) > 0 else None
        budget = int(c.budget) if int(c.budget) > 0 else None
        layers = recon_lib.select_layers(scores, k, budget=budget, sizes=sizes)
        if not layers:
            smallest = min(sizes, key=lambda g: sizes[g])
            raise ConfigError(
                f"Recon selected no layer (seed {seed}): no layer fits within "
                f"recon.budget={budget:,} parameters (the smallest, {smallest!r}, holds "
                f"{sizes[smallest]:,}). Raise recon.budget, or set it to 0 to use recon.k alone."
            )
        count = sum(sizes[name] for name in layers)
        out = {
            "recon": layers,
            "rsl": recon_lib.random_layers(list(scores), len(layers), seed=10_000 + seed),
            "rsp": recon_lib.random_parameters(sizes, count, seed=20_000 + seed),
            "scores": scores,
            "sizes": sizes,
            "severity": float(ctx.config.conflict.severity),
        }
        artifacts.save_json(name, "layers", out)
        return {"recon": layers, "parameters": count}

    return Phase(name=name, run=run, needs=(search.run_id,))


def _layers_fn(workdir: str, select_id: str, variant: str):
    def fn() -> list[str]:
        return Artifacts(workdir).load_json(select_id, "layers")[variant]

    return fn


def runs_and_phases(ctx: StudyContext) -> list[Phase]:
    config, c = ctx.config, ctx.config.recon
    phases: list[Phase] = []
    for seed in map(int, config.seeds):
        name, kwargs = method_spec(config, c.search_method)
        search = RunSpec(
            label="search",
            method=name,
            method_kwargs=kwargs,
            seed=seed,
            epochs=_search_epochs(config),
            info={"recon": "search"},
            conflict_every=1,  # the S-conflict scores select the layers: every step, as the paper
        )
        phases.append(train_phase(ctx, search))
        select = _select_phase(ctx, seed, search)
        phases.append(select)
        for i, method in enumerate(c.methods):
            name, kwargs = method_spec(config, method)
            common = dict(method=name, method_kwargs=kwargs, seed=seed)
            phases.append(train_phase(ctx, RunSpec(label=method, info={"recon": "base"}, **common)))
            for variant in ("recon", *(c.controls if i == 0 else ())):
                spec = RunSpec(
                    label=f"{method}+{variant}",
                    branch_fn=_layers_fn(ctx.workdir, select.name, variant),
                    branch_init=str(c.init),
                    info={"recon": variant},
                    **common,
                )
                phases.append(train_phase(ctx, spec, needs=(select.name,)))
        if config.single_task:
            phases += [train_phase(ctx, spec) for spec in single_task_runs(ctx.data, seed)]
    return phases


def methods(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return (*config.recon.methods, config.recon.search_method)


def validate(config: ml_collections.ConfigDict) -> None:
    check_keys(config.recon, defaults().keys(), "config.recon")
    check_methods(config, methods(config))
    if config.conflict.granularity != "module":
        raise ValueError(
            "The recon study scores layers: set conflict.granularity='module' (got "
            f"{config.conflict.granularity!r})."
        )
    bad = sorted(set(config.recon.controls) - set(CONTROLS))
    if bad:
        raise ValueError(f"Unknown recon.controls {bad}; valid: {list(CONTROLS)}.")
    if config.recon.init not in ("copy", "fresh"):
        raise ValueError(f"recon.init must be 'copy' or 'fresh'; got {config.recon.init!r}.")
    if int(config.recon.k) <= 0 and int(config.recon.budget) <= 0:
        raise ValueError("Give recon.k (a number of layers) or recon.budget (parameters).")


def check_inputs(config: ml_collections.ConfigDict, data: Any, model: Any) -> None:
    """``recon.k`` below the number of the model's encoder layers: Recon branches some layers
    and keeps at least one shared (a ``ConfigError`` naming the layers)."""
    shapes = init_shapes(model, data.tasks, data.input_shape)[0]
    sizes = recon_lib.layer_sizes(shapes["encoder"])
    if len(sizes) < 2:
        raise ConfigError(
            f"Recon branches some encoder layers and keeps the others shared, but model "
            f"{config.model.name!r} has {len(sizes)} encoder layer ({sorted(sizes)}); choose a "
            "model with at least 2 (e.g. mlp, small_resnet, ple)."
        )
    if int(config.recon.k) >= len(sizes):
        raise ConfigError(
            f"config.recon.k={config.recon.k}, but model {config.model.name!r} has "
            f"{len(sizes)} encoder layer(s) ({sorted(sizes)}) and Recon keeps at least one "
            f"shared; set recon.k <= {len(sizes) - 1} (or use recon.budget), or choose a model "
            "with more shared layers."
        )


# ---------------------------------------------------------------------------------------------
# Report.


def _last_conflict(records, run: str, seed: int) -> dict | None:
    found = None
    for r in records:
        if r.get("kind") == "conflict" and r["run"] == run and r["seed"] == seed:
            if found is None or r["step"] >= found["step"]:
                found = r
    return found


def _shares(record: dict, num_pairs: int) -> tuple[float, float]:
    """(% of (step, pair) events with cos < S, % with cos < -0.01) on the tracked (remaining
    shared) parameters, from the run's cumulative counts."""
    events = record["steps"] * num_pairs
    below_s = 100.0 * record["severe"]["global"] / events if events else math.nan
    below_severe = 100.0 * recon_lib.fraction_below(record["histogram"]["global"], SEVERE)
    return below_s, below_severe


def recon_summary(records, tasks, config, workdir: str) -> dict[str, Any]:
    """The content of ``recon_summary.json`` (see the module docstring)."""
    artifacts = Artifacts(workdir)
    num_pairs = len(tasks) * (len(tasks) - 1) // 2
    summaries = {(r["run"], r["seed"]): r for r in records if r.get("kind") == "summary"}
    starts = {(r["run"], r["seed"]): r for r in records if r.get("kind") == "start"}
    ref = reports.single_task_reference(records, tasks)
    seeds = [int(s) for s in config.seeds]
    methods = list(config.recon.methods)
    out: dict[str, Any] = {
        "severity": float(config.conflict.severity),
        "severe_threshold": SEVERE,
        "seeds": seeds,
        "methods": {},
        "layers": {},
    }
    for seed in seeds:
        select = f"select__seed{seed}"
        if artifacts.has(select, "layers"):
            out["layers"][str(seed)] = artifacts.load_json(select, "layers")
    base_shares: dict[tuple[str, int], tuple[float, float]] = {}
    for i, method in enumerate(methods):
        variants = ("base", "recon", *(config.recon.controls if i == 0 else ()))
        per_method: dict[str, Any] = {}
        for variant in variants:
            label = method if variant == "base" else f"{method}+{variant}"
            rows = []
            for seed in seeds:
                summary, conflict = (
                    summaries.get((label, seed)),
                    _last_conflict(records, label, seed),
                )
                if summary is None or conflict is None:
                    continue
                below_s, below_severe = _shares(conflict, num_pairs)
                if variant == "base":
                    base_shares[method, seed] = (below_s, below_severe)
                before = base_shares.get((method, seed))
                start = starts.get((label, seed), {})
                increase = start.get("info", {}).get("parameter_increase")
                row = {
                    "seed": seed,
                    "below_s": below_s,
                    "below_severe": below_severe,
                    "reduction_s": recon_lib.reduction_percent(before[0], below_s)
                    if before and variant != "base"
                    else math.nan,
                    "reduction_severe": recon_lib.reduction_percent(before[1], below_severe)
                    if before and variant != "base"
                    else math.nan,
                    "total_params": summary["encoder_params"] + summary["head_params"],
                    "encoder_params": summary["encoder_params"],
                    "task_specific_params": summary["head_params"]
                    + (
                        increase["absolute"] * len(tasks) // max(len(tasks) - 1, 1)
                        if increase
                        else 0
                    ),
                    "test": summary["test"],
                }
                if len(ref) == len(tasks):
                    row["delta_m"] = reports._delta_m(summary, tasks, ref, "per_task")
                rows.append(row)
            if not rows:
                continue
            entry = {
                key: mean_std([r[key] for r in rows])
                for key in (
                    "below_s",
                    "below_severe",
                    "reduction_s",
                    "reduction_severe",
                    "total_params",
                    "task_specific_params",
                )
            }
            if "delta_m" in rows[0]:
                entry["delta_m"] = mean_std([r["delta_m"] for r in rows])
            entry["test"] = {
                t.name: {
                    m: mean_std([r["test"][t.name][m] for r in rows])
                    for m in reports.REPORTED_METRICS[t.kind]
                }
                for t in tasks
            }
            entry["per_seed"] = rows
            per_method[variant] = entry
        base = per_method.get("base", {}).get("total_params", {}).get("mean")
        for entry in per_method.values():
            total = entry["total_params"]["mean"]
            entry["parameter_increase_percent"] = (
                100.0 * (total - base) / base if base else math.nan
            )
        out["methods"][method] = per_method
    # ranking stability: Spearman correlation of the layer scores between every pair of seeds
    score_vectors = {
        seed: layers["scores"] for seed, layers in out["layers"].items() if layers.get("scores")
    }
    pairs = list(itertools.combinations(sorted(score_vectors), 2))
    names = list(next(iter(score_vectors.values()))) if score_vectors else []
    out["ranking_spearman"] = {
        f"{a}-{b}": spearman(
            [score_vectors[a][n] for n in names], [score_vectors[b][n] for n in names]
        )
        for a, b in pairs
    }
    return out


def _plot_ranking(summary: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    layers = summary["layers"]
    if not layers:
        return
    names = list(next(iter(layers.values()))["scores"])
    scores = np.array([[v["scores"][n] for n in names] for v in layers.values()], dtype=float)
    order = np.argsort(-scores.mean(0), kind="stable")
    chosen = set(itertools.chain.from_iterable(v["recon"] for v in layers.values()))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.8))
    colors = ["tab:red" if names[i] in chosen else "tab:gray" for i in order]
    ax.bar(range(len(names)), scores.mean(0)[order], yerr=scores.std(0)[order], color=colors)
    ax.set_xticks(range(len(names)), [names[i] for i in order], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(f"S-conflict score (cos < {summary['severity']:g})")
    ax.set_title("Recon's layer ranking (mean ± std over seeds; red: chosen in some seed)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_histograms(records, config, path: str) -> None:
    """Recon's cosine bins on the remaining shared parameters, per variant (all seeds pooled)."""
    import matplotlib.pyplot as plt

    labels = [
        m if v == "base" else f"{m}+{v}"
        for i, m in enumerate(config.recon.methods)
        for v in ("base", "recon", *(config.recon.controls if i == 0 else ()))
    ]
    totals = {}
    for label in labels:
        for seed in config.seeds:
            c = _last_conflict(records, label, int(seed))
            if c is not None:
                totals[label] = totals.get(label, 0) + np.asarray(c["histogram"]["global"], float)
    if not totals:
        return
    edges = RECON_BINS
    names = [f"[{edges[1]:g}, {edges[0]:g}]"] + [
        f"[{edges[i + 1]:g}, {edges[i]:g})" for i in range(1, len(edges) - 1)
    ]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(totals)
    colors = reports.run_colors(list(totals))
    for i, (label, h) in enumerate(totals.items()):
        share = 100 * h / max(h.sum(), 1)
        x = np.arange(len(names)) + i * width - 0.4 + width / 2
        ax.bar(x, share, width, label=label, color=colors[label])
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylabel("% of (step, pair) events")
    ax.set_xlabel("cos(g_i, g_j) on the remaining shared parameters (Recon's bins)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(records, tasks, config, workdir: str) -> str:
    import json

    summary = recon_summary(records, tasks, config, workdir)
    atomic_write_text(
        os.path.join(workdir, "recon_summary.json"),
        json.dumps(summary, indent=2, allow_nan=True) + "\n",
    )
    s = summary["severity"]
    header = [
        "method",
        "variant",
        f"% cos < {s:g}",
        "% cos < -0.01",
        "reduction % (< -0.01)",
        "params",
        "increase %",
        *[f"{t.name} {reports.display_name(reports.REPORTED_METRICS[t.kind][0])}" for t in tasks],
        "Δm%",
    ]
    lines = [
        "## Recon: conflicts on the remaining shared parameters, with and without Recon",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]

    def cell(entry: dict, digits: int = 2) -> str:
        if math.isnan(entry["mean"]):
            return "–"
        if len(summary["seeds"]) == 1:
            return f"{entry['mean']:.{digits}f}"
        return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"

    for method, variants in summary["methods"].items():
        for variant, e in variants.items():
            row = [method, variant, cell(e["below_s"]), cell(e["below_severe"])]
            row.append("" if variant == "base" else cell(e["reduction_severe"], 1))
            row += [f"{e['total_params']['mean']:.0f}", f"{e['parameter_increase_percent']:.2f}"]
            for t in tasks:
                metric = reports.REPORTED_METRICS[t.kind][0]
                value = e["test"][t.name][metric]
                scale = 100.0 if metric in reports.PERCENT_FRACTIONS else 1.0
                row.append(
                    cell({**value, "mean": value["mean"] * scale, "std": value["std"] * scale})
                )
            row.append(cell(e["delta_m"]) if "delta_m" in e else "–")
            lines.append("| " + " | ".join(row) + " |")
    rho = summary["ranking_spearman"]
    chosen = {seed: v["recon"] for seed, v in summary["layers"].items()}
    lines += [
        "",
        f"Shares of (step, pair) events over the whole retraining, on the shared parameters that "
        f"remain after branching (all of the encoder for `base`); S = {s:g} is the search's "
        "severity. Reduction %: relative drop of the share of cos < -0.01 against the same "
        "method without Recon, same seed (Recon Table 6: -70% to -80%). Params: encoder + heads; "
        "increase % against the all-shared model. RSL / RSP: random layers at equal K / equal "
        "parameter count, with the first method.",
        "",
        "Chosen layers per seed: "
        + "; ".join(f"seed {seed}: {', '.join(layers)}" for seed, layers in chosen.items())
        + ".",
        "Ranking stability (Spearman correlation of the layer scores between seeds): "
        + (", ".join(f"{k}: {v:.2f}" for k, v in rho.items()) if rho else "one seed")
        + ".",
    ]
    note = bn_recompute_note(config)
    if note:
        lines += ["", note]
    if config.report.plots:
        os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
        _plot_ranking(summary, os.path.join(workdir, "plots", "recon_ranking.png"))
        _plot_histograms(records, config, os.path.join(workdir, "plots", "recon_histograms.png"))
        lines += [
            "",
            "![recon_ranking.png](plots/recon_ranking.png)",
            "![recon_histograms.png](plots/recon_histograms.png)",
        ]
    return "\n".join(lines)


STUDY = Study(
    name="recon",
    description="Recon: search (per-layer conflict scores) -> select -> branch -> retrain",
    phases=runs_and_phases,
    section="recon",
    defaults=defaults,
    validate=validate,
    report=report,
    check_inputs=check_inputs,
    methods=methods,
)
