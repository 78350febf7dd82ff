"""``conal``: CoNAL (Yue, Zhang & Liang, AAAI 2023) -- search, discretise, retrain, vs baselines.

The library (:mod:`mtl_jax.conal`) does the maths; this module orchestrates. The encoder of the
config's model is cut into its named blocks (:data:`BLOCK_MODELS`: ``small_resnet`` =
``stem, block1, block2, block3, neck``, the standard encoder exactly; ``segnet`` = its encoder and
decoder levels, with nearest-neighbour upsampling instead of SegNet's argmax unpooling, a departure
that a sequence of blocks forces; ``mlp`` = one block per hidden ``Dense -> ReLU`` layer, ``fc0``
flattening its input, the standard encoder exactly). Per seed, in phases:

1. ``search__seed<s>``: the CoNAL search (:func:`mtl_jax.conal.make_search`: one jitted step,
   an architecture update on a held-out batch, then a weight update on a training batch, each with
   its own optax optimizer; ``nocl`` on the shared blocks) through the one run lifecycle,
   :func:`experiments.lifecycle.run_lifecycle` (checkpointed in the phase directory, resumable to
   the step; the retrains below use it too). The held-out split is carved from
   the training set (``conal.val_fraction``, a fixed permutation drawn from
   ``dataset.split_seed``); the weights train on the rest. Every ``conal.alpha_every`` steps the
   per-task softmax over the branch points is logged (records ``kind="conal_alpha"``). With
   ``conal.pro`` the search is CoNAL-Pro (:func:`mtl_jax.conal.search_pro`, not resumable inside
   the phase: a killed Pro search restarts). Artifact ``search`` (JSON; written last, it is the
   search's completion): final alpha logits and softmax, the share of steps in which each shared
   block's task gradients conflicted, the trajectory; CoNAL-Pro adds the group labels.
2. ``discretise__seed<s>``: the argmax branch point per task (:func:`mtl_jax.conal.discretise`,
   ``conal.tie_break``); artifact ``architecture`` (JSON: branch points, groups, final softmax,
   block sizes, encoder parameter counts of the learned / all-shared / all-private models, the
   text description) and ``architecture.png`` (the drawn tree) in the phase directory.
3. Retrain from scratch on the whole training set, per base method of ``conal.methods``:

   * ``<m>+conal``: the discretised architecture;
   * ``<m>+private``: the all-private encoder (every block task-specific);
   * ``<m>``: the all-shared encoder. With an exact block cut (``small_resnet``) this is the
     standard compare run (:func:`~experiments.studies.base.train_phase`); otherwise it is
     trained like the other two.

   Single-task references with ``single_task``.

Search hyper-parameters: the official ``search.py``'s optimizers (clip 5, L2 1e-5, Adam) with the
weight lr of ``config.train`` (``conal.weight_lr`` = 0) and alpha lr ``conal.arch_lr = 1e-2``
instead of 5e-5: the official search runs for many epochs; at 5e-5 the logits of a search of a few
hundred steps would barely leave the uniform softmax.

The retrain model is the library's (:class:`mtl_jax.conal.TreeModel`,
:func:`mtl_jax.conal.make_retrain`); this module only gives it the study's heads, task losses,
initialisation and optimizer. It is exact for any tree architecture: the trunk runs once; every
task runs its own branch (a CoNAL-Pro group's branch is shared by its tasks) and its head; each
parameter is updated from the gradients of exactly the tasks that use it
(:func:`mtl_jax.conal.unit_aggregation`) -- a trunk block b with the base aggregator over the
Jacobian rows of the tasks whose branch point is > b (blocks with the same task set share one
aggregator), a branch copy of one task with that task's gradient (as Recon's copies), a group's
copy with the aggregator over its tasks' rows, a head with its task's gradient -- then the run's
optimizer (``config.train``; the encoder and the heads each with their own state). The
all-shared architecture gives the standard step (one aggregator over all K rows of the encoder;
the losses of ``train_run`` over 8 steps agree to float rounding, ``tests/test_conal_study.py``).
Cost of a step: one trunk forward, per task one forward and backward through its branch and
head, and K trunk backward passes for the Jacobian rows, mapped by ``conal.retrain_task_map``
(default ``"unroll"``: no vmapped convolutions, which XLA:CPU runs slowly; ``"vmap"`` on
accelerators). Recon-style per-task copies (``RunSpec.branch_fn``) were not used: they give every
task its own copy of a branched layer, so two tasks that branch late would no longer share their
common blocks. Copies start from ``conal.init``: ``"fresh"`` (copy t of a block from the model
initialised with another key, as Recon's ``fresh`` and the official ``new_bb()``) or ``"copy"``
(every copy from the seed's initial block). Only gradient aggregators (methods of cost
``"jacobian"`` in the library's catalogue, ``mtl.get_method``) are accepted as base methods: the
loss-weighting and representation methods act on the whole model.

BatchNorm statistics. Every stream of the tree keeps its own running statistics: the trunk's blocks
those of their input (the batch), branch c's copies those of ``s_{p_c}`` through its own copies (a
CoNAL-Pro group's branch: one input for all its tasks); nothing is averaged across tasks
(``tests/test_conal_study.py`` checks each stream against the statistics of its own input). They are
exponential moving averages (momentum 0.9 in ``small_resnet``) of the statistics of past weights, so
they lag the final weights, much so in short runs. ``eval.recompute_bn_batches = N`` > 0 (the
runner's key, as for every study) turns on precise BN (Wu & Johnson 2021): before every evaluation
and for the saved weights, each stream's statistics are recomputed as the mean batch statistics of
the current weights over N training batches (:func:`mtl_jax.conal.recompute_tree_statistics`); the
all-shared baseline is then the all-shared tree (the same step as the standard run) so that the
three models get the same statistics. Independently, every finished run is evaluated three ways
(:func:`evaluate_bn_modes`, ``conal.bn_modes_batches`` training batches, 0 = off): A the stored
statistics, B train-mode (each test batch's own statistics), C recomputed; artifact ``bn_modes``
(retrains: in the run's phase; standard runs: phase ``bn_modes__<run>``), ``bn_modes`` per model in
``conal_summary.json`` and a second table in the report. Not for the search: the supernet's
statistics (stacked copies under ``mixing="paths"`` average the statistics of a copy's path streams,
CoNAL-Pro's ties average tied tasks' copies, and both the held-out and the training batch update
them every step) serve only its train-mode steps and are discarded.

The report writes ``conal_summary.json`` at the work dir's root (per seed: branch points, final
softmax, parameter counts, test metrics and Δm% of the learned, all-shared and all-private models;
the reference of Δm is the single-task runs when the config has them, else the all-shared model of
the same seed), a table, the stability of the architectures across seeds, the trees and the
alpha trajectories.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import conal_report, lifecycle, optim, reports
from experiments import data as data_lib
from experiments import losses as losses_lib
from experiments.config import ConfigError, check_keys
from experiments.logs import atomic_write_text
from experiments.models import small_resnet
from experiments.models.base import torch_default_init
from experiments.models.segnet import ConvBNReLU, _convs_per_level
from experiments.phases import Artifacts, Phase
from experiments.studies.base import (
    Study,
    StudyContext,
    fmt,
    method_spec,
    single_task_runs,
    train_phase,
)
from experiments.train import (
    RunSpec,
    apply_module,
    count_params,
    evaluate_split,
    get_method,
    initial_params,
)
from mtl_jax import conal

PyTree = Any
SEARCH_RUN = "conal-search"
VARIANTS = ("conal", "shared", "private")


def defaults() -> ml_collections.ConfigDict:
    """``config.conal``."""
    return ml_collections.ConfigDict(
        {
            "methods": ("mean",),  # base aggregators of the retrained models
            "search_epochs": 0,  # epochs of the search over its training part; 0: train.epochs
            "val_fraction": 0.2,  # share of the training set held out for the architecture
            "mixing": "stream",  # Supernet.mixing: "stream" (one private pass) or "paths"
            "task_map": "unroll",  # "unroll" (CPU conv nets), "vmap" (accelerators), "scan"
            # the retrain step's K trunk backward passes: the same choices (unroll: as before)
            "retrain_task_map": "unroll",
            "nocl": True,  # CoNAL's conflict rule on the shared blocks during the search
            "gumbel": False,  # Gumbel-softmax (straight-through) instead of the softmax
            "tau": 1.0,
            "weight_lr": 0.0,  # search weight optimizer lr; 0: train.lr (official: 1e-4)
            "weight_decay": 1e-5,
            "grad_clip": 5.0,
            "arch_lr": 1e-2,  # alpha lr (official 5e-5 over a long search; ours is short)
            "arch_weight_decay": 1e-5,
            "alpha_every": 5,  # log the alpha softmax every this many search steps
            "tie_break": "shared",  # discretise: exact ties -> the deeper branch point
            "pro": False,  # CoNAL-Pro (progressive, task groups)
            "pro_steps_per_stage": 0,  # 0: the search steps divided by the number of stages
            "init": "fresh",  # retrain copies: "fresh" (own init) or "copy" (the block's init)
            # training batches of the "recomputed" column of the final A/B/C BatchNorm evaluation
            # (stored / train-mode / recomputed statistics); 0 = no such evaluation
            "bn_modes_batches": 20,
        }
    )


# ---------------------------------------------------------------------------------------------
# The encoder as a sequence of blocks.


class _SegNetDown(nn.Module):
    """SegNet encoder level: ConvBNReLU x (1 + convs) -> 2x2 max pool."""

    features: int
    level: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvBNReLU(self.features, name="encoder_block")(x, train)
        for j in range(_convs_per_level(self.level)):
            x = ConvBNReLU(self.features, name=f"conv_block_{j}")(x, train)
        return nn.max_pool(x, (2, 2), strides=(2, 2))


class _SegNetUp(nn.Module):
    """SegNet decoder level: 2x nearest upsampling -> ConvBNReLU x (1 + convs)."""

    features: int
    level: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = ConvBNReLU(self.features, name="decoder_block")(x, train)
        for j in range(_convs_per_level(self.level)):
            x = ConvBNReLU(self.features, name=f"conv_block_{j}")(x, train)
        return x


def _small_resnet_blocks(model_config, input_shape) -> list[nn.Module]:
    return small_resnet.encoder_blocks(model_config, input_shape)


def _segnet_blocks(model_config, input_shape) -> list[nn.Module]:
    f = tuple(int(c) for c in model_config.filters)
    down = [_SegNetDown(f[i], i, name=f"enc{i}") for i in range(len(f))]
    up = [_SegNetUp(f[max(i - 1, 0)], i, name=f"dec{i}") for i in reversed(range(len(f)))]
    return down + up


class _MLPLayer(nn.Module):
    """One hidden layer of :class:`experiments.models.mlp.MLPEncoder` as a block:
    ``[B, ...] -> (flatten, first layer only) -> Dense(features) -> ReLU -> [B, features]``.

    Its variables are a Dense's (``kernel [in, features]``, ``bias [features]``, PyTorch's default
    kernel init, zero bias), so the block named ``fc<i>`` takes the encoder's ``fc<i>`` as is."""

    features: int
    flatten: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        if self.flatten:
            x = x.reshape((x.shape[0], -1))
        kernel = self.param("kernel", torch_default_init(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))  # as nn.Dense
        return nn.relu(y + bias)


