"""Studies: which runs an experiment consists of (``config.study``), and their report sections.

A study maps a config, its data set and model to the list of
:class:`~experiments.train.RunSpec` to train (all methods on the same seeds, in order: a run that
starts from another run's final parameters comes after it), and may add its own sections to the
report.

* ``compare``: every method of ``config.methods`` on every seed (+ single-task references).
* ``sparse_training``: every method of ``config.sparse.methods`` dense and with sparse training
  (ST, Zhang et al. 2024; METHODS.md section 4) at the same per-neuron K, plus the joint method
  with the random / global / reverse selection controls at the same trainable count.
* ``leaf_combinations``: all 2^3 on/off subsets of {PCGrad, Modulation, LaSS} (Alison et al. 2024;
  METHODS.md section 3) on the same seeds; the LaSS variants train, fine-tune a copy per task,
  prune each weight tensor per task, and continue with ``theta * M_t`` through ``mtl.per_task``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import models as models_lib
from experiments import reports
from experiments.config import parse_method
from experiments.train import RunSpec, load_final_params
from mtl_jax import lass as lass_lib
from mtl_jax import modules as modules_lib
from mtl_jax import sharing as sharing_lib
from mtl_jax import sparse as sparse_lib

PyTree = Any


def _method_spec(config: ml_collections.ConfigDict, method: str) -> tuple[str, dict]:
    return parse_method(method, config.method_kwargs.get(method.partition(":")[0]))


# ---------------------------------------------------------------------------------------------
# compare


def compare_runs(config: ml_collections.ConfigDict, data, model, workdir: str) -> list[RunSpec]:
    """Every method on every seed, plus one single-task run per task if ``config.single_task``."""
    runs = []
    for seed in config.seeds:
        for method in config.methods:
            name, kwargs = _method_spec(config, method)
            runs.append(RunSpec(label=method, method=name, method_kwargs=kwargs, seed=int(seed)))
        if config.single_task:
            runs += single_task_runs(data, int(seed))
    return runs


def single_task_runs(data, seed: int, epochs: int | None = None) -> list[RunSpec]:
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


# ---------------------------------------------------------------------------------------------
# sparse_training

SELECTIONS = ("psn", "random", "global", "reverse")


def sparse_defaults() -> ml_collections.ConfigDict:
    """``config.sparse`` (used by the ``sparse_training`` study)."""
    return ml_collections.ConfigDict(
        {
            # joint (mean) and the gradient-manipulation methods, each dense and with ST
            "methods": ("mean", "pcgrad", "cagrad:c=0.4", "mgda", "nash_mtl"),
            "k": 0,  # per-neuron kept fan-in (PSN's K); 0: derive it from `fraction`
            "fraction": 0.6,  # target trainable share of the encoder's weights (random init: ~60%)
            "controls": ("random", "global", "reverse"),  # selection controls, on the joint method
            "other": "train",  # biases and norm parameters: "train" (dense) or "freeze"
            # conflicts measured on the masked gradient (what the aggregator sees; ST paper Fig. 2)
            # or on the full gradient of the shared encoder
            "measure_on": "masked",
            # > 0: first train the model jointly for this many epochs (one run per seed), then start
            # every dense / ST run from it, the mask computed from the pre-trained magnitudes (the
            # paper's pre-trained-backbone setting)
            "pretrain_epochs": 0,
        }
    )


def _psn_k(config: ml_collections.ConfigDict, encoder_params: PyTree) -> int:
    if int(config.sparse.k) > 0:
        return int(config.sparse.k)
    return int(sparse_lib.psn_k(encoder_params, float(config.sparse.fraction)))


def sparse_mask_fn(
    config: ml_collections.ConfigDict, selection: str, seed: int
) -> Callable[[PyTree], PyTree]:
    """``encoder params -> mask`` for a selection rule, at the PSN mask's trainable count."""
    if selection not in SELECTIONS:
        raise ValueError(f"Unknown selection {selection!r}; valid: {SELECTIONS}.")
    other = config.sparse.other

    def fn(encoder_params: PyTree) -> PyTree:
        psn = sparse_lib.psn_mask(encoder_params, _psn_k(config, encoder_params), other=other)
        if selection == "psn":
            return psn
        if selection == "reverse":
            return sparse_lib.reverse_mask(encoder_params, psn)
        if selection == "global":
            return sparse_lib.global_magnitude_mask(encoder_params, psn)
        return sparse_lib.random_mask(encoder_params, psn, jax.random.PRNGKey(10_000 + seed))

    return fn


