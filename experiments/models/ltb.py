"""``ltb``: Learning to Branch (Guo, Lee, Ulbricht, ICML 2020), after LibMTL's ``LTB``.

Guo, Lee, Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020; LibMTL's
``LibMTL/architecture/LTB.py`` is the reference implementation researchers know.

A layered graph with K nodes per layer (one per task). Layer 0 (the stem) is K nodes reading the
input; in every later layer ``l`` child ``c`` picks its parent among layer ``l-1``'s K nodes with a
Gumbel-softmax over its branching logits ``alpha_l[c]: [K]`` (paper Eq. 3-4)::

    w_l[c] = one_hot(argmax_j (alpha_l[c, j] + g_j))  (forward)              g_j ~ Gumbel(0, 1)
           + softmax((alpha_l[c] + g) / tau) - stop_gradient(same)   (straight-through backward)
    input_l[c] = sum_j w_l[c, j] * node_{l-1}[j]                              node: [B, H, W, C]
    node_l[c] = ConvBlock_l,c(input_l[c])          Conv3x3 -> BN -> ReLU -> MaxPool 2

with the temperature annealed as LibMTL's ``tau = (epochs / 20) / sqrt(epoch + 1)``, here per step:
``tau = tau_initial / sqrt(1 + step / tau_decay_steps)``. During the first ``warmup_steps`` every
child sums all its parents (LibMTL: ``alpha = ones`` for the first 1% of the epochs); evaluation
(``train=False``) uses the argmax parent, i.e. the branched architecture that was learned.

Where the parameters sit: the stem and the branching layers ``1 .. L-2`` (their nodes and their
``alpha``) are the encoder (shared: a node can feed any task, so it gets K Jacobian rows); the
encoder returns ``z: [B, K, H, W, C]``. The last layer's node of task k is task k's alone
(LibMTL's ``ss_rep[L-1][k]`` feeds decoder k only), so it is head k (:class:`LTBHead`): its own
branching logits over the K encoder nodes, its node, global average pool and a
:class:`~experiments.models.base.ClassifierHead`.

The randomness: the runner applies the encoder and heads without Flax rngs, so each module keeps a
step counter in a ``"ltb"`` variable collection (mutable state like BatchNorm's statistics,
advanced by every ``train=True`` call) and draws its Gumbel noise from
``fold_in(fold_in(PRNGKey(gumbel_seed), step), salt)`` (a different salt per layer and head). A
custom loop may instead pass ``rngs={"gumbel": key}`` to ``apply``; the noise then comes from that
stream. ``gumbel_noise=False, hard=False`` is the deterministic softmax relaxation
``w = softmax(alpha / tau)``. The counters are model state: checkpointed with the BatchNorm
statistics, and the encoder's and the heads' stay equal because every training step applies each
once. Heads carry state, so the runner's per-task sharing mode does not take this model.

Departures from LibMTL:

* Step-based schedule (``warmup_steps``, ``tau_initial``, ``tau_decay_steps``) instead of epochs;
  the runner passes no epoch to the model.
* Evaluation takes the argmax parent (LibMTL keeps sampling in ``eval()``).
* The last layer's nodes are the heads (task-specific leaves of the gradient tree) instead of
  encoder parameters that only one task's loss reaches; the encoder has ``len(channels) - 1``
  layers, the heads one.
* Small CNN nodes (CPU-sized) instead of ResNet-18 stages; the paper's resource-aware loss term
  and its two-stage (search, then retrain) protocol are not included: this is LibMTL's joint
  training of weights and branching logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.base import ClassifierHead, MultiTaskModel, check_pools_fit
from experiments.models.small_cnn import ConvBlock
from experiments.tasks import TaskSpec

DEFAULTS = {
    "channels": (
        8,
        16,
        16,
    ),  # stem, branching layers (encoder), the heads' layer; one ConvBlock each
    "head_hidden": 32,  # per-task hidden width after the pool; 0 = linear classifier
    "warmup_steps": 50,  # every child sums all parents while step < warmup_steps (LibMTL: 1%)
    "tau_initial": 5.0,  # Gumbel-softmax temperature at step 0 (LibMTL: epochs / 20)
    "tau_decay_steps": 100.0,  # tau = tau_initial / sqrt(1 + step / tau_decay_steps)
    "hard": True,  # straight-through one-hot choice (LibMTL: hard=True)
    "gumbel_noise": True,  # False: no noise (hard=False too: a deterministic softmax relaxation)
    "gumbel_seed": 0,  # seed of the noise when no "gumbel" rng stream is passed
}
TASK_KINDS = ("classification",)

STEP_COLLECTION = "ltb"


@dataclasses.dataclass(frozen=True)
class BranchSchedule:
    """The branching hyper-parameters (see :data:`DEFAULTS`)."""

    warmup_steps: int = 50
    tau_initial: float = 5.0
    tau_decay_steps: float = 100.0
    hard: bool = True
    gumbel_noise: bool = True
    seed: int = 0


def temperature(step: jax.Array, schedule: BranchSchedule) -> jax.Array:
    """``tau_initial / sqrt(1 + step / tau_decay_steps)`` (LibMTL's ``tau``, per step)."""
    return schedule.tau_initial / jnp.sqrt(1.0 + step / schedule.tau_decay_steps)


def gumbel_softmax(
    logits: jax.Array, tau: jax.Array, noise: jax.Array | None, hard: bool
) -> jax.Array:
    """PyTorch's ``F.gumbel_softmax`` on the last axis: ``logits [..., K] -> weights [..., K]``.

    ``noise`` (Gumbel(0, 1) of ``logits``' shape) or ``None`` (no noise). ``hard``: one-hot
    forward, the soft sample's gradient backward (straight-through).
    """
    perturbed = logits if noise is None else logits + noise
    soft = jax.nn.softmax(perturbed / tau, axis=-1)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return one_hot - jax.lax.stop_gradient(soft) + soft


def branch_weights(
    logits: jax.Array,
    step: jax.Array,
    key: jax.Array | None,
    schedule: BranchSchedule,
    train: bool,
) -> jax.Array:
    """The parent weights ``[C, K]`` of C children from their logits ``alpha: [C, K]``.

    ``step < warmup_steps``: all ones (every child sums its parents); ``train``: Gumbel-softmax
    at the scheduled temperature (noise from ``key`` unless ``gumbel_noise`` is off); otherwise
    the argmax parent, one-hot.
    """
    if train:
        noise = None
        if schedule.gumbel_noise and key is not None:
            noise = jax.random.gumbel(key, logits.shape, logits.dtype)
        chosen = gumbel_softmax(logits, temperature(step, schedule), noise, schedule.hard)
    else:
        chosen = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)
    return jnp.where(step < schedule.warmup_steps, jnp.ones_like(chosen), chosen)