def _mlp_blocks(model_config, input_shape) -> list[nn.Module]:
    """``mlp``: one block per hidden layer (``fc0`` flattens its input), the encoder exactly."""
    del input_shape
    hidden = [int(h) for h in model_config.hidden_sizes]
    return [_MLPLayer(h, i == 0, name=f"fc{i}") for i, h in enumerate(hidden)]


#: ``model name -> (blocks builder, exact)``: ``exact`` when chaining the blocks is the model's
#: own encoder (same variables), so the all-shared baseline is the standard run.
BLOCK_MODELS: dict[str, tuple[Callable, bool]] = {
    "small_resnet": (_small_resnet_blocks, True),
    "segnet": (_segnet_blocks, False),
    "mlp": (_mlp_blocks, True),
}


def _blocks_for(ctx: StudyContext) -> tuple[list[conal.Block], bool]:
    name = ctx.config.model.name
    builder, exact = BLOCK_MODELS[name]
    modules = builder(ctx.config.model, tuple(ctx.data.input_shape))
    return [conal.linen_block(m, m.name) for m in modules], exact


def _block_names(blocks: Sequence[conal.Block]) -> list[str]:
    return [b.name for b in blocks]


# ---------------------------------------------------------------------------------------------
# Data: the search's two splits and batches.


def search_splits(config, data) -> tuple[Any, Any]:
    """``(weights part, architecture part)`` of the training set (a fixed permutation)."""
    n = len(data.train)
    n_val = round(float(config.conal.val_fraction) * n)
    if not 0 < n_val < n:
        raise ConfigError(
            f"conal.val_fraction={config.conal.val_fraction} leaves {n_val} of {n} training "
            "examples for the architecture split; choose a fraction in (0, 1)."
        )
    if n_val < int(config.train.batch_size) or n - n_val < int(config.train.batch_size):
        raise ConfigError(
            f"The search splits {n} training examples into {n - n_val} (weights) and {n_val} "
            f"(architecture, conal.val_fraction={config.conal.val_fraction}); each needs at least "
            f"one batch of train.batch_size={config.train.batch_size}. Lower the batch size or "
            "change the fraction."
        )
    order = np.random.default_rng(1_000 + int(config.dataset.split_seed)).permutation(n)
    return data_lib.take(data.train, order[n_val:]), data_lib.take(data.train, order[:n_val])


def _to_jax(batch: dict, names: Sequence[str]) -> tuple[jax.Array, dict]:
    return jnp.asarray(batch["image"]), {n: jnp.asarray(batch[n]) for n in names}


