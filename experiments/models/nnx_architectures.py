"""Flax NNX versions of LibMTL's architectures (issue 23): MMoE, CGC, PLE, DSelect-k, Cross-stitch,
MTAN and LTB, the same models as the Linen ones in :mod:`experiments.models`.

Each model is an :class:`NNXMultiTask`: ``encoder`` (the shared leaves: K Jacobian rows) and
``heads`` (an ``nnx.List``; head k holds task k's gates, own experts, attention modules, last LTB
node and tower: its task's gradient only), ``model(x: [B, H, W, C]) -> {task: logits [B, C_t]}``.
The split into encoder and heads is the Linen models' (their module docstrings say which leaf is
where and why), so the labels for :func:`mtl_jax.value_and_grads` and :func:`mtl_jax.shared_rows`
are one path pattern, :data:`TASK_SPECIFIC` = ``task_specific_paths("^heads/")``.

Building: :func:`make_nnx_model` takes the suite's model config (``default_model_config(name)``);
:func:`from_linen` builds the NNX twin of a Linen :class:`~experiments.models.base.MultiTaskModel`
from its hyper-parameters, so the config checks are the Linen builders' and nothing is set twice.
:func:`load_linen_variables` copies a Linen model's variables into the twin: the NNX state *is*
the Linen variable tree (every collection merged into one tree, heads by task index instead of
name), the same names and shapes, and the forward is the same computation
(``tests/test_models_nnx.py`` checks equal outputs, BatchNorm statistics and step counters).

Modes: NNX's ``model.train()`` / ``model.eval()``. BatchNorm's ``use_running_average`` and LTB's
``deterministic`` (evaluation: the argmax parent, the step counter frozen) follow them, as the
Linen modules' ``train`` argument. Built in training mode (NNX's default).

State that is not trained: BatchNorm statistics (``nnx.BatchStat``) and LTB's step counters
(:class:`BranchStep`), :data:`STATE`. A loss splits the model with ``nnx.split(model, nnx.Param,
...)``, runs a ``copy=True`` merge and returns ``nnx.state(model, STATE)`` as its auxiliary output
(``docs/recipes/nnx_architectures.md``).

DSelect-k's entropy regulariser (LibMTL's ``1e-6 H(r)``, off by default): ``entropy_reg`` of the
Linen head (``dselect_k.build`` reads ``config.entropy_reg``; the runner's configs refuse the key);
:meth:`NNXMultiTask.with_aux_losses` returns the per-task auxiliary losses ``[K]`` beside the
predictions, to add to the task losses (zero for every other model).

Departures from the Linen versions: the initial values come from NNX's rng streams (the same
initialisers, other draws); LTB's Gumbel noise always comes from ``gumbel_seed`` and the step
counter (the Linen modules' default; there is no ``"gumbel"`` rng stream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, traverse_util

from experiments.models import cross_stitch as linen_cross_stitch
from experiments.models import dselect_k as linen_dselect_k
from experiments.models import ltb as linen_ltb
from experiments.models import make_model, small_cnn
from experiments.models import mmoe as linen_mmoe
from experiments.models import mtan as linen_mtan
from experiments.models import ple as linen_ple
from experiments.models.base import BN_EPSILON, BN_MOMENTUM, MultiTaskModel, torch_default_init
from experiments.models.dselect_k import (
    binary_codes,
    expert_weights,
    selector_entropy,
    selector_outputs,
)
from experiments.models.ltb import BranchSchedule, branch_weights
from experiments.models.mmoe import flatten, mix_experts
from experiments.tasks import TaskSpec
from mtl_jax.nnx import task_specific_paths

PyTree = Any

__all__ = [
    "NNX_MODELS",
    "STATE",
    "TASK_SPECIFIC",
    "BranchStep",
    "NNXMultiTask",
    "from_linen",
    "linen_variables_as_pure_dict",
    "load_linen_variables",
    "make_nnx_model",
]

#: The architectures with an NNX version (names of :data:`experiments.models.MODELS`).
NNX_MODELS = ("mmoe", "cgc", "ple", "dselect_k", "cross_stitch", "mtan", "ltb")

#: Task-specific labels of every model here: the leaves under ``heads/``.
TASK_SPECIFIC = task_specific_paths("^heads/")


class BranchStep(nnx.Variable):
    """LTB's training-step counter (the Linen ``"ltb"`` collection): state, never trained."""