PRETRAIN_LABEL = "pretrain"


def sparse_training_runs(
    config: ml_collections.ConfigDict, data, model, workdir: str
) -> list[RunSpec]:
    runs = []
    for seed in config.seeds:
        seed = int(seed)
        init_from = None
        if int(config.sparse.pretrain_epochs) > 0:
            pretrain = RunSpec(
                label=PRETRAIN_LABEL,
                method="mean",
                seed=seed,
                epochs=int(config.sparse.pretrain_epochs),
            )
            runs.append(pretrain)
            init_from = pretrain.run_id
        for method in config.sparse.methods:
            name, kwargs = _method_spec(config, method)
            common = dict(method=name, method_kwargs=kwargs, seed=seed, init_from=init_from)
            runs.append(RunSpec(label=method, info={"st": "dense"}, **common))
            mask_fn = sparse_mask_fn(config, "psn", seed)
            runs.append(
                RunSpec(label=f"{method}+st", encoder_mask_fn=mask_fn, info={"st": "psn"}, **common)
            )
        joint, joint_kwargs = _method_spec(config, config.sparse.methods[0])
        for selection in config.sparse.controls:
            runs.append(
                RunSpec(
                    label=f"{config.sparse.methods[0]}+st:{selection}",
                    method=joint,
                    method_kwargs=joint_kwargs,
                    seed=seed,
                    init_from=init_from,
                    encoder_mask_fn=sparse_mask_fn(config, selection, seed),
                    info={"st": selection},
                )
            )
        if config.single_task:
            runs += single_task_runs(data, seed)
    return runs


def _summaries(records) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        if r.get("kind") == "summary":
            out.setdefault(r["run"], []).append(r)
    return out


def _fmt(values: Sequence[float], digits: int = 2) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def sparse_training_report(records, tasks, config, workdir: str) -> str:
    """Dense vs ST per method: conflict incidence (all steps, last half), test metrics, the
    trainable share and whether frozen weights stayed bit-identical."""
    summaries = _summaries(records)
    primary = {t.name: reports.REPORTED_METRICS[t.kind][0] for t in tasks}
    header = [
        "method",
        "variant",
        "p% all",
        "p% last half",
        *[f"{t.name} {primary[t.name]}" for t in tasks],
    ]
    header += ["trainable encoder %", "frozen unchanged"]
    lines = [
        "## Sparse training: conflict incidence, dense vs ST",
        "",
        "| " + " | ".join(header) + " |",
    ]
    lines.append("|" + "---|" * len(header))
    labels = [m for m in config.sparse.methods for m in (m, f"{m}+st")]
    labels += [f"{config.sparse.methods[0]}+st:{s}" for s in config.sparse.controls]
    for label in labels:
        runs = summaries.get(label, [])
        if not runs:
            continue
        method, _, variant = label.partition("+")
        row = [method, variant or "dense"]
        row.append(_fmt([r["incidence_all"].get("global", math.nan) for r in runs]))
        row.append(_fmt([r["incidence_last_half"].get("global", math.nan) for r in runs]))
        for t in tasks:
            row.append(_fmt([r["test"][t.name][primary[t.name]] for r in runs]))
        fractions = [r["info"].get("trainable_encoder_fraction") for r in runs]
        row.append(
            _fmt([100 * f for f in fractions if f is not None], 1)
            if any(f is not None for f in fractions)
            else "100"
        )
        frozen = [
            r["info"].get("frozen_unchanged") for r in runs if "frozen_unchanged" in r["info"]
        ]
        row.append(("yes" if all(frozen) else "NO") if frozen else "")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "p%: share of steps x task pairs with negative cosine between the task gradients on the "
        "shared encoder, as the aggregator sees them (after the ST mask), over all steps and the "
        "last half of the epochs (the ST paper's two columns). All variants use the same seeds; "
        "the controls select the same number of trainable weights as PSN.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# leaf_combinations

COMPONENTS = ("pcgrad", "modulation", "lass")


def combinations_defaults() -> ml_collections.ConfigDict:
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


