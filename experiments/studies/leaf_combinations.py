"""``leaf_combinations``: all 2^3 on/off subsets of {PCGrad, Modulation, LaSS} (Alison et al.,
CommIT 18(1) 2024) on the same seeds, per-task macro F1 and their mean.

LaSS variants are four kinds of phase: train (stage 1) -> fine-tune a copy per task (one phase
each, from stage 1's ``final`` artifact) -> prune (each fine-tuned encoder's weight tensors by
magnitude, per task: the artifact ``masks``) -> continue from stage 1 with ``theta * M_t`` through
``mtl.per_task`` (stage 2). Modulation variants use the model's ``TaskModulation`` scales as
per-task copies.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import models as models_lib
from experiments.config import check_keys, parse_method
from experiments.phases import Artifacts, Phase
from experiments.studies.base import Study, StudyContext, fmt, summaries, train_phase
from experiments.train import RunSpec, load_final_params
from mtl_jax import lass as lass_lib
from mtl_jax import modules as modules_lib
from mtl_jax import sharing as sharing_lib

PyTree = Any

COMPONENTS = ("pcgrad", "modulation", "lass")


def defaults() -> ml_collections.ConfigDict:
    """``config.combinations`` (used by the ``leaf_combinations`` study)."""
    return ml_collections.ConfigDict(
        {
            "stage1_epochs": 20,  # multi-task training (all variants; LaSS prunes after it)
            "finetune_epochs": 5,  # LaSS: per-task fine-tuning of a copy
            "stage2_epochs": 10,  # continued training (LaSS: with theta * M_t)
            "prune_fraction": 0.3,  # LaSS's `prob`: share of each weight tensor pruned per task
            "modulation_blocks": (1, 2, 3),  # conv blocks followed by a TaskModulation
            "pcgrad_kwargs": "",  # e.g. "shuffle=True"
        }
    )


def combination_label(pcgrad: bool, modulation: bool, lass: bool) -> str:
    parts = [
        n
        for n, on in zip(("PCGrad", "Modulation", "LaSS"), (pcgrad, modulation, lass), strict=True)
        if on
    ]
    return "+".join(parts) if parts else "baseline"


def _modulated_model(config: ml_collections.ConfigDict, data):
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    if "modulation" not in model_config:
        raise ValueError(
            f"leaf_combinations needs a model with a 'modulation' option (small_cnn); got {config.model.name!r}."
        )
    model_config.modulation = tuple(config.combinations.modulation_blocks)
    return models_lib.make_model(model_config, data.tasks, data.input_shape)


def _prune_phase(ctx: StudyContext, name: str, finetune_ids: Sequence[str]) -> Phase:
    """LaSS step 3: per-task magnitude masks of the fine-tuned copies' encoders (modulation
    scales excluded), saved as the artifact ``masks`` (bool, leaves ``[K, *param.shape]``)."""
    fraction = float(ctx.config.combinations.prune_fraction)

    def run(artifacts: Artifacts) -> dict:
        finetuned = [load_final_params(artifacts, run_id)[0]["encoder"] for run_id in finetune_ids]
        include = lambda path: not modules_lib.is_modulation(path)
        masks = lass_lib.lass_masks(finetuned, fraction, include=include)
        artifacts.save_arrays(name, "masks", masks)
        sizes = lass_lib.subnetwork_sizes(masks)
        return {"fraction": [float(v) for v in sizes["fraction"]]}

    return Phase(name=name, run=run, needs=tuple(finetune_ids))


def _lass_sharing_fn(workdir: str, prune_phase: str, modulation: bool):
    """``encoder params -> spec``: the LaSS masks (the prune phase's artifact), merged with the
    per-task modulation scales when present."""

    def fn(encoder_params: PyTree) -> PyTree:
        masks = Artifacts(workdir).load_arrays(prune_phase, "masks")
        spec = sharing_lib.spec_from_masks(jax.tree.map(np.asarray, masks))
        if modulation:
            spec = sharing_lib.merge_specs(spec, modules_lib.modulation_spec(encoder_params))
        return spec

    return fn


def phases(ctx: StudyContext) -> list[Phase]:
    """Per seed and combination: one training phase; with LaSS: stage 1 -> one fine-tuning phase
    per task -> prune (masks artifact) -> stage 2 from stage 1's parameters with the masks."""
    config, data = ctx.config, ctx.data
    c = config.combinations
    modulated = _modulated_model(config, data)
    _, pc_kwargs = parse_method(f"pcgrad:{c.pcgrad_kwargs}" if c.pcgrad_kwargs else "pcgrad")
    out: list[Phase] = []
    for seed in config.seeds:
        seed = int(seed)
        for pcgrad, modulation, lass in itertools.product((False, True), repeat=3):
            label = combination_label(pcgrad, modulation, lass)
            method, kwargs = ("pcgrad", pc_kwargs) if pcgrad else ("mean", {})
            common = dict(
                method=method,
                method_kwargs=kwargs,
                seed=seed,
                model=modulated if modulation else None,
                info={"pcgrad": pcgrad, "modulation": modulation, "lass": lass},
            )
            mod_spec = modules_lib.modulation_spec if modulation else None
            if not lass:
                epochs = int(c.stage1_epochs) + int(c.stage2_epochs)
                spec = RunSpec(label=label, sharing_fn=mod_spec, epochs=epochs, **common)
                out.append(train_phase(ctx, spec))
                continue
            stage1 = RunSpec(
                label=f"{label}/stage1", sharing_fn=mod_spec, epochs=int(c.stage1_epochs), **common
            )
            finetunes = [
                RunSpec(
                    label=f"{label}/finetune:{t.name}",
                    method="mean",
                    seed=seed,
                    tasks=(t.name,),
                    model=common["model"],
                    sharing_fn=mod_spec,
                    init_from=stage1.run_id,
                    epochs=int(c.finetune_epochs),
                )
                for t in data.tasks
            ]
            prune = f"{label}/prune__seed{seed}"
            final = RunSpec(
                label=label,
                sharing_fn=_lass_sharing_fn(ctx.workdir, prune, modulation),
                init_from=stage1.run_id,
                epochs=int(c.stage2_epochs),
                **common,
            )
            out.append(train_phase(ctx, stage1))
            out += [train_phase(ctx, f) for f in finetunes]
            out.append(_prune_phase(ctx, prune, [f.run_id for f in finetunes]))
            out.append(train_phase(ctx, final, needs=(prune,)))
    return out


#: Alison et al. 2024 (CommIT), abstract: task-averaged F1 (docs/design/METHODS.md section 3).
PAPER_MEAN_F1 = {"PCGrad+LaSS": 0.847, "PCGrad": 0.828, "LaSS": 0.823, "Modulation": 0.820}


def mean_f1_by_seed(runs: Sequence[dict], task_names: Sequence[str]) -> dict[int, float]:
    """``{seed: mean over tasks of the test macro F1}`` of one combination's summary records."""
    return {
        int(r["seed"]): float(np.mean([r["test"][t]["macro_f1"] for t in task_names])) for r in runs
    }


def _paired(better: dict[int, float], worse: dict[int, float]) -> tuple[float, int, int]:
    """``(mean of better - worse over the shared seeds, seeds where better > worse, seeds)``."""
    seeds = sorted(set(better) & set(worse))
    diffs = [better[s] - worse[s] for s in seeds]
    return (float(np.mean(diffs)) if diffs else float("nan"), sum(d > 0 for d in diffs), len(seeds))


def paper_claims(by_seed: dict[str, dict[int, float]]) -> list[tuple[str, str, str]]:
    """The paper's claims (METHODS.md section 3) checked on these runs: ``(claim, verdict,
    evidence)``. A claim "A > B" holds when A's mean F1 minus B's, paired by seed and averaged,
    is positive; the evidence gives that difference and on how many seeds A > B (no
    significance test: three seeds cannot carry one)."""

    def compare(a: str, b: str) -> tuple[bool | None, str]:
        if a not in by_seed or b not in by_seed:
            return None, "not run"
        diff, wins, n = _paired(by_seed[a], by_seed[b])
        paper = PAPER_MEAN_F1.get(a, float("nan")) - PAPER_MEAN_F1.get(b, float("nan"))
        evidence = f"{a} - {b} = {diff:+.3f} (paper {paper:+.3f}); {a} higher on {wins}/{n} seeds"
        return diff > 0, evidence

    def verdict(ok: bool | None) -> str:
        return "not run" if ok is None else ("holds" if ok else "does not hold")

    out = []
    for rival in ("PCGrad", "LaSS", "Modulation"):
        ok, evidence = compare("PCGrad+LaSS", rival)
        out.append((f"PCGrad+LaSS > {rival} alone", verdict(ok), evidence))
    for a, b in (("PCGrad", "LaSS"), ("LaSS", "Modulation")):
        ok, evidence = compare(a, b)
        out.append((f"{a} > {b} (the paper's order of the single methods)", verdict(ok), evidence))
    if "PCGrad+LaSS" in by_seed and len(by_seed) > 1:
        means = {label: float(np.mean(list(v.values()))) for label, v in by_seed.items()}
        best = max(means, key=means.get)
        out.append(
            (
                "PCGrad+LaSS is the best combination (highest mean F1)",
                verdict(best == "PCGrad+LaSS"),
                f"best: {best} {means[best]:.3f}; PCGrad+LaSS {means['PCGrad+LaSS']:.3f}",
            )
        )
    return out


def report(records, tasks, config, workdir: str) -> str:
    """Per-task accuracy and macro F1 and the mean F1 for the 8 combinations (mean ± std over
    seeds), the paper's numbers beside them, the paper's claims checked, and a bar chart."""
    by_label = summaries(records)
    labels = [combination_label(*bits) for bits in itertools.product((False, True), repeat=3)]
    task_names = [t.name for t in tasks]
    header = [
        "combination",
        *[f"{t} accuracy %" for t in task_names],
        *[f"{t} macro F1" for t in task_names],
        "mean F1",
        "paper mean F1",
        "LaSS sub-network %",
    ]
    lines = [
        "## Leaf combinations: per-task accuracy and macro F1",
        "",
        "| " + " | ".join(header) + " |",
    ]
    lines.append("|" + "---|" * len(header))
    bars, by_seed = {}, {}
    for label in labels:
        runs = by_label.get(label, [])
        if not runs:
            continue
        accuracy = {t: [r["test"][t]["accuracy"] for r in runs] for t in task_names}
        f1 = {t: [r["test"][t]["macro_f1"] for r in runs] for t in task_names}
        by_seed[label] = mean_f1_by_seed(runs, task_names)
        bars[label] = list(by_seed[label].values())
        subnet = [r["info"]["subnetwork"]["fraction"] for r in runs if "subnetwork" in r["info"]]
        sizes = (
            " / ".join(fmt([100 * f[k] for f in subnet], 1) for k in range(len(tasks)))
            if subnet
            else ""
        )
        row = [label, *[fmt(accuracy[t], 1) for t in task_names]]
        row += [*[fmt(f1[t], 3) for t in task_names], fmt(bars[label], 3)]
        row += [f"{PAPER_MEAN_F1[label]:.3f}" if label in PAPER_MEAN_F1 else "", sizes]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "LaSS sub-network %: share of the encoder's prunable weights in each task's sub-network "
        "(task order as in the columns). "
        "Accuracy and macro F1 on the test split at the end of training, mean ± std over seeds; "
        "all combinations share the seeds and the number of multi-task epochs (LaSS variants "
        f"also fine-tune a copy per task for {config.combinations.finetune_epochs} epochs). "
        "Paper: Alison et al. 2024 (CommIT), task-averaged F1 on plant_leaves (its averaging is "
        "unverified).",
    ]
    claims = paper_claims(by_seed)
    if claims:
        lines += ["", "### The paper's claims on these runs", "", "| claim | verdict | evidence |"]
        lines.append("|---|---|---|")
        lines += [f"| {c} | {v} | {e} |" for c, v, e in claims]
        lines += [
            "",
            "A claim holds when the mean F1 difference, paired by seed, has the paper's sign; "
            "with three seeds this is no significance test (see the per-seed counts).",
        ]
    if bars:
        path = os.path.join(workdir, "plots", "leaf_combinations.png")
        _bar_chart(bars, path)
        lines += ["", "![leaf_combinations.png](plots/leaf_combinations.png)"]
    return "\n".join(lines)


def _bar_chart(bars: dict[str, list[float]], path: str) -> None:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    labels = list(bars)
    means = [np.mean(v) for v in bars.values()]
    errs = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in bars.values()]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color="tab:green", alpha=0.8)
    for i, v in enumerate(bars.values()):
        ax.scatter(np.full(len(v), i), v, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("mean macro F1 over the tasks")
    lo = min(min(v) for v in bars.values())
    ax.set_ylim(max(0.0, lo - 0.1), min(1.0, max(max(v) for v in bars.values()) + 0.05))
    ax.set_title("PCGrad x Modulation x LaSS (mean ± std over seeds; dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validate(config: ml_collections.ConfigDict) -> None:
    check_keys(config.combinations, defaults().keys(), "config.combinations")
    if "modulation" not in models_lib.default_model_config(config.model.name):
        raise ValueError(
            f"leaf_combinations needs a model with a 'modulation' option (small_cnn); got {config.model.name!r}."
        )


STUDY = Study(
    name="leaf_combinations",
    description="all 8 subsets of {PCGrad, Modulation, LaSS}, per-task macro F1 (plant_leaves)",
    phases=phases,
    section="combinations",
    defaults=defaults,
    validate=validate,
    report=report,
)