#: The non-trained state of the models: ``nnx.state(model, STATE)``.
STATE = (nnx.BatchStat, BranchStep)

# The Linen modules' initialisers, so both versions draw from the same distributions.
_EXPERT_KERNEL_INIT = linen_mmoe._expert_kernel_init()
_CONV_BLOCK_INIT = small_cnn._conv_init


def _uniform(scale: float) -> jax.nn.initializers.Initializer:
    return linen_dselect_k._uniform(scale)


def _max_pool2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """PyTorch's BatchNorm defaults, as the Linen modules (``BN_MOMENTUM``, ``BN_EPSILON``)."""
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


# --------------------------------------------------------------------------- building blocks


class ClassifierHead(nnx.Module):
    """:class:`experiments.models.base.ClassifierHead`: ``[B, D] -> [ReLU(fc1)] -> pred``."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, *, rngs: nnx.Rngs):
        init = torch_default_init()
        self.fc1 = (
            nnx.Linear(in_features, hidden, kernel_init=init, rngs=rngs) if hidden > 0 else None
        )
        self.pred = nnx.Linear(hidden or in_features, num_classes, kernel_init=init, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        if self.fc1 is not None:
            z = nnx.relu(self.fc1(z))
        return self.pred(z)


class ExpertBank(nnx.Module):
    """:class:`experiments.models.mmoe.ExpertBank`: E MLP experts, ``[B, D_in] -> [B, E, D]``.

    Parameters ``kernel{i}: [E, d_in, d_out]``, ``bias{i}: [E, d_out]``.
    """

    def __init__(self, num_experts: int, in_features: int, sizes: Sequence[int], *, rngs: nnx.Rngs):
        self.num_layers = len(sizes)
        d_in = in_features
        for i, d_out in enumerate(sizes):
            shape = (num_experts, d_in, d_out)
            setattr(self, f"kernel{i}", nnx.Param(_EXPERT_KERNEL_INIT(rngs.params(), shape)))
            setattr(self, f"bias{i}", nnx.Param(jnp.zeros((num_experts, d_out), jnp.float32)))
            d_in = d_out

    def __call__(self, x: jax.Array) -> jax.Array:
        h = None  # [B, E, d]
        for i in range(self.num_layers):
            kernel, bias = getattr(self, f"kernel{i}")[...], getattr(self, f"bias{i}")[...]
            if h is None:  # every expert reads the same input
                h = jnp.einsum("bi,eio->beo", x, kernel)
            else:
                h = jnp.einsum("bei,eio->beo", h, kernel)
            h = nnx.relu(h + bias)
        return h


def _gate(in_features: int, num_experts: int, rngs: nnx.Rngs) -> nnx.Linear:
    """A softmax gate's logits layer (:func:`experiments.models.mmoe.softmax_gate`)."""
    return nnx.Linear(in_features, num_experts, kernel_init=torch_default_init(), rngs=rngs)


def _gated(gate_logits: jax.Array, experts: Sequence[jax.Array]) -> jax.Array:
    """``softmax(gate_logits) [B, E]`` mixes the concatenated ``experts`` (each ``[B, E_i, D]``)."""
    return mix_experts(jax.nn.softmax(gate_logits, axis=-1), jnp.concatenate(experts, axis=1))