def _lass_sharing_fn(
    workdir: str, finetune_ids: Sequence[str], prune_fraction: float, modulation: bool
):
    """``encoder params -> spec``: LaSS masks from the fine-tuned copies (their final parameters),
    merged with the per-task modulation scales when present."""

    def fn(encoder_params: PyTree) -> PyTree:
        finetuned = [load_final_params(workdir, run_id)[0]["encoder"] for run_id in finetune_ids]
        include = lambda path: not modules_lib.is_modulation(path)
        spec = lass_lib.lass_spec(finetuned, prune_fraction, include=include)
        if modulation:
            spec = sharing_lib.merge_specs(spec, modules_lib.modulation_spec(encoder_params))
        return spec

    return fn


def leaf_combinations_runs(
    config: ml_collections.ConfigDict, data, model, workdir: str
) -> list[RunSpec]:
    c = config.combinations
    modulated = _modulated_model(config, data)
    _, pc_kwargs = parse_method(f"pcgrad:{c.pcgrad_kwargs}" if c.pcgrad_kwargs else "pcgrad")
    runs = []
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
                runs.append(RunSpec(label=label, sharing_fn=mod_spec, epochs=epochs, **common))
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
            final = RunSpec(
                label=label,
                sharing_fn=_lass_sharing_fn(
                    workdir, [f.run_id for f in finetunes], float(c.prune_fraction), modulation
                ),
                init_from=stage1.run_id,
                epochs=int(c.stage2_epochs),
                **common,
            )
            runs += [stage1, *finetunes, final]
    return runs


def leaf_combinations_report(records, tasks, config, workdir: str) -> str:
    """Per-task macro F1 and their mean for the 8 combinations (mean ± std over seeds), the
    paper's numbers beside them, and a bar chart."""
    summaries = _summaries(records)
    labels = [combination_label(*bits) for bits in itertools.product((False, True), repeat=3)]
    paper = {"PCGrad+LaSS": 0.847, "PCGrad": 0.828, "LaSS": 0.823, "Modulation": 0.820}
    header = [
        "combination",
        *[f"{t.name} macro F1" for t in tasks],
        "mean F1",
        "paper mean F1",
        "LaSS sub-network %",
    ]
    lines = ["## Leaf combinations: per-task macro F1", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    bars = {}
    for label in labels:
        runs = summaries.get(label, [])
        if not runs:
            continue
        per_task = {t.name: [r["test"][t.name]["macro_f1"] for r in runs] for t in tasks}
        means = [float(np.mean([per_task[t.name][i] for t in tasks])) for i in range(len(runs))]
        bars[label] = means
        subnet = [r["info"]["subnetwork"]["fraction"] for r in runs if "subnetwork" in r["info"]]
        sizes = (
            " / ".join(_fmt([100 * f[k] for f in subnet], 1) for k in range(len(tasks)))
            if subnet
            else ""
        )
        row = [label, *[_fmt(per_task[t.name], 3) for t in tasks], _fmt(means, 3)]
        row += [f"{paper[label]:.3f}" if label in paper else "", sizes]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "LaSS sub-network %: share of the encoder's prunable weights in each task's sub-network "
        "(task order as in the columns). "
        "Macro F1 on the test split at the end of training, mean ± std over seeds; all "
        "combinations share the seeds and the number of multi-task epochs (LaSS variants also "
        f"fine-tune a copy per task for {config.combinations.finetune_epochs} epochs). Paper: "
        "Alison et al. 2024 (CommIT), task-averaged F1 (its averaging is unverified).",
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
    ax.set_ylabel("mean macro F1 (species, health)")
    lo = min(min(v) for v in bars.values())
    ax.set_ylim(max(0.0, lo - 0.1), min(1.0, max(max(v) for v in bars.values()) + 0.05))
    ax.set_title("PCGrad x Modulation x LaSS (mean ± std over seeds; dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Study:
    runs: Callable[[ml_collections.ConfigDict, Any, Any, str], list[RunSpec]]
    report: Callable[..., str] | None = None


STUDIES: dict[str, Study] = {
    "compare": Study(compare_runs),
    "sparse_training": Study(sparse_training_runs, sparse_training_report),
    "leaf_combinations": Study(leaf_combinations_runs, leaf_combinations_report),
}