def _val_batch(source, batch_size: int, seed: int, index: int):
    """The ``index``-th held-out batch of an endless, epoch-wise reshuffled stream."""
    per_epoch = data_lib.num_batches(source, batch_size, drop_remainder=True)
    epoch, j = divmod(index, per_epoch)
    return next(iter(data_lib.batches(source, batch_size, seed=seed, epoch=epoch, start_batch=j)))


# ---------------------------------------------------------------------------------------------
# Heads and losses.


def _head_params(ctx: StudyContext, seed: int) -> tuple[dict, dict]:
    params, state = initial_params(ctx.model, ctx.data.tasks, ctx.data.input_shape, seed)
    return params, state


def make_loss_fn(model, tasks) -> Callable:
    """``(heads {task: params}, feats [K, N, ...], targets {task: y}) -> losses f32[K]``."""

    def loss_fn(heads, feats, targets):
        out = []
        for k, task in enumerate(tasks):
            pred, _ = apply_module(model.heads[task.name], heads[task.name], {}, feats[k], True)
            out.append(losses_lib.task_loss(task, pred, targets[task.name]))
        return jnp.stack(out)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Phase 1: the search.


def search_config(config, seed: int) -> conal.SearchConfig:
    c = config.conal
    return conal.SearchConfig(
        weight_lr=float(c.weight_lr) or float(config.train.lr),
        weight_decay=float(c.weight_decay),
        grad_clip=float(c.grad_clip),
        arch_lr=float(c.arch_lr),
        arch_weight_decay=float(c.arch_weight_decay),
        nocl=bool(c.nocl),
        track_conflict=True,
        gumbel=bool(c.gumbel),
        tau=float(c.tau),
        seed=int(seed),
    )


def _search_epochs(config) -> int:
    return int(config.conal.search_epochs) or int(config.train.epochs)


def _alpha_records(log, seed: int) -> list[dict]:
    return [
        r
        for r in log.records()
        if r.get("kind") == "conal_alpha" and r.get("run") == SEARCH_RUN and r["seed"] == seed
    ]


def _search_phase(ctx: StudyContext, seed: int) -> Phase:
    """The CoNAL search of ``seed`` (:func:`experiments.lifecycle.run_lifecycle`; CoNAL-Pro: its
    own stages, not resumable); its completion is its ``search`` artifact."""
    name = f"search__seed{seed}"
    key = lifecycle.RunKey(SEARCH_RUN, seed, name)

    def completion(artifacts: Artifacts) -> lifecycle.ArtifactRecord:
        return lifecycle.ArtifactRecord(artifacts, name, "search")

    def run(artifacts: Artifacts) -> dict:
        if ctx.config.conal.pro:
            return _search_pro(ctx, seed, completion(artifacts))
        return lifecycle.run_lifecycle(
            key,
            ctx.log,
            artifacts,
            lambda: _search_parts(ctx, key),
            completion=completion(artifacts),
        )

    return Phase(
        name=name,
        run=run,
        info={"seed": seed, "conal": "search"},
        finished=lambda artifacts: completion(artifacts).read(),
    )


class _Search(NamedTuple):
    """What the search and CoNAL-Pro share: the blocks, the search, its initial state and its
    ``(train batch, held-out batch)`` stream."""

    blocks: list
    supernet: conal.Supernet
    search: conal.Search
    template: conal.SearchState
    batches: Callable[[int, int], Any]
    steps_per_epoch: int
    total_steps: int


def _search_setup(ctx: StudyContext, seed: int) -> _Search:
    config, c = ctx.config, ctx.config.conal
    names = [t.name for t in ctx.data.tasks]
    blocks, _ = _blocks_for(ctx)
    supernet = conal.Supernet(blocks, len(names), mixing=str(c.mixing), task_map=str(c.task_map))
    search = conal.make_search(
        supernet, make_loss_fn(ctx.model, ctx.data.tasks), search_config(config, seed)
    )
    train_part, val_part = search_splits(config, ctx.data)
    batch_size = int(config.train.batch_size)
    steps_per_epoch = data_lib.num_batches(train_part, batch_size, drop_remainder=True)
    heads, _ = _head_params(ctx, seed)
    x0 = np.zeros((2, *ctx.data.input_shape), np.float32)
    template = search.init(jax.random.key(seed), x0, heads["heads"])

    def batches(epoch: int, start: int):
        for i, batch in enumerate(
            data_lib.batches(train_part, batch_size, seed=seed, epoch=epoch, start_batch=start)
        ):
            index = epoch * steps_per_epoch + start + i
            val = _val_batch(val_part, batch_size, 7_919 * (seed + 1), index)
            yield _to_jax(batch, names), _to_jax(val, names)

    total = _search_epochs(config) * steps_per_epoch
    return _Search(blocks, supernet, search, template, batches, steps_per_epoch, total)


def _search_artifact(
    ctx: StudyContext, seed: int, blocks: list, state: conal.SearchState, seconds: float, **extra
) -> dict:
    """The ``search`` artifact (see the module docstring)."""
    records = _alpha_records(ctx.log, seed)
    return {
        "alpha": np.asarray(state.params["alpha"]).tolist(),
        "alpha_softmax": np.asarray(
            conal.branch_weights(state.params["alpha"], state.candidates)
        ).tolist(),
        "steps": int(state.step),
        "block_sizes": conal.block_param_counts(state.params),
        "block_names": _block_names(blocks),
        "conflict_share": np.mean([r["shared_conflict"] for r in records], axis=0).tolist()
        if records
        else [],
        "trajectory": {
            "steps": [r["step"] for r in records],
            "alpha_softmax": [r["alpha_softmax"] for r in records],
        },
        "seconds": seconds,
        **extra,
    }


def _search_parts(ctx: StudyContext, key: lifecycle.RunKey) -> lifecycle.RunParts:
    """The search's parts of the lifecycle: one jitted step (architecture then weights), a
    ``conal_alpha`` record every ``conal.alpha_every`` steps, no start, eval or final record."""
    seed, log = key.seed, ctx.log
    s = _search_setup(ctx, seed)

    def step_fn(state, batch):
        state, metrics = s.search.step(state, batch[0], batch[1])
        return state, {**metrics, "losses": metrics["train_losses"]}

    def on_log(state, step: int, epoch: int, out: dict) -> None:
        log.write(
            key.record(
                "conal_alpha",
                step,
                epoch=epoch,
                alpha_softmax=np.asarray(out["alpha_softmax"]).tolist(),
                train_losses=np.asarray(out["train_losses"]).tolist(),
                val_losses=np.asarray(out["val_losses"]).tolist(),
                shared_conflict=np.asarray(out["shared_conflict"]).tolist(),
            )
        )

    def check(state, out: dict, has_checkpoint: bool) -> None:
        losses = np.asarray(out["train_losses"])
        if not np.all(np.isfinite(losses)):
            raise FloatingPointError(
                f"CoNAL search (seed {seed}): non-finite task loss {losses.tolist()} at "
                f"step {int(state.step)}; lower conal.weight_lr or conal.arch_lr."
            )

    def on_finish(finish: lifecycle.Finish) -> dict:
        return _search_artifact(ctx, seed, s.blocks, finish.state, finish.wall_seconds)

    return lifecycle.RunParts(
        step_fn=jax.jit(step_fn, donate_argnums=0),
        template=s.template,
        batches=s.batches,
        steps_per_epoch=s.steps_per_epoch,
        total_steps=s.total_steps,
        on_finish=on_finish,
        loop=lifecycle.loop_settings(
            ctx.config.train,
            progress=ctx.progress,
            desc=key.phase,
            log_every=int(ctx.config.conal.alpha_every),
        ),
        on_log=on_log,
        check=check,
        final_arrays=None,  # the search keeps its artifact, not its weights
    )


