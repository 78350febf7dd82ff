"""``sparse_training``: sparse training (ST, Zhang et al. 2024, arXiv 2411.18615) vs dense.

Every method of ``config.sparse.methods`` dense and with ST at the same per-neuron K (PSN: per
output neuron, the top-K incoming weights by magnitude at initialisation stay trainable), plus
the first (joint) method with the random / global top-magnitude / reverse selections at the same
trainable count. Optionally every run starts from a jointly pre-trained model (a ``pretrain``
phase per seed; ``sparse.pretrain_epochs``). Each ST run saves its mask as an artifact
(``mask``). The report compares the conflict incidence p% over all steps and the last half,
test metrics, the trainable share, and checks that frozen weights stayed bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from experiments import reports
from experiments.config import check_keys
from experiments.phases import Phase
from experiments.studies.base import (
    Study,
    StudyContext,
    check_methods,
    fmt,
    method_spec,
    single_task_runs,
    summaries,
    train_phase,
)
from experiments.train import RunSpec
from mtl_jax import sparse as sparse_lib

PyTree = Any

SELECTIONS = ("psn", "random", "global", "reverse")


def defaults() -> ml_collections.ConfigDict:
    """``config.sparse`` (used by the ``sparse_training`` study)."""
    return ml_collections.ConfigDict(
        {
            # joint (mean) and the gradient-manipulation methods, each dense and with ST
            "methods": ("mean", "pcgrad", "cagrad:c=0.4", "mgda", "nash_mtl"),
            "k": 0,  # per-neuron kept fan-in (PSN's K); 0: derive it from `fraction`
            "fraction": 0.6,  # target trainable share of the encoder's weights (random init: ~60%)
            "controls": ("random", "global", "reverse"),  # selection controls, on the joint method
            "other": "train",  # biases and norm parameters: "train" (dense) or "freeze"
            # conflicts measured on the task gradients restricted to the trainable coordinates
            # (the subspace ST updates; ST paper Fig. 2) or on the full encoder gradients. The
            # aggregator always sees the full gradients (the mask acts after it).
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


def runs(config: ml_collections.ConfigDict, data) -> list[RunSpec]:
    """Per seed: [pretrain,] every method dense and with ST, the selection controls, [single]."""
    measure_masked = config.sparse.measure_on == "masked"
    out = []
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
            out.append(pretrain)
            init_from = pretrain.run_id
        for method in config.sparse.methods:
            name, kwargs = method_spec(config, method)
            common = dict(method=name, method_kwargs=kwargs, seed=seed, init_from=init_from)
            out.append(RunSpec(label=method, info={"st": "dense"}, **common))
            mask_fn = sparse_mask_fn(config, "psn", seed)
            out.append(
                RunSpec(
                    label=f"{method}+st",
                    encoder_mask_fn=mask_fn,
                    measure_masked=measure_masked,
                    info={"st": "psn"},
                    **common,
                )
            )
        joint, joint_kwargs = method_spec(config, config.sparse.methods[0])
        for selection in config.sparse.controls:
            out.append(
                RunSpec(
                    label=f"{config.sparse.methods[0]}+st:{selection}",
                    method=joint,
                    method_kwargs=joint_kwargs,
                    seed=seed,
                    init_from=init_from,
                    encoder_mask_fn=sparse_mask_fn(config, selection, seed),
                    measure_masked=measure_masked,
                    info={"st": selection},
                )
            )
        if config.single_task:
            out += single_task_runs(data, seed)
    return out


def report(records, tasks, config, workdir: str) -> str:
    """Dense vs ST per method: conflict incidence (all steps, last half), test metrics, the
    trainable share and whether frozen weights stayed bit-identical."""
    by_label = summaries(records)
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
        runs = by_label.get(label, [])
        if not runs:
            continue
        method, _, variant = label.partition("+")
        row = [method, variant or "dense"]
        row.append(fmt([r["incidence_all"].get("global", math.nan) for r in runs]))
        row.append(fmt([r["incidence_last_half"].get("global", math.nan) for r in runs]))
        for t in tasks:
            row.append(fmt([r["test"][t.name][primary[t.name]] for r in runs]))
        fractions = [r["info"].get("trainable_encoder_fraction") for r in runs]
        row.append(
            fmt([100 * f for f in fractions if f is not None], 1)
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
        "shared encoder, over all steps and the last half of the epochs (the ST paper's two "
        "columns). "
        + (
            "For ST runs the cosines are taken on the task gradients restricted to the trainable "
            "coordinates (the subspace ST updates; `sparse.measure_on=masked`); "
            if config.sparse.measure_on == "masked"
            else "For ST runs the cosines are taken on the full encoder gradients "
            "(`sparse.measure_on=full`); "
        )
        + "the aggregator always sees the full task gradients, and the mask acts on the combined "
        "update (after the aggregator), as in the ST paper. All variants use the same seeds; the "
        "controls select the same number of trainable weights as PSN.",
    ]
    return "\n".join(lines)


def phases(ctx: StudyContext) -> list[Phase]:
    return [train_phase(ctx, spec) for spec in runs(ctx.config, ctx.data)]


def methods(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return tuple(config.sparse.methods)


def validate(config: ml_collections.ConfigDict) -> None:
    check_keys(config.sparse, defaults().keys(), "config.sparse")
    check_methods(config, methods(config))
    bad = sorted(set(config.sparse.controls) - set(SELECTIONS))
    if bad:
        raise ValueError(f"Unknown sparse.controls {bad}; valid selections: {list(SELECTIONS)}.")
    if config.sparse.measure_on not in ("masked", "full"):
        raise ValueError(
            f"sparse.measure_on must be 'masked' or 'full'; got {config.sparse.measure_on!r}."
        )
    if config.sparse.other not in ("train", "freeze"):
        raise ValueError(f"sparse.other must be 'train' or 'freeze'; got {config.sparse.other!r}.")


STUDY = Study(
    name="sparse_training",
    description="every method dense and with sparse training (PSN mask) + selection controls",
    phases=phases,
    section="sparse",
    defaults=defaults,
    validate=validate,
    report=report,
    methods=methods,
)