class StepCounter(nn.Module):
    """The training-step count in the ``"ltb"`` collection: returns it, then advances it.

    Advances only under ``train=True`` when the collection is mutable (the runner's training
    forward), never at init; evaluation reads it unchanged.
    """

    @nn.compact
    def __call__(self, train: bool) -> jax.Array:
        var = self.variable(STEP_COLLECTION, "step", lambda: jnp.zeros((), jnp.float32))
        step = var.value
        if train and not self.is_initializing() and self.is_mutable_collection(STEP_COLLECTION):
            var.value = step + 1.0
        return step


class BranchingLayer(nn.Module):
    """C children, each picking one of K parents: ``parents [K, B, H, W, C_in] -> [C, B, ...]``."""

    num_children: int
    features: int
    schedule: BranchSchedule
    salt: int

    @nn.compact
    def __call__(self, parents: jax.Array, step: jax.Array, train: bool) -> jax.Array:
        num_parents = parents.shape[0]
        alpha = self.param("alpha", nn.initializers.ones, (self.num_children, num_parents))
        key = None
        if train and self.schedule.gumbel_noise:
            if self.has_rng("gumbel"):
                key = self.make_rng("gumbel")
            else:
                key = jax.random.PRNGKey(self.schedule.seed)
                key = jax.random.fold_in(
                    jax.random.fold_in(key, step.astype(jnp.uint32)), self.salt
                )
        weights = branch_weights(alpha, step, key, self.schedule, train)  # [C, K]
        inputs = jnp.tensordot(weights, parents, axes=1)  # [C, B, H, W, C_in]
        children = [
            ConvBlock(self.features, name=f"node{c}")(inputs[c], train)
            for c in range(self.num_children)
        ]
        return jnp.stack(children)


class LTBEncoder(nn.Module):
    """``x [B, H, W, C] -> z [B, K, H', W', channels[-1]]``: stem + branching layers."""

    num_tasks: int
    channels: Sequence[int]  # the encoder's layers: stem, then branching layers
    schedule: BranchSchedule

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        step = StepCounter(name="counter")(train)
        nodes = jnp.stack(
            [
                ConvBlock(self.channels[0], name=f"stem_node{k}")(x, train)
                for k in range(self.num_tasks)
            ]
        )
        for layer, c in enumerate(self.channels[1:], start=1):
            nodes = BranchingLayer(self.num_tasks, c, self.schedule, layer, name=f"layer{layer}")(
                nodes, step, train
            )
        return jnp.moveaxis(nodes, 0, 1)


class LTBHead(nn.Module):
    """Task ``task_index``'s last-layer node: ``z [B, K, H, W, C] -> logits [B, num_classes]``."""

    task_index: int
    num_classes: int
    features: int
    schedule: BranchSchedule
    hidden: int = 0

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        if z.ndim != 5:
            raise ValueError(f"LTBHead: expected z [B, K, H, W, C]; got shape {z.shape}.")
        step = StepCounter(name="counter")(train)
        salt = 1_000 + self.task_index  # distinct from the encoder layers' salts
        node = BranchingLayer(1, self.features, self.schedule, salt, name="branch")(
            jnp.moveaxis(z, 1, 0), step, train
        )[0]
        return ClassifierHead(self.num_classes, self.hidden, name="classifier")(
            node.mean(axis=(1, 2))
        )


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    channels = tuple(int(c) for c in config.channels)
    if len(channels) < 2:
        raise ValueError(
            f"ltb: channels needs at least two layers (the stem and the heads' layer); got "
            f"{channels}. E.g. (8, 16, 16)."
        )
    check_pools_fit("ltb", input_shape, len(channels))
    if float(config.tau_initial) <= 0 or float(config.tau_decay_steps) <= 0:
        raise ValueError(
            f"ltb: tau_initial and tau_decay_steps must be > 0; got {config.tau_initial}, "
            f"{config.tau_decay_steps}."
        )
    schedule = BranchSchedule(
        warmup_steps=int(config.warmup_steps),
        tau_initial=float(config.tau_initial),
        tau_decay_steps=float(config.tau_decay_steps),
        hard=bool(config.hard),
        gumbel_noise=bool(config.gumbel_noise),
        seed=int(config.gumbel_seed),
    )
    encoder = LTBEncoder(len(tasks), channels[:-1], schedule)
    heads = {
        t.name: LTBHead(i, t.num_classes, channels[-1], schedule, int(config.head_hidden))
        for i, t in enumerate(tasks)
    }
    return MultiTaskModel(encoder, heads, tuple(tasks))