class ConvBlock(nnx.Module):
    """:class:`experiments.models.small_cnn.ConvBlock` with BatchNorm:
    ``Conv3x3 (no bias) -> BN -> ReLU -> MaxPool 2``."""

    def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            in_features,
            features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=_CONV_BLOCK_INIT,
            rngs=rngs,
        )
        self.bn = _batch_norm(features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _max_pool2(nnx.relu(self.bn(self.conv(x))))


class ConvBNReLU(nnx.Module):
    """:class:`experiments.models.segnet.ConvBNReLU`: ``Conv3x3 (bias, Xavier) -> BN -> ReLU``."""

    def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            in_features,
            features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            kernel_init=jax.nn.initializers.xavier_normal(),
            rngs=rngs,
        )
        self.bn = _batch_norm(features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


# --------------------------------------------------------------------------- the model


class NNXMultiTask(nnx.Module):
    """A shared ``encoder`` and one head per task: ``model(x) -> {task name: prediction}``.

    ``x: [B, *input_shape]``, the example shape the model was built for (checked at trace time).
    """

    def __init__(
        self,
        encoder: nnx.Module,
        heads: Sequence[nnx.Module],
        task_names: Sequence[str],
        input_shape: Sequence[int],
    ):
        if len(heads) != len(task_names):
            raise ValueError(f"{len(heads)} heads for {len(task_names)} task names.")
        self.encoder = encoder
        self.heads = nnx.List(heads)
        self.task_names = tuple(task_names)
        self.input_shape = tuple(int(d) for d in input_shape)

    def _encode(self, x: jax.Array) -> PyTree:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"NNXMultiTask: the model was built for examples of shape {self.input_shape} "
                f"(x: [B, {', '.join(map(str, self.input_shape))}]); got x of shape {x.shape}. "
                "Build it with make_nnx_model(..., input_shape=x.shape[1:], ...)."
            )
        return self.encoder(x)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        z = self._encode(x)
        return {name: head(z) for name, head in zip(self.task_names, self.heads, strict=True)}

    def with_aux_losses(self, x: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        """``(predictions, aux [K])``: each head's auxiliary loss (DSelect-k's entropy term when
        ``entropy_reg > 0``; 0 otherwise), to add to its task's loss, from the same forward."""
        z = self._encode(x)
        preds = {name: head(z) for name, head in zip(self.task_names, self.heads, strict=True)}
        aux = [
            head.aux_loss(z) if hasattr(head, "aux_loss") else jnp.zeros((), jnp.float32)
            for head in self.heads
        ]
        return preds, jnp.stack(aux)


# --------------------------------------------------------------------------- MMoE, DSelect-k


class MMoEEncoder(nnx.Module):
    """The shared experts: ``x [B, H, W, C] -> {"x": [B, D_in], "experts": [B, E, D]}``."""

    def __init__(
        self, in_features: int, num_experts: int, expert_sizes: Sequence[int], *, rngs: nnx.Rngs
    ):
        self.experts = ExpertBank(num_experts, in_features, expert_sizes, rngs=rngs)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        flat = flatten(x)
        return {"x": flat, "experts": self.experts(flat)}


class MMoEHead(nnx.Module):
    """Task k's softmax gate and tower (:class:`experiments.models.mmoe.MMoEHead`)."""

    def __init__(
        self,
        in_features: int,
        expert_dim: int,
        num_experts: int,
        num_classes: int,
        tower_hidden: int,
        *,
        rngs: nnx.Rngs,
    ):
        self.gate = _gate(in_features, num_experts, rngs)
        self.tower = ClassifierHead(expert_dim, num_classes, tower_hidden, rngs=rngs)

    def __call__(self, z: dict[str, jax.Array]) -> jax.Array:
        weights = jax.nn.softmax(self.gate(z["x"]), axis=-1)  # [B, E]
        return self.tower(mix_experts(weights, z["experts"]))


class DSelectKHead(nnx.Module):
    """Task k's DSelect-k gate and tower (:class:`experiments.models.dselect_k.DSelectKHead`)."""

    def __init__(
        self,
        in_features: int,
        expert_dim: int,
        linen: linen_dselect_k.DSelectKHead,
        *,
        rngs: nnx.Rngs,
    ):
        self.num_experts, self.num_nonzeros = linen.num_experts, linen.num_nonzeros
        self.gamma, self.entropy_reg = float(linen.gamma), float(linen.entropy_reg)
        self.num_bits = binary_codes(linen.num_experts).shape[1]
        zi = _uniform(self.gamma / 100.0)
        self.z_logits = nnx.Linear(
            in_features,
            self.num_nonzeros * self.num_bits,
            kernel_init=zi,
            bias_init=zi,
            rngs=rngs,
        )
        self.w_logits = nnx.Linear(
            in_features,
            self.num_nonzeros,
            kernel_init=_uniform(0.05),
            bias_init=_uniform(0.05),
            rngs=rngs,
        )
        self.tower = ClassifierHead(expert_dim, linen.num_classes, linen.tower_hidden, rngs=rngs)

    def _z(self, x: jax.Array) -> jax.Array:  # the selectors' logits [B, k, m]
        return self.z_logits(x).reshape((x.shape[0], self.num_nonzeros, self.num_bits))

    def selector_outputs(self, z: dict[str, jax.Array]) -> jax.Array:
        """The k selectors ``r [B, k, E]``."""
        return selector_outputs(self._z(z["x"]), binary_codes(self.num_experts), self.gamma)

    def expert_weights(self, z: dict[str, jax.Array]) -> jax.Array:
        """The gate ``q [B, E]``."""
        x = z["x"]
        return expert_weights(
            self._z(x), self.w_logits(x), binary_codes(self.num_experts), self.gamma
        )

    def aux_loss(self, z: dict[str, jax.Array]) -> jax.Array:
        """``entropy_reg * selector_entropy(r)`` (0 when off): add it to this task's loss."""
        if self.entropy_reg == 0:
            return jnp.zeros((), jnp.float32)
        return self.entropy_reg * selector_entropy(self.selector_outputs(z))

    def __call__(self, z: dict[str, jax.Array]) -> jax.Array:
        return self.tower(mix_experts(self.expert_weights(z), z["experts"]))


# --------------------------------------------------------------------------- CGC, PLE


class PLEEncoder(nnx.Module):
    """:class:`experiments.models.ple.PLEEncoder` (the same parameter names)."""

    def __init__(self, in_features: int, linen: linen_ple.PLEEncoder, *, rngs: nnx.Rngs):
        self.num_tasks, self.num_levels = linen.num_tasks, linen.num_levels
        ms, mt = linen.num_shared_experts, linen.num_task_experts
        sizes, d = tuple(linen.expert_sizes), linen.expert_sizes[-1]
        last = self.num_levels - 1
        for level in range(last):
            d_in = in_features if level == 0 else d
            setattr(self, f"level{level}_shared_experts", ExpertBank(ms, d_in, sizes, rngs=rngs))
            for k in range(self.num_tasks):
                bank = ExpertBank(mt, d_in, sizes, rngs=rngs)
                setattr(self, f"level{level}_task{k}_experts", bank)
            gate = _gate(d_in, ms + self.num_tasks * mt, rngs)
            setattr(self, f"level{level}_shared_gate", gate)
            if level < last - 1:
                for k in range(self.num_tasks):
                    setattr(self, f"level{level}_task{k}_gate", _gate(d_in, ms + mt, rngs))
        d_last = in_features if last == 0 else d
        setattr(self, f"level{last}_shared_experts", ExpertBank(ms, d_last, sizes, rngs=rngs))

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        flat = flatten(x)
        last = self.num_levels - 1
        if self.num_levels == 1:  # CGC
            return {"x": flat, "shared_experts": self.level0_shared_experts(flat)}
        task_in = [flat] * self.num_tasks  # g^{k,j-1}: [B, D']
        shared_in = flat  # g^{s,j-1}
        for level in range(last):
            shared = getattr(self, f"level{level}_shared_experts")(shared_in)
            tasks = [
                getattr(self, f"level{level}_task{k}_experts")(task_in[k])
                for k in range(self.num_tasks)
            ]
            gate = getattr(self, f"level{level}_shared_gate")
            next_shared = _gated(gate(shared_in), [shared, *tasks])
            if level < last - 1:
                task_in = [
                    _gated(
                        getattr(self, f"level{level}_task{k}_gate")(task_in[k]),
                        [shared, tasks[k]],
                    )
                    for k in range(self.num_tasks)
                ]
            shared_in = next_shared
        return {
            "gate_in": jnp.stack(task_in, axis=1),  # [B, K, D']
            "task_experts": jnp.stack(tasks, axis=1),  # [B, K, m_t, D]
            "prev_shared_experts": shared,  # [B, m_s, D]
            "shared_experts": getattr(self, f"level{last}_shared_experts")(shared_in),
        }


class PLEHead(nnx.Module):
    """:class:`experiments.models.ple.PLEHead`: ``gate_prev`` (PLE), ``experts``, ``gate``,
    ``tower``."""

    def __init__(self, in_features: int, linen: linen_ple.PLEHead, *, rngs: nnx.Rngs):
        # in_features: the flattened input's size D_in (what CGC's and level 1's gates read)
        self.task_index, self.num_levels = linen.task_index, linen.num_levels
        ms, mt = linen.num_shared_experts, linen.num_task_experts
        sizes, d = tuple(linen.expert_sizes), linen.expert_sizes[-1]
        if self.num_levels == 1:
            g_dim = in_features
        else:
            self.gate_prev = _gate(in_features if self.num_levels == 2 else d, ms + mt, rngs)
            g_dim = d
        self.experts = ExpertBank(mt, g_dim, sizes, rngs=rngs)
        self.gate = _gate(g_dim, ms + mt, rngs)
        self.tower = ClassifierHead(d, linen.num_classes, linen.tower_hidden, rngs=rngs)

    def __call__(self, z: dict[str, jax.Array]) -> jax.Array:
        if self.num_levels == 1:
            g = z["x"]
        else:
            k = self.task_index
            logits = self.gate_prev(z["gate_in"][:, k])
            g = _gated(logits, [z["prev_shared_experts"], z["task_experts"][:, k]])
        own = self.experts(g)
        return self.tower(_gated(self.gate(g), [z["shared_experts"], own]))


# --------------------------------------------------------------------------- Cross-stitch


class CrossStitchEncoder(nnx.Module):
    """:class:`experiments.models.cross_stitch.CrossStitchEncoder`: ``x -> z [B, K, D]``."""

    def __init__(
        self, in_channels: int, linen: linen_cross_stitch.CrossStitchEncoder, *, rngs: nnx.Rngs
    ):
        self.num_columns, self.num_stages = linen.num_columns, len(linen.channels)
        k = self.num_columns
        c_in = in_channels
        for i, c in enumerate(linen.channels):
            for j in range(k):
                setattr(self, f"column{j}_block{i}", ConvBlock(c_in, c, rngs=rngs))
            alpha = linen_cross_stitch.stitch_init(k, linen.stitch_self)(None, (k, k))
            setattr(self, f"stitch{i}", nnx.Param(alpha))
            c_in = c

    def __call__(self, x: jax.Array) -> jax.Array:
        columns = [x] * self.num_columns
        for i in range(self.num_stages):
            outs = [
                getattr(self, f"column{j}_block{i}")(columns[j]) for j in range(self.num_columns)
            ]
            alpha = getattr(self, f"stitch{i}")[...]
            columns = list(linen_cross_stitch.cross_stitch(alpha, jnp.stack(outs)))
        return jnp.stack([col.mean(axis=(1, 2)) for col in columns], axis=1)  # [B, K, D]


class ColumnHead(nnx.Module):
    """Task k's head on column k: ``z [B, K, D] -> z[:, k] -> logits``."""

    def __init__(self, in_features: int, linen: linen_cross_stitch.ColumnHead, *, rngs: nnx.Rngs):
        self.task_index = linen.task_index
        self.classifier = ClassifierHead(in_features, linen.num_classes, linen.hidden, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.classifier(z[:, self.task_index])


# --------------------------------------------------------------------------- MTAN


class MTANBackbone(nnx.Module):
    """:class:`experiments.models.mtan.MTANBackbone`: ``x -> ((mid_i, out_i) per stage)``."""

    def __init__(self, in_channels: int, channels: Sequence[int], *, rngs: nnx.Rngs):
        self.num_stages = len(channels)
        c_in = in_channels
        for i, c in enumerate(channels):
            setattr(self, f"stage{i}_mid", ConvBNReLU(c_in, c, rngs=rngs))
            setattr(self, f"stage{i}_out", ConvBNReLU(c, c, rngs=rngs))
            c_in = c

    def __call__(self, x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
        features = []
        for i in range(self.num_stages):
            if i > 0:
                x = _max_pool2(x)
            mid = getattr(self, f"stage{i}_mid")(x)
            x = getattr(self, f"stage{i}_out")(mid)
            features.append((mid, x))
        return tuple(features)


class AttentionMask(nnx.Module):
    """:class:`experiments.models.mtan.AttentionMask`: conv1x1 -> BN -> ReLU -> conv1x1 -> BN ->
    sigmoid (Flax's default conv init, as the Linen module)."""

    def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_features, features, (1, 1), padding="VALID", rngs=rngs)
        self.bn1 = _batch_norm(features, rngs)
        self.conv2 = nnx.Conv(features, features, (1, 1), padding="VALID", rngs=rngs)
        self.bn2 = _batch_norm(features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.sigmoid(self.bn2(self.conv2(x)))


class MTANHead(nnx.Module):
    """Task k's attention modules ``attention{i}``, ``block_att{i}`` and ``tower``."""

    def __init__(self, channels: Sequence[int], linen: linen_mtan.MTANHead, *, rngs: nnx.Rngs):
        self.num_stages = len(channels)
        for i, c in enumerate(channels):
            att_in = c if i == 0 else 2 * c  # [mid_i ; a_{i-1}]
            setattr(self, f"attention{i}", AttentionMask(att_in, c, rngs=rngs))
            if i + 1 < len(channels):
                setattr(self, f"block_att{i}", ConvBNReLU(c, channels[i + 1], rngs=rngs))
        self.tower = ClassifierHead(channels[-1], linen.num_classes, linen.hidden, rngs=rngs)

    def __call__(self, z: tuple[tuple[jax.Array, jax.Array], ...]) -> jax.Array:
        att = None
        for i, (mid, out) in enumerate(z):
            inputs = mid if att is None else jnp.concatenate([mid, att], axis=-1)
            att = getattr(self, f"attention{i}")(inputs) * out
            if i + 1 < self.num_stages:
                att = _max_pool2(getattr(self, f"block_att{i}")(att))
        return self.tower(att.mean(axis=(1, 2)))


# --------------------------------------------------------------------------- LTB


class StepCounter(nnx.Module):
    """The training-step count (:class:`experiments.models.ltb.StepCounter`): a call returns it
    and, in training mode (``deterministic=False``), advances it."""

    def __init__(self):
        self.step = BranchStep(jnp.zeros((), jnp.float32))
        self.deterministic = False

    def __call__(self) -> jax.Array:
        step = self.step[...]
        if not self.deterministic:
            self.step[...] = step + 1.0
        return step


class BranchingLayer(nnx.Module):
    """:class:`experiments.models.ltb.BranchingLayer`: C children pick one of K parents,
    ``[K, B, H, W, C_in] -> [C, B, H', W', features]``."""

    def __init__(
        self,
        num_children: int,
        num_parents: int,
        in_features: int,
        features: int,
        schedule: BranchSchedule,
        salt: int,
        *,
        rngs: nnx.Rngs,
    ):
        self.alpha = nnx.Param(jnp.ones((num_children, num_parents), jnp.float32))
        self.num_children, self.schedule, self.salt = num_children, schedule, salt
        for c in range(num_children):
            setattr(self, f"node{c}", ConvBlock(in_features, features, rngs=rngs))
        self.deterministic = False

    def __call__(self, parents: jax.Array, step: jax.Array) -> jax.Array:
        train = not self.deterministic
        key = None
        if train and self.schedule.gumbel_noise:  # the Linen module's key without a rng stream
            key = jax.random.PRNGKey(self.schedule.seed)
            key = jax.random.fold_in(jax.random.fold_in(key, step.astype(jnp.uint32)), self.salt)
        weights = branch_weights(self.alpha[...], step, key, self.schedule, train)  # [C, K]
        inputs = jnp.tensordot(weights, parents, axes=1)  # [C, B, H, W, C_in]
        return jnp.stack([getattr(self, f"node{c}")(inputs[c]) for c in range(self.num_children)])


class LTBEncoder(nnx.Module):
    """:class:`experiments.models.ltb.LTBEncoder`: ``x -> z [B, K, H', W', C]``."""

    def __init__(self, in_channels: int, linen: linen_ltb.LTBEncoder, *, rngs: nnx.Rngs):
        k, channels = linen.num_tasks, tuple(linen.channels)
        self.num_tasks, self.num_layers = k, len(channels)
        self.counter = StepCounter()
        for j in range(k):
            setattr(self, f"stem_node{j}", ConvBlock(in_channels, channels[0], rngs=rngs))
        for layer in range(1, len(channels)):
            branching = BranchingLayer(
                k, k, channels[layer - 1], channels[layer], linen.schedule, layer, rngs=rngs
            )
            setattr(self, f"layer{layer}", branching)

    def __call__(self, x: jax.Array) -> jax.Array:
        step = self.counter()
        nodes = jnp.stack([getattr(self, f"stem_node{j}")(x) for j in range(self.num_tasks)])
        for layer in range(1, self.num_layers):
            nodes = getattr(self, f"layer{layer}")(nodes, step)
        return jnp.moveaxis(nodes, 0, 1)


class LTBHead(nnx.Module):
    """Task k's last-layer node (:class:`experiments.models.ltb.LTBHead`)."""

    def __init__(
        self, num_tasks: int, in_features: int, linen: linen_ltb.LTBHead, *, rngs: nnx.Rngs
    ):
        self.counter = StepCounter()
        salt = 1_000 + linen.task_index  # as the Linen head
        self.branch = BranchingLayer(
            1, num_tasks, in_features, linen.features, linen.schedule, salt, rngs=rngs
        )
        self.classifier = ClassifierHead(linen.features, linen.num_classes, linen.hidden, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        step = self.counter()
        node = self.branch(jnp.moveaxis(z, 1, 0), step)[0]
        return self.classifier(node.mean(axis=(1, 2)))


# --------------------------------------------------------------------------- building


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C) or (B, H, W, C); got {input_shape}.")
    return shape


def from_linen(
    linen_model: MultiTaskModel, input_shape: Sequence[int], rngs: nnx.Rngs
) -> NNXMultiTask:
    """The NNX twin of a Linen ``mmoe``/``cgc``/``ple``/``dselect_k``/``cross_stitch``/``mtan``/
    ``ltb`` model, with the Linen model's hyper-parameters and fresh weights from ``rngs``.

    Args:
      linen_model: built by :func:`experiments.models.make_model` (or a module's ``build``).
      input_shape: one example's shape ``(H, W, C)`` (a batch shape is accepted too).
      rngs: the NNX rng streams the weights are drawn from.

    Raises:
      ValueError: for another architecture (the error lists :data:`NNX_MODELS`) or a bad shape.
    """
    h, w, c = _check_shape(input_shape)
    enc, heads = linen_model.encoder, list(linen_model.heads.values())
    names = list(linen_model.heads)
    d_in = h * w * c
    if isinstance(enc, linen_mmoe.MMoEEncoder):
        encoder = MMoEEncoder(d_in, enc.num_experts, tuple(enc.expert_sizes), rngs=rngs)
        d = enc.expert_sizes[-1]
        if all(isinstance(hd, linen_dselect_k.DSelectKHead) for hd in heads):
            nnx_heads = [DSelectKHead(d_in, d, hd, rngs=rngs) for hd in heads]
        elif all(isinstance(hd, linen_mmoe.MMoEHead) for hd in heads):
            nnx_heads = [
                MMoEHead(d_in, d, hd.num_experts, hd.num_classes, hd.tower_hidden, rngs=rngs)
                for hd in heads
            ]
        else:
            raise ValueError(f"from_linen: unknown heads {[type(hd).__name__ for hd in heads]}.")
    elif isinstance(enc, linen_ple.PLEEncoder):
        encoder = PLEEncoder(d_in, enc, rngs=rngs)
        nnx_heads = [PLEHead(d_in, hd, rngs=rngs) for hd in heads]
    elif isinstance(enc, linen_cross_stitch.CrossStitchEncoder):
        encoder = CrossStitchEncoder(c, enc, rngs=rngs)
        nnx_heads = [ColumnHead(enc.channels[-1], hd, rngs=rngs) for hd in heads]
    elif isinstance(enc, linen_mtan.MTANBackbone):
        encoder = MTANBackbone(c, tuple(enc.channels), rngs=rngs)
        nnx_heads = [MTANHead(tuple(enc.channels), hd, rngs=rngs) for hd in heads]
    elif isinstance(enc, linen_ltb.LTBEncoder):
        encoder = LTBEncoder(c, enc, rngs=rngs)
        nnx_heads = [LTBHead(enc.num_tasks, enc.channels[-1], hd, rngs=rngs) for hd in heads]
    else:
        raise ValueError(
            f"from_linen: no NNX version of a {type(enc).__name__} encoder; NNX models: "
            f"{list(NNX_MODELS)}."
        )
    return NNXMultiTask(encoder, nnx_heads, names, (h, w, c))


def make_nnx_model(
    config: ml_collections.ConfigDict,
    tasks: Sequence[TaskSpec],
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
) -> NNXMultiTask:
    """The NNX model of a suite model config (``default_model_config(name)`` with ``name`` in
    :data:`NNX_MODELS`): ``from_linen(make_model(config, tasks, input_shape), ...)``."""
    name = config.get("name")
    if name not in NNX_MODELS:
        raise ValueError(f"make_nnx_model: no NNX version of {name!r}; NNX models: {NNX_MODELS}.")
    return from_linen(make_model(config, tasks, input_shape), input_shape, rngs)


def _merged_collections(collections: Mapping[str, PyTree], where: str) -> dict:
    """``{"params": tree, "batch_stats": tree, ...}`` -> one tree (the NNX state's layout)."""
    flat: dict[tuple, Any] = {}
    for name, tree in collections.items():
        for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
            if path in flat:
                raise ValueError(f"{where}: {'/'.join(path)} is in two collections ({name}).")
            flat[path] = leaf
    return traverse_util.unflatten_dict(flat)


def linen_variables_as_pure_dict(
    variables: Mapping[str, PyTree], task_names: Sequence[str]
) -> dict:
    """A Linen model's variables (``{"encoder": {collection: tree}, "heads": {name: {...}}}``)
    as an NNX pure dict: collections merged, heads keyed by their index in ``task_names``."""
    missing = [n for n in task_names if n not in variables["heads"]]
    if missing:
        raise ValueError(
            f"linen variables: no heads {missing}; they have {list(variables['heads'])}."
        )
    return {
        "encoder": _merged_collections(variables["encoder"], "encoder"),
        "heads": {
            k: _merged_collections(variables["heads"][n], f"heads/{n}")
            for k, n in enumerate(task_names)
        },
    }


def load_linen_variables(model: NNXMultiTask, variables: Mapping[str, PyTree]) -> None:
    """Copies a Linen twin's variables (``linen_model.init(...)`` or a checkpoint) into ``model``.

    Raises:
      ValueError: when the trees differ (a missing or extra leaf, or another shape), naming the
        paths: the Linen model was built with other hyper-parameters.
    """
    pure = linen_variables_as_pure_dict(variables, model.task_names)
    state = nnx.state(model)
    want = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    got = traverse_util.flatten_dict(pure)

    def name(path: tuple) -> str:
        return "/".join(str(p) for p in path)

    problems = [f"missing {name(p)}" for p in want if p not in got]
    problems += [f"unexpected {name(p)}" for p in got if p not in want]
    problems += [
        f"{name(p)}: shape {tuple(jnp.shape(got[p]))} != {tuple(jnp.shape(want[p]))}"
        for p in want
        if p in got and jnp.shape(got[p]) != jnp.shape(want[p])
    ]
    if problems:
        raise ValueError(
            "load_linen_variables: the Linen variables do not fit this NNX model (build both "
            f"from the same config): {'; '.join(problems[:8])}"
            + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        )
    nnx.replace_by_pure_dict(
        state,
        traverse_util.unflatten_dict({p: jnp.asarray(v, want[p].dtype) for p, v in got.items()}),
    )
    nnx.update(model, state)
