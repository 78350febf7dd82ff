"""``mmoe``: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018), LibMTL's ``MMoE``.

E shared experts ``f_e`` read the flattened input ``x``; task k has a softmax gate over the experts,
read from the same input, and a tower ``h_k`` (paper, Eqs. 5-6)::

    g_k(x) = softmax(W_k x + b_k)                      # [E], the gate of task k
    y_k    = h_k( sum_e g_k(x)_e f_e(x) )

In the suite's ``encoder -> z -> heads`` interface the encoder holds the experts and returns
``z = {"x": flattened input [B, D_in], "experts": [B, E, D]}``; head k holds gate k (which mixes
``z["experts"]`` with weights read from ``z["x"]``) and tower k. So the experts are the shared
leaves (K Jacobian rows) and each gate is a task-specific leaf (its own task's gradient only), with
no machinery beyond :class:`~experiments.models.base.MultiTaskModel`.

Departures from LibMTL (``LibMTL/architecture/MMoE.py``): LibMTL's experts are copies of the
user's encoder network (e.g. a ResNet); here each expert is an MLP on the flattened input
(``Dense -> ReLU`` per entry of ``expert_sizes``), all E of them evaluated as one batched einsum.
The gate reads the flattened input, as in LibMTL and the paper. Weights use PyTorch's default
init (per expert for the expert kernels), biases zero (as :func:`torch_default_init` says).

:class:`ExpertBank`, :func:`softmax_gate` and :func:`mix_experts` are the building blocks of
``cgc``/``ple`` (:mod:`experiments.models.ple`) and ``dselect_k``
(:mod:`experiments.models.dselect_k`) too.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.base import ClassifierHead, MultiTaskModel, torch_default_init
from experiments.tasks import TaskSpec

DEFAULTS = {
    "num_experts": 4,  # E shared experts
    "expert_sizes": (64,),  # every expert: Dense -> ReLU per width, on the flattened input
    "tower_hidden": 32,  # per-task tower hidden width; 0 = linear tower
}
TASK_KINDS = ("classification",)

__all__ = [
    "DEFAULTS",
    "TASK_KINDS",
    "ExpertBank",
    "MMoEEncoder",
    "MMoEHead",
    "build",
    "check_expert_config",
    "flatten",
    "mix_experts",
    "softmax_gate",
]


def _expert_kernel_init() -> jax.nn.initializers.Initializer:
    """PyTorch's ``nn.Linear`` default for each expert's ``[in, out]`` slice of ``[E, in, out]``."""
    return nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )


class ExpertBank(nn.Module):
    """E independent MLP experts on one input: ``x [B, D_in] -> [B, E, sizes[-1]]``.

    Layer i of every expert is ``ReLU(x W_e + b_e)``; the E experts' weights are stacked as
    ``kernel{i}: [E, d_in, d_out]`` and ``bias{i}: [E, d_out]`` and run as one einsum.
    """

    num_experts: int
    sizes: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 2:
            raise ValueError(f"ExpertBank takes [B, D] inputs; got shape {x.shape}.")
        h = None  # [B, E, d]
        d_in = x.shape[-1]
        for i, d_out in enumerate(self.sizes):
            kernel = self.param(
                f"kernel{i}", _expert_kernel_init(), (self.num_experts, d_in, d_out), jnp.float32
            )
            bias = self.param(
                f"bias{i}", nn.initializers.zeros, (self.num_experts, d_out), jnp.float32
            )
            if h is None:  # every expert reads the same input
                h = jnp.einsum("bi,eio->beo", x, kernel)
            else:
                h = jnp.einsum("bei,eio->beo", h, kernel)
            h = nn.relu(h + bias)
            d_in = d_out
        return h


def softmax_gate(num_experts: int, name: str) -> nn.Dense:
    """A gate's logits layer ``Dense(num_experts)``; apply :func:`jax.nn.softmax` to its output."""
    return nn.Dense(num_experts, kernel_init=torch_default_init(), name=name)


def mix_experts(weights: jax.Array, experts: jax.Array) -> jax.Array:
    """``sum_e weights[b, e] * experts[b, e, :]``: ``weights [B, E]``, ``experts [B, E, D] -> [B, D]``."""
    return jnp.einsum("be,bed->bd", weights, experts)


def flatten(x: jax.Array) -> jax.Array:
    """``[B, ...] -> [B, prod(...)]``."""
    return x.reshape((x.shape[0], -1))


class MMoEEncoder(nn.Module):
    """The shared experts: ``x [B, H, W, C] -> {"x": [B, H*W*C], "experts": [B, E, D]}``."""

    num_experts: int
    expert_sizes: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        del train  # no BatchNorm or dropout
        flat = flatten(x)
        return {
            "x": flat,
            "experts": ExpertBank(self.num_experts, self.expert_sizes, name="experts")(flat),
        }


class MMoEHead(nn.Module):
    """Task k's gate and tower: ``z -> logits [B, num_classes]``.

    ``g = softmax(gate(z["x"]))  [B, E]``, ``y = tower(sum_e g_e z["experts"][:, e])``.
    """

    num_classes: int
    num_experts: int
    tower_hidden: int = 0

    @nn.compact
    def __call__(self, z: dict[str, jax.Array], train: bool = False) -> jax.Array:
        del train
        weights = jax.nn.softmax(softmax_gate(self.num_experts, "gate")(z["x"]), axis=-1)
        mixed = mix_experts(weights, z["experts"])
        return ClassifierHead(self.num_classes, self.tower_hidden, name="tower")(mixed)


def check_expert_config(model: str, expert_sizes: Sequence[int], tower_hidden: int, **counts):
    """Clear errors for the hyper-parameters every expert model shares; returns ``expert_sizes``.

    ``counts``: name -> value of every expert count (each must be >= 1).
    """
    sizes = tuple(int(h) for h in expert_sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(
            f"{model}: expert_sizes must be a non-empty tuple of positive ints; got {sizes}."
        )
    for name, value in counts.items():
        if int(value) < 1:
            raise ValueError(f"{model}: {name} must be >= 1; got {value}.")
    if int(tower_hidden) < 0:
        raise ValueError(f"{model}: tower_hidden must be >= 0 (0 = linear); got {tower_hidden}.")
    return sizes


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    del input_shape  # any image shape: the experts and gates read the flattened input
    sizes = check_expert_config(
        "mmoe", config.expert_sizes, config.tower_hidden, num_experts=config.num_experts
    )
    num_experts = int(config.num_experts)
    heads = {t.name: MMoEHead(t.num_classes, num_experts, int(config.tower_hidden)) for t in tasks}
    return MultiTaskModel(MMoEEncoder(num_experts, sizes), heads, tuple(tasks))