def _search_pro(ctx: StudyContext, seed: int, completion: lifecycle.ArtifactRecord) -> dict:
    """CoNAL-Pro's progressive search (:func:`mtl_jax.conal.search_pro`: its own stages, not
    the loop; a killed Pro search restarts); writes the ``search`` artifact."""
    c = ctx.config.conal
    s = _search_setup(ctx, seed)
    began = time.perf_counter()
    per_stage = int(c.pro_steps_per_stage) or max(1, s.total_steps // s.supernet.num_branch_points)

    def stream():
        epoch = 0
        while True:
            yield from s.batches(epoch, 0)
            epoch += 1

    arch, state, history = conal.search_pro(
        s.search, s.template, stream(), per_stage, tie_break=str(c.tie_break)
    )
    out = _search_artifact(
        ctx,
        seed,
        s.blocks,
        state,
        time.perf_counter() - began,
        branch_points=list(arch.branch_points),
        group_labels=list(arch.group_labels or ()),
        stages=[{"depth": h["depth"], "decided": [list(g) for g in h["decided"]]} for h in history],
    )
    completion.write(out)
    return out


# ---------------------------------------------------------------------------------------------
# Phase 2: discretise.


def architecture_of(found: dict, num_blocks: int, tie_break: str) -> conal.Architecture:
    """The discrete architecture of a search artifact (CoNAL-Pro: its decided groups)."""
    if found.get("group_labels"):
        return conal.Architecture(
            tuple(found["branch_points"]), num_blocks, True, tuple(found["group_labels"])
        )
    return conal.Architecture(
        conal.discretise(np.asarray(found["alpha"]), tie_break=tie_break), num_blocks
    )


def load_architecture(artifacts: Artifacts, seed: int) -> conal.Architecture:
    a = artifacts.load_json(f"discretise__seed{seed}", "architecture")
    labels = tuple(a["group_labels"]) if a["group_labels"] else None
    return conal.Architecture(tuple(a["branch_points"]), a["num_blocks"], a["grouped"], labels)


def _discretise_phase(ctx: StudyContext, seed: int) -> Phase:
    name = f"discretise__seed{seed}"
    search_id = f"search__seed{seed}"
    task_names = [t.name for t in ctx.data.tasks]

    def run(artifacts: Artifacts) -> dict:
        found = artifacts.load_json(search_id, "search")
        names, sizes = found["block_names"], found["block_sizes"]
        arch = architecture_of(found, len(names), str(ctx.config.conal.tie_break))
        counts = conal.param_counts(sizes, arch)
        png = os.path.join(artifacts.phase_dir(name), "architecture.png")
        os.makedirs(os.path.dirname(png), exist_ok=True)
        conal_report.draw_architecture(
            arch, names, task_names, png, title=f"CoNAL, seed {seed}: {list(arch.branch_points)}"
        )
        out = {
            "branch_points": list(arch.branch_points),
            "num_blocks": arch.num_blocks,
            "grouped": arch.grouped,
            "group_labels": list(arch.group_labels) if arch.group_labels else None,
            "alpha_softmax": found["alpha_softmax"],
            "block_names": names,
            "block_sizes": sizes,
            "param_counts": counts,
            "text": conal.architecture_text(arch, names, task_names),
            "image": png,
        }
        artifacts.save_json(name, "architecture", out)
        return {"branch_points": out["branch_points"], "param_counts": counts}

    return Phase(name=name, run=run, needs=(search_id,), info={"seed": seed, "conal": "discretise"})


# ---------------------------------------------------------------------------------------------
# Phase 3: the retrain model of a tree architecture (mtl_jax.conal.TreeModel) and its step.


def tree_model(
    blocks: Sequence[conal.Block], arch: conal.Architecture, model, tasks: Sequence
) -> conal.TreeModel:
    """The library's :class:`~mtl_jax.conal.TreeModel` of ``arch`` with the study's heads
    (``model.heads``, no mutable state, as every head of the suite), in task order."""

    def head(module) -> Callable:
        return lambda params, z, train: apply_module(module, params, {}, z, train)[0]

    return conal.TreeModel(tuple(blocks), arch, {t.name: head(model.heads[t.name]) for t in tasks})


def _encoder_block(params: dict, state: dict, name: str) -> tuple[PyTree, PyTree]:
    """A named block's ``(params, state)`` in the standard encoder's variables."""
    block_state = {col: tree[name] for col, tree in state.items() if name in tree}
    return params[name], block_state


def tree_init(
    ctx: StudyContext, tree: conal.TreeModel, seed: int, exact: bool, init: str
) -> tuple[dict, dict]:
    """Initial ``(params, model_state)``: the trunk (and the heads) from the seed's standard
    initialisation (exact block cut) or from the blocks' own init; copies per ``init``
    (:func:`mtl_jax.conal.tree_init`)."""
    params0, state0 = initial_params(ctx.model, ctx.data.tasks, ctx.data.input_shape, seed)
    names = [b.name for b in tree.blocks]
    if exact:

        def block_vars(b: int, variant: int | None) -> tuple[PyTree, PyTree]:
            if variant is None:
                p, s = params0, state0
            else:
                p, s = initial_params(
                    ctx.model,
                    ctx.data.tasks,
                    ctx.data.input_shape,
                    1_000_003 * (seed + 1) + variant,
                )
            return _encoder_block(p["encoder"], s["encoder"], names[b])

    else:
        example = np.zeros((2, *ctx.data.input_shape), np.float32)
        block_vars = conal.random_block_init(tree.blocks, jax.random.key(seed), example)
    params, state = conal.tree_init(tree, block_vars, init=init)
    params["heads"] = {name: params0["heads"][name] for name in tree.task_names}
    return params, state


def _encoder_of(tree_params: dict) -> dict:
    return {"trunk": tree_params["trunk"], "branches": tree_params["branches"]}


def _jacobian_method(method: str, kwargs: dict, num_tasks: int, steps_per_epoch: int, seed):
    """The catalogue's transform of ``method`` for ``num_tasks`` rows; a ConfigError unless it
    is a gradient aggregator (cost "jacobian", no post-step)."""
    m = get_method(method, kwargs, num_tasks, steps_per_epoch, seed=seed)
    if m.cost != "jacobian" or m.post_step is not None:
        raise ConfigError(
            f"conal.methods: {method!r} is a {m.cost} method; the retrain step takes gradient "
            "aggregators (methods of cost 'jacobian'), e.g. 'mean', 'pcgrad', 'cagrad:c=0.4'."
        )
    return m.transform


def retrain_transform(
    tree: conal.TreeModel,
    method: str,
    method_kwargs: dict,
    opt: optax.GradientTransformation,
    steps_per_epoch: int,
    seed: int,
) -> optax.GradientTransformation:
    """Each parameter unit aggregated over the rows of exactly its tasks
    (:func:`mtl_jax.conal.unit_aggregation`, one ``method`` per unit), then the run's optimizer,
    with its own state (and global-norm clipping) for the encoder and for the heads."""

    def aggregator_for(n: int) -> optax.GradientTransformation:
        return _jacobian_method(method, method_kwargs, n, steps_per_epoch, seed)

    def labels(params: dict) -> dict:
        return {
            "trunk": jax.tree.map(lambda _: "encoder", params["trunk"]),
            "branches": jax.tree.map(lambda _: "encoder", params["branches"]),
            "heads": jax.tree.map(lambda _: "heads", params["heads"]),
        }

    return optax.chain(
        conal.unit_aggregation(tree, aggregator_for),
        optax.partition({"encoder": opt, "heads": opt}, labels),
    )


def make_retrain(
    tree: conal.TreeModel,
    tasks: Sequence,
    method: str,
    method_kwargs: dict,
    opt: optax.GradientTransformation,
    steps_per_epoch: int,
    seed: int,
    task_map: str = "unroll",
) -> tuple[Callable, Callable]:
    """``(init(params, state) -> RetrainState, step(state, batch) -> (state, {"losses"}))``:
    :func:`mtl_jax.conal.make_retrain` with the study's task losses (``tasks`` in the tree's
    task order) and :func:`retrain_transform`; ``task_map`` (``conal.retrain_task_map``) maps
    the trunk's K backward passes."""
    by_name = {t.name: t for t in tasks}

    def loss_fn(name: str, prediction, batch: dict):
        return losses_lib.task_loss(by_name[name], prediction, batch[name])

    tx = retrain_transform(tree, method, method_kwargs, opt, steps_per_epoch, seed)
    retrain = conal.make_retrain(tree, loss_fn, tx, task_map=task_map)

    def step(state: conal.RetrainState, batch: dict) -> tuple[conal.RetrainState, dict]:
        return retrain.step(state, batch["image"], batch)

    return retrain.init, step


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics: stored (A), train mode (B), recomputed on training batches (C).

BN_MODES = ("stored", "train_mode", "recomputed")


def statistics_batches(source, batch_size: int, seed: int, count: int) -> list[jax.Array]:
    """The inputs ``x`` of the first ``count`` training batches of a fixed shuffled epoch, drawn
    apart from the training order (``seed + 7_777``); fewer when the set is smaller."""
    per_epoch = data_lib.num_batches(source, batch_size, drop_remainder=True)
    it = data_lib.batches(source, batch_size, seed=seed + 7_777, epoch=0)
    return [jnp.asarray(next(it)["image"]) for _ in range(min(count, per_epoch))]


def evaluate_bn_modes(
    tree: conal.TreeModel,
    tasks: Sequence,
    params: dict,
    model_state: dict,
    test_source,
    eval_batch_size: int,
    inputs: Sequence[jax.Array],
) -> dict[str, dict]:
    """Test metrics of one set of weights under three BatchNorm statistics.

    * ``stored``: the running statistics the run kept (what the study reports, unless
      ``eval.recompute_bn_batches`` replaced them);
    * ``train_mode``: every layer normalises with the statistics of the test batch itself
      (batches of ``eval_batch_size``, in order; the last may be smaller);
    * ``recomputed``: the statistics recomputed on the training batches ``inputs``
      (:func:`mtl_jax.conal.recompute_tree_statistics`), then evaluation mode.

    Returns ``{mode: {task: metrics}}`` (:data:`BN_MODES`) and ``"batches"``: len(inputs).
    """

    class _State(NamedTuple):
        params: dict
        model_state: dict

    predict = jax.jit(tree.predict)

    def train_mode_predict(p: dict, s: dict, x: jax.Array) -> dict:
        return tree.apply(p, s, x, True)[0]

    recomputed = conal.recompute_tree_statistics(tree, params, model_state, inputs)
    return {
        "stored": evaluate_split(
            predict, tasks, _State(params, model_state), test_source, eval_batch_size
        ),
        "train_mode": evaluate_split(
            jax.jit(train_mode_predict),
            tasks,
            _State(params, model_state),
            test_source,
            eval_batch_size,
        ),
        "recomputed": evaluate_split(
            predict, tasks, _State(params, recomputed), test_source, eval_batch_size
        ),
        "batches": len(inputs),
    }


def standard_run_as_tree(
    tree: conal.TreeModel, params: dict, model_state: dict
) -> tuple[dict, dict]:
    """The final ``(params, model_state)`` of a standard run (``{"encoder", "heads"}``) as the
    all-shared tree's (exact block cut: the encoder's variables are its blocks')."""
    names = [b.name for b in tree.blocks]
    blocks = [_encoder_block(params["encoder"], model_state["encoder"], n) for n in names]
    return (
        {"trunk": [b[0] for b in blocks], "branches": [], "heads": params["heads"]},
        {"trunk": [b[1] for b in blocks], "branches": []},
    )


def retrain_run(
    ctx: StudyContext,
    label: str,
    method: str,
    seed: int,
    arch: conal.Architecture,
    run_id: str,
    artifacts: Artifacts,
    info: dict,
) -> dict:
    """Trains the tree architecture ``arch`` (the phase ``run_id``), resumable; returns the
    summary record (same fields as ``train_run``'s, so the base report lists the run), through
    the one run lifecycle (:func:`experiments.lifecycle.run_lifecycle`)."""
    key = lifecycle.RunKey(label, seed, run_id)
    return lifecycle.run_lifecycle(
        key, ctx.log, artifacts, lambda: _retrain_parts(ctx, key, method, arch, artifacts, info)
    )


def _retrain_parts(
    ctx: StudyContext,
    key: lifecycle.RunKey,
    method: str,
    arch: conal.Architecture,
    artifacts: Artifacts,
    info: dict,
) -> lifecycle.RunParts:
    """The retrain's parts of the lifecycle: the tree model's step, its records, precise BN and
    the A/B/C BatchNorm evaluation at the end, its summary."""
    config, log, seed = ctx.config, ctx.log, key.seed
    blocks, exact = _blocks_for(ctx)
    tree = tree_model(blocks, arch, ctx.model, ctx.data.tasks)
    name, kwargs = method_spec(config, method)
    batch_size = int(config.train.batch_size)
    steps_per_epoch = data_lib.num_batches(ctx.data.train, batch_size, drop_remainder=True)
    total = int(config.train.epochs) * steps_per_epoch
    opt = optim.optimizer(config.train, steps_per_epoch)
    init_fn, step = make_retrain(
        tree,
        ctx.data.tasks,
        name,
        kwargs,
        opt,
        steps_per_epoch,
        seed,
        task_map=str(config.conal.retrain_task_map),
    )
    params, model_state = tree_init(ctx, tree, seed, exact, str(config.conal.init))
    template = jax.jit(init_fn)(params, model_state)
    names = [t.name for t in ctx.data.tasks]
    predict = jax.jit(tree.predict)
    columns = ["image", *names]
    recompute_n = int(config.eval.recompute_bn_batches)
    modes_n = int(config.conal.bn_modes_batches)
    stat_batches = statistics_batches(ctx.data.train, batch_size, seed, max(recompute_n, modes_n))
    eval_batch_size = int(config.train.eval_batch_size)

    def evaluated(state: conal.RetrainState) -> conal.RetrainState:
        """The state evaluated and saved: with ``eval.recompute_bn_batches`` its running
        statistics recomputed from the current weights (precise BN), else as stored."""
        if not recompute_n:
            return state
        ms = conal.recompute_tree_statistics(
            tree, state.params, state.model_state, stat_batches[:recompute_n]
        )
        return state._replace(model_state=ms)

    def batches(epoch: int, start_batch: int):
        for batch in data_lib.batches(
            ctx.data.train, batch_size, seed=seed, epoch=epoch, start_batch=start_batch
        ):
            yield {k: jnp.asarray(batch[k]) for k in columns}

    def start_fields(state: conal.RetrainState) -> dict:
        return {
            "method": name,
            "method_kwargs": dict(kwargs),
            "tasks": names,
            "encoder_params": count_params(_encoder_of(state.params)),
            "head_params": count_params(state.params["heads"]),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
            "info": info,
        }

    def check(state, out: dict, has_checkpoint: bool) -> None:
        if int(state.first_nonfinite) >= 0:
            raise FloatingPointError(
                f"Run {key.phase}: non-finite task loss at step {int(state.first_nonfinite)}; "
                "lower the learning rate."
            )

    def on_log(state, step_: int, epoch: int, out: dict) -> None:
        losses = np.asarray(out["losses"])
        log.write(
            key.record(
                "train",
                step_,
                epoch=epoch,
                loss={n: float(v) for n, v in zip(names, losses, strict=True)},
                incidence=math.nan,
                mean_cos=math.nan,
                weights=[],
            )
        )

    def evaluate_test(state: conal.RetrainState) -> dict:
        return evaluate_split(
            predict, ctx.data.tasks, evaluated(state), ctx.data.test, eval_batch_size
        )

    def finalize(state: conal.RetrainState) -> conal.RetrainState:
        """The A/B/C BatchNorm evaluation (artifact ``bn_modes``), then the state to save."""
        if modes_n and jax.tree.leaves(state.model_state):  # a model without BatchNorm: skip
            bn_modes = evaluate_bn_modes(
                tree,
                ctx.data.tasks,
                state.params,
                state.model_state,
                ctx.data.test,
                eval_batch_size,
                stat_batches[:modes_n],
            )
            artifacts.save_json(key.phase, "bn_modes", bn_modes)
        return evaluated(state)

    def on_finish(finish: lifecycle.Finish) -> dict:
        state = finish.state
        return lifecycle.summary_record(
            finish,
            method=name,
            tasks=names,
            incidence_all={},
            incidence_last_half={},
            s_scores={},
            encoder_params=count_params(_encoder_of(state.params)),
            head_params=count_params(state.params["heads"]),
            info={**info, "bn_statistics": "recomputed" if recompute_n else "running"},
        )

    return lifecycle.RunParts(
        step_fn=jax.jit(step, donate_argnums=0),
        template=template,
        batches=batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        on_finish=on_finish,
        loop=lifecycle.loop_settings(config.train, progress=ctx.progress, desc=key.phase),
        start_fields=start_fields,
        on_log=on_log,
        check=check,
        evaluate=evaluate_test,
        eval_every_epochs=int(config.train.eval_every_epochs),
        finalize=finalize,
    )


def _retrain_phase(
    ctx: StudyContext, method: str, variant: str, seed: int, nb_tasks: int, num_blocks: int
) -> Phase:
    label = method if variant == "shared" else f"{method}+{variant}"
    run_id = f"{label}__seed{seed}"
    discretise_id = f"discretise__seed{seed}"
    key = lifecycle.RunKey(label, seed, run_id)

    def run(artifacts: Artifacts) -> dict:
        if variant == "conal":
            arch = load_architecture(artifacts, seed)
        else:
            p = num_blocks if variant == "shared" else 0
            arch = conal.Architecture((p,) * nb_tasks, num_blocks)
        info = {"conal": variant, "branch_points": list(arch.branch_points)}
        return retrain_run(ctx, label, method, seed, arch, run_id, artifacts, info)

    needs = (discretise_id,) if variant == "conal" else ()
    return Phase(
        name=run_id,
        run=run,
        needs=needs,
        info={"label": label, "seed": seed, "method": method, "conal": variant},
        finished=lifecycle.run_finished(ctx.log, key),
    )


def _bn_modes_phase(ctx: StudyContext, label: str, seed: int, num_blocks: int) -> Phase:
    """The A/B/C BatchNorm evaluation (:func:`evaluate_bn_modes`) of a finished standard run
    (the all-shared baseline of an exact block cut), as the all-shared tree; artifact
    ``bn_modes`` in the phase ``bn_modes__<run>``."""
    run_id = f"{label}__seed{seed}"
    name = f"bn_modes__{run_id}"

    def run(artifacts: Artifacts) -> dict:
        config = ctx.config
        blocks, _ = _blocks_for(ctx)
        k = len(ctx.data.tasks)
        arch = conal.Architecture((num_blocks,) * k, num_blocks)
        tree = tree_model(blocks, arch, ctx.model, ctx.data.tasks)
        final = artifacts.load_arrays(run_id, "final")
        params, state = standard_run_as_tree(tree, final["params"], final["model_state"])
        if not jax.tree.leaves(state):  # no BatchNorm: the three evaluations are one
            return {"run": label, "seed": seed}
        batches = statistics_batches(
            ctx.data.train,
            int(config.train.batch_size),
            seed,
            int(config.conal.bn_modes_batches),
        )
        modes = evaluate_bn_modes(
            tree,
            ctx.data.tasks,
            params,
            state,
            ctx.data.test,
            int(config.train.eval_batch_size),
            batches,
        )
        artifacts.save_json(name, "bn_modes", modes)
        return {"run": label, "seed": seed}

    return Phase(name=name, run=run, needs=(run_id,), info={"seed": seed, "conal": "bn_modes"})


def runs_and_phases(ctx: StudyContext) -> list[Phase]:
    config, c = ctx.config, ctx.config.conal
    blocks, exact = _blocks_for(ctx)
    k = len(ctx.data.tasks)
    phases: list[Phase] = []
    for seed in map(int, config.seeds):
        phases += [_search_phase(ctx, seed), _discretise_phase(ctx, seed)]
        for method in c.methods:
            phases.append(_retrain_phase(ctx, method, "conal", seed, k, len(blocks)))
            if exact and not int(config.eval.recompute_bn_batches):
                name, kwargs = method_spec(config, method)
                spec = RunSpec(
                    label=method,
                    method=name,
                    method_kwargs=kwargs,
                    seed=seed,
                    info={"conal": "shared"},
                )
                phases.append(train_phase(ctx, spec))
                if int(c.bn_modes_batches):
                    phases.append(_bn_modes_phase(ctx, method, seed, len(blocks)))
            else:
                phases.append(_retrain_phase(ctx, method, "shared", seed, k, len(blocks)))
            phases.append(_retrain_phase(ctx, method, "private", seed, k, len(blocks)))
        if config.single_task:
            phases += [train_phase(ctx, spec) for spec in single_task_runs(ctx.data, seed)]
    return phases


def validate(config: ml_collections.ConfigDict) -> None:
    c = config.conal
    check_keys(c, defaults().keys(), "config.conal")
    if config.model.name not in BLOCK_MODELS:
        raise ConfigError(
            f"The conal study cuts the encoder into blocks; model {config.model.name!r} has none. "
            f"Models with a block sequence: {sorted(BLOCK_MODELS)}."
        )
    if not c.methods:
        raise ConfigError("conal.methods is empty; give at least one base method, e.g. ('mean',).")
    for method in c.methods:
        name, kwargs = method_spec(config, method)
        _jacobian_method(name, kwargs, 2, 1, seed=0)
    if c.mixing not in conal.MIXINGS:
        raise ConfigError(f"conal.mixing must be one of {conal.MIXINGS}; got {c.mixing!r}.")
    for key in ("task_map", "retrain_task_map"):
        if c[key] not in conal.TASK_MAPS:
            raise ConfigError(f"conal.{key} must be one of {conal.TASK_MAPS}; got {c[key]!r}.")
    if c.tie_break not in ("shared", "private"):
        raise ConfigError(f"conal.tie_break must be 'shared' or 'private'; got {c.tie_break!r}.")
    if c.init not in ("fresh", "copy"):
        raise ConfigError(f"conal.init must be 'fresh' or 'copy'; got {c.init!r}.")
    if not 0.0 < float(c.val_fraction) < 1.0:
        raise ConfigError(f"conal.val_fraction must lie in (0, 1); got {c.val_fraction}.")
    if int(c.alpha_every) < 1:
        raise ConfigError(f"conal.alpha_every must be >= 1; got {c.alpha_every}.")
    if float(c.arch_lr) <= 0 or float(c.tau) <= 0 or float(c.weight_lr) < 0:
        raise ConfigError("conal.arch_lr and conal.tau must be > 0 and conal.weight_lr >= 0.")
    if int(c.search_epochs) < 0 or int(c.pro_steps_per_stage) < 0:
        raise ConfigError("conal.search_epochs and conal.pro_steps_per_stage must be >= 0.")
    if int(c.bn_modes_batches) < 0:
        raise ConfigError(
            "conal.bn_modes_batches counts training batches; "
            f"got {c.bn_modes_batches}. Use 0 to turn it off."
        )


# ---------------------------------------------------------------------------------------------
# Report.


def _delta_m_reference(records, tasks, seed: int, shared_label: str):
    """``(reference {task: {metric}}, description)``: single-task runs if present, else the
    all-shared model of the same seed."""
    ref = reports.single_task_reference(records, tasks)
    if len(ref) == len(tasks):
        return ref, "single-task runs (mean over seeds)"
    for r in records:
        if r.get("kind") == "summary" and r["run"] == shared_label and r["seed"] == seed:
            ref = {
                t.name: {m: r["test"][t.name][m] for m in reports.DELTA_M_METRICS[t.kind]}
                for t in tasks
            }
            return ref, "the all-shared model of the same seed"
    return None, "none"


def _load_bn_modes(artifacts: Artifacts, label: str, seed: int) -> dict | None:
    """The run's A/B/C BatchNorm evaluation: its own phase's artifact (retrained trees) or the
    ``bn_modes__`` phase's (standard runs); None when there is none."""
    run_id = f"{label}__seed{seed}"
    for phase in (run_id, f"bn_modes__{run_id}"):
        if artifacts.has(phase, "bn_modes"):
            return artifacts.load_json(phase, "bn_modes")
    return None


def conal_summary(records, tasks, config, workdir: str) -> dict[str, Any]:
    """The content of ``conal_summary.json`` (see the module docstring)."""
    artifacts = Artifacts(workdir)
    summaries = {(r["run"], r["seed"]): r for r in records if r.get("kind") == "summary"}
    task_names = [t.name for t in tasks]
    out: dict[str, Any] = {"tasks": task_names, "seeds": {}, "methods": list(config.conal.methods)}
    reference_used = None
    for seed in map(int, config.seeds):
        phase = f"discretise__seed{seed}"
        if not artifacts.has(phase, "architecture"):
            continue
        a = artifacts.load_json(phase, "architecture")
        weights = np.asarray(a["alpha_softmax"], dtype=np.float64)  # [K, P]
        expected = weights @ np.arange(weights.shape[1])
        top2 = np.sort(weights, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]  # top-1 minus top-2 softmax weight per task
        entry: dict[str, Any] = {
            "branch_points": dict(zip(task_names, a["branch_points"], strict=True)),
            "alpha_softmax": dict(zip(task_names, a["alpha_softmax"], strict=True)),
            "expected_branch_point": dict(zip(task_names, expected.tolist(), strict=True)),
            "argmax_margin": dict(zip(task_names, margin.tolist(), strict=True)),
            "block_names": a["block_names"],
            "encoder_param_counts": a["param_counts"],
            "models": {},
        }
        if a.get("group_labels"):
            entry["group_labels"] = a["group_labels"]
        for method in config.conal.methods:
            ref, described = _delta_m_reference(records, tasks, seed, method)
            reference_used = described
            models = {}
            for variant in VARIANTS:
                label = method if variant == "shared" else f"{method}+{variant}"
                s = summaries.get((label, seed))
                if s is None:
                    continue
                row = {
                    "run": label,
                    "encoder_params": s["encoder_params"],
                    "head_params": s["head_params"],
                    "total_params": s["encoder_params"] + s["head_params"],
                    "test": s["test"],
                }
                if ref is not None:
                    row["delta_m"] = reports._delta_m(s, tasks, ref, "per_task")
                modes = _load_bn_modes(artifacts, label, seed)
                if modes is not None:
                    row["bn_statistics"] = s.get("info", {}).get("bn_statistics", "running")
                    row["bn_modes"] = {m: modes[m] for m in BN_MODES}
                    if ref is not None:
                        row["bn_modes_delta_m"] = {
                            m: reports._delta_m({"test": modes[m]}, tasks, ref, "per_task")
                            for m in BN_MODES
                        }
                models[variant] = row
            entry["models"][method] = models
        out["seeds"][str(seed)] = entry
    out["delta_m_reference"] = reference_used
    # stability: per task, how many seeds agree with the most common branch point, and the
    # softmax-expected branch point E[p] over seeds (a coarser, less noisy summary of the search)
    stability = {}
    for t in task_names:
        points = [e["branch_points"][t] for e in out["seeds"].values()]
        if points:
            mode, count = collections.Counter(points).most_common(1)[0]
            expected = [e["expected_branch_point"][t] for e in out["seeds"].values()]
            stability[t] = {
                "points": points,
                "mode": mode,
                "agree": count,
                "of": len(points),
                "expected_mean": float(np.mean(expected)),
                "expected_std": float(np.std(expected, ddof=1)) if len(expected) > 1 else 0.0,
            }
    out["stability"] = stability
    archs = [tuple(e["branch_points"].values()) for e in out["seeds"].values()]
    out["identical_architectures"] = collections.Counter(archs).most_common(1)[0][1] if archs else 0
    return out


def _bn_modes_table(summary: dict, tasks) -> list[str]:
    """Markdown lines: per model, the test metric of every task and Δm% under the stored,
    train-mode and recomputed BatchNorm statistics (:func:`evaluate_bn_modes`); [] without
    such evaluations."""
    seeds = summary["seeds"]
    labels = {"conal": "learned", "shared": "all-shared", "private": "all-private"}
    short = {"stored": "A stored", "train_mode": "B train-mode", "recomputed": "C recomputed"}
    header = ["method", "model", "statistics"]
    header += [
        f"{t.name} {reports.display_name(reports.REPORTED_METRICS[t.kind][0])}" for t in tasks
    ]
    header += ["Δm%"]
    body = []
    for method in summary["methods"]:
        for variant in VARIANTS:
            rows = [
                e["models"][method][variant]
                for e in seeds.values()
                if "bn_modes" in e["models"].get(method, {}).get(variant, {})
            ]
            for mode in BN_MODES if rows else ():
                row = [method, labels[variant], short[mode]]
                for t in tasks:
                    metric = reports.REPORTED_METRICS[t.kind][0]
                    scale = 100.0 if metric in reports.PERCENT_FRACTIONS else 1.0
                    row.append(fmt([scale * r["bn_modes"][mode][t.name][metric] for r in rows]))
                row.append(fmt([r.get("bn_modes_delta_m", {}).get(mode, math.nan) for r in rows]))
                body.append("| " + " | ".join(row) + " |")
    if not body:
        return []
    return [
        "",
        "BatchNorm statistics of the final weights (A: the stored running statistics; B: each "
        "test batch's own; C: recomputed on training batches per stream, precise BN). The table "
        "above reports A, or C where `eval.recompute_bn_batches` > 0.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *body,
    ]


def report(records, tasks, config, workdir: str) -> str:
    summary = conal_summary(records, tasks, config, workdir)
    atomic_write_text(
        os.path.join(workdir, "conal_summary.json"),
        json.dumps(summary, indent=2, allow_nan=True) + "\n",
    )
    names = [t.name for t in tasks]
    seeds = summary["seeds"]
    lines = ["## CoNAL: learned branch points vs all-shared and all-private", ""]
    if not seeds:
        return "\n".join([*lines, "No search has finished yet."])
    block_names = next(iter(seeds.values()))["block_names"]
    lines += [
        "Branch point p = the number of shared blocks before the task's own copies "
        f"({len(block_names)} = fully shared; blocks: {', '.join(block_names)}).",
        "",
        "| seed | " + " | ".join(names) + " | encoder params (learned / shared / private) |",
        "|" + "---|" * (len(names) + 2),
    ]
    for seed, e in seeds.items():
        c = e["encoder_param_counts"]
        lines.append(
            f"| {seed} | "
            + " | ".join(str(e["branch_points"][n]) for n in names)
            + f" | {c['learned']:,} / {c['all_shared']:,} / {c['all_private']:,} |"
        )
    stab = summary["stability"]
    lines += [
        "",
        "Stability across seeds (seeds agreeing with the most common branch point): "
        + ", ".join(f"{n}: {s['agree']}/{s['of']} at p={s['mode']}" for n, s in stab.items())
        + f"; identical architectures: {summary['identical_architectures']}/{len(seeds)}. "
        "Softmax-expected branch point E[p] (mean ± std over seeds): "
        + ", ".join(
            f"{n}: {s['expected_mean']:.2f} ± {s['expected_std']:.2f}" for n, s in stab.items()
        )
        + "; smallest argmax margin (top-1 minus top-2 softmax weight) over seeds and tasks: "
        + f"{min(v for e in seeds.values() for v in e['argmax_margin'].values()):.3f}.",
        "",
    ]
    header = ["method", "model", "params (total)"]
    header += [
        f"{t.name} {reports.display_name(reports.REPORTED_METRICS[t.kind][0])}" for t in tasks
    ]
    header += ["Δm%"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in summary["methods"]:
        for variant in VARIANTS:
            rows = [
                e["models"][method][variant]
                for e in seeds.values()
                if variant in e["models"].get(method, {})
            ]
            if not rows:
                continue
            row = [
                method,
                {"conal": "learned", "shared": "all-shared", "private": "all-private"}[variant],
            ]
            row.append(fmt([r["total_params"] for r in rows], 0))
            for t in tasks:
                metric = reports.REPORTED_METRICS[t.kind][0]
                scale = 100.0 if metric in reports.PERCENT_FRACTIONS else 1.0
                row.append(fmt([scale * r["test"][t.name][metric] for r in rows]))
            row.append(fmt([r.get("delta_m", math.nan) for r in rows]))
            lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Mean ± std over {len(seeds)} seed(s); Δm% against {summary['delta_m_reference']} "
        "(higher is better).",
    ]
    lines += _bn_modes_table(summary, tasks)
    if config.report.plots:
        plots = os.path.join(workdir, "plots")
        os.makedirs(plots, exist_ok=True)
        artifacts = Artifacts(workdir)
        for seed, e in seeds.items():
            png = os.path.join(plots, f"conal_tree_seed{seed}.png")
            conal_report.draw_architecture(
                tuple(e["branch_points"][n] for n in names),
                e["block_names"],
                names,
                png,
                grouped=bool(e.get("group_labels")),
                group_labels=e.get("group_labels"),
                title=f"CoNAL, seed {seed}",
            )
            lines.append(f"![conal_tree_seed{seed}.png](plots/conal_tree_seed{seed}.png)")
            found = artifacts.load_json(f"search__seed{seed}", "search")
            traj = found["trajectory"]
            if traj["steps"]:
                png = os.path.join(plots, f"conal_alpha_seed{seed}.png")
                conal_report.plot_alpha_trajectory(
                    traj["alpha_softmax"], names, png, steps=traj["steps"]
                )
                lines.append(f"![conal_alpha_seed{seed}.png](plots/conal_alpha_seed{seed}.png)")
    return "\n".join(lines)


STUDY = Study(
    name="conal",
    description="CoNAL: search branch points -> discretise -> retrain, vs all-shared/all-private",
    phases=runs_and_phases,
    section="conal",
    defaults=defaults,
    validate=validate,
    report=report,
)
