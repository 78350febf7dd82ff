"""The model interface of the experiment suite: a shared encoder and one head per task.

A :class:`MultiTaskModel` holds two kinds of Flax Linen modules:

* ``encoder``: ``__call__(x: [B, H, W, C], train: bool) -> z`` (``[B, D]`` for the classifiers,
  ``[B, H, W, F]`` for the dense model);
* ``heads[name]``: ``__call__(z, train: bool) -> prediction`` for task ``name``, in task order.

This is the shape of a :class:`mtl_jax.TrunkAndHeads`: the encoder gets Jacobian rows, each
head its own gradient. Variables are nested as::

    {"encoder": {"params": ..., "batch_stats": ...},      # "batch_stats" only with BatchNorm
     "heads": {name: {"params": ...}, ...}}

:meth:`MultiTaskModel.split` separates the trainable ``params`` from the rest (the *state*: BatchNorm
running statistics), and :meth:`MultiTaskModel.encoder_fn` / :meth:`MultiTaskModel.head_fn` return
pure ``(params, input) -> (output, new_state)`` functions that plug into ``mtl.TrunkAndHeads``
with ``has_aux=True`` (the auxiliary output is the updated state; an empty dict without BatchNorm).

Prediction formats (what :func:`experiments.losses.task_loss` and :mod:`experiments.metrics` read):
classification logits ``[B, num_classes]``; segmentation logits ``[B, H, W, num_classes]``; depth
``[B, H, W, 1]``; normals ``[B, H, W, 3]``, L2-normalised per pixel (as MTAN's SegNet does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.tasks import TaskSpec

PyTree = Any

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "ClassifierHead",
    "DenseHead",
    "MultiTaskModel",
    "check_pools_fit",
    "torch_default_init",
]

# PyTorch's BatchNorm defaults (momentum 0.1 on the new statistic = Flax momentum 0.9; eps 1e-5).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def check_pools_fit(model: str, input_shape: Sequence[int], pools: int) -> None:
    """Raises ``ValueError`` when an ``(H, W, ...)`` input is too small for ``pools`` 2x2
    max-pools (a side would shrink to 0)."""
    h, w = input_shape[0], input_shape[1]
    if min(h, w) < 2**pools:
        raise ValueError(
            f"{model}: input {h}x{w} is too small for {pools} 2x2 max-pools; need at least "
            f"{2**pools} pixels per side (use fewer channels entries)."
        )


def torch_default_init() -> jax.nn.initializers.Initializer:
    """PyTorch's default ``nn.Linear`` / ``nn.Conv2d`` weight init: ``kaiming_uniform_(a=sqrt(5))``.

    That is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` = ``variance_scaling(1/3, "fan_in", "uniform")``
    (Flax kernels are ``[..., in, out]``, so Flax's fan_in is PyTorch's). PyTorch also draws biases
    from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``; we keep Flax's zero biases (documented departure).
    """
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class ClassifierHead(nn.Module):
    """A task head on a vector representation: ``z [B, D] -> logits [B, num_classes]``.

    ``hidden > 0`` adds ``Dense(hidden) -> ReLU`` before the output layer (Sener & Koltun's
    MultiLeNet head: 50 -> 50 -> ReLU -> 10); ``hidden == 0`` is a linear head (Recon's ResNet-18
    head: Linear 100 -> 10).
    """

    num_classes: int
    hidden: int = 0

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm or dropout in the head
        if self.hidden > 0:
            z = nn.relu(nn.Dense(self.hidden, kernel_init=torch_default_init(), name="fc1")(z))
        return nn.Dense(self.num_classes, kernel_init=torch_default_init(), name="pred")(z)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / ||x||`` along ``axis``, finite for a zero vector (MTAN divides without an eps)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class DenseHead(nn.Module):
    """A per-pixel task head, MTAN's SegNet ``pred_task``: ``Conv3x3(features) -> Conv1x1(out)``.

    ``z: [B, H, W, F] -> [B, H, W, out]``. As in MTAN (``model_segnet_split.py``) there is no
    nonlinearity between the two convolutions, weights are Xavier-normal and biases zero. Normals
    (``normalize=True``) are L2-normalised per pixel.
    """

    out_channels: int
    features: int
    normalize: bool = False

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        del train
        init = nn.initializers.xavier_normal()
        conv = nn.Conv(
            self.features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init, name="conv"
        )
        pred = nn.Conv(self.out_channels, (1, 1), padding="VALID", kernel_init=init, name="pred")
        x = pred(conv(z))
        return l2_normalize(x) if self.normalize else x


def _apply(
    module: nn.Module, variables: Mapping[str, PyTree], inputs: Any, train: bool
) -> tuple[Any, dict[str, PyTree]]:
    """Runs ``module`` and returns ``(output, new_state)``; the state is every non-param collection.

    With ``train=True`` the state collections are mutable (BatchNorm updates its running
    averages); with ``train=False`` they are read only and returned unchanged.
    """
    state = {k: v for k, v in variables.items() if k != "params"}
    if train and state:
        out, new_state = module.apply(variables, inputs, train=True, mutable=list(state))
        return out, dict(new_state)
    return module.apply(variables, inputs, train=train), state


@dataclasses.dataclass(frozen=True, eq=False)
class MultiTaskModel:
    """A shared encoder and one head per task (see the module docstring for the formats).

    Equality and hashing are by identity, so a model can be a static argument of ``jax.jit``.
    The task order is the order of ``heads`` and ``tasks``; variable dicts that went through a JAX
    transformation come back with sorted keys, so iterate over ``model.heads`` (or
    ``model.tasks``), not over the variables, when the order matters.

    Attributes:
      encoder: ``__call__(x: [B, H, W, C], train) -> z``.
      heads: ``{task name: module}`` in task order; ``__call__(z, train) -> prediction``.
      tasks: the :class:`TaskSpec` of every head, in the same order.
    """

    encoder: nn.Module
    heads: dict[str, nn.Module]
    tasks: tuple[TaskSpec, ...] = ()

    def init(self, key: jax.Array, input_shape: Sequence[int]) -> dict[str, PyTree]:
        """Initial variables ``{"encoder": {...}, "heads": {name: {...}}}``.

        Args:
          key: PRNG key; the encoder and every head get their own sub-key.
          input_shape: one example's shape ``(H, W, C)``, or a batch shape ``(B, H, W, C)`` (the
            batch size is ignored).
        """
        shape = tuple(int(d) for d in input_shape)
        if len(shape) == 4:
            shape = shape[1:]
        if len(shape) != 3:
            raise ValueError(f"input_shape must be (H, W, C) or (B, H, W, C); got {input_shape}.")
        x = jnp.zeros((1, *shape), jnp.float32)
        enc_key, *head_keys = jax.random.split(key, 1 + len(self.heads))
        encoder_vars = dict(self.encoder.init(enc_key, x, train=False))
        z = jax.eval_shape(lambda v: self.encoder.apply(v, x, train=False), encoder_vars)
        z = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), z)
        heads = {
            name: dict(head.init(k, z, train=False))
            for (name, head), k in zip(self.heads.items(), head_keys, strict=True)
        }
        return {"encoder": encoder_vars, "heads": heads}

    @staticmethod
    def split(variables: Mapping[str, PyTree]) -> tuple[dict[str, PyTree], dict[str, PyTree]]:
        """``variables -> (params, state)``.

        ``params = {"encoder": encoder params, "heads": {name: head params}}`` (what the optimizer
        and the aggregator see); ``state`` has the same nesting with the other collections
        (``{"encoder": {"batch_stats": ...}, "heads": {name: {}}}``).
        """

        def one(v: Mapping[str, PyTree]) -> tuple[PyTree, dict[str, PyTree]]:
            return v["params"], {k: c for k, c in v.items() if k != "params"}

        enc_params, enc_state = one(variables["encoder"])
        heads = {name: one(v) for name, v in variables["heads"].items()}
        params = {"encoder": enc_params, "heads": {n: p for n, (p, _) in heads.items()}}
        state = {"encoder": enc_state, "heads": {n: s for n, (_, s) in heads.items()}}
        return params, state

    @staticmethod
    def merge(params: Mapping[str, PyTree], state: Mapping[str, PyTree]) -> dict[str, PyTree]:
        """The inverse of :meth:`split`."""
        return {
            "encoder": {"params": params["encoder"], **state["encoder"]},
            "heads": {
                name: {"params": p, **state["heads"][name]} for name, p in params["heads"].items()
            },
        }

    def encoder_fn(
        self, encoder_state: Mapping[str, PyTree], train: bool
    ) -> Callable[[PyTree, jax.Array], tuple[PyTree, dict[str, PyTree]]]:
        """``(encoder_params, x) -> (z, new_encoder_state)`` for ``mtl.TrunkAndHeads`` (``has_aux=True``)."""
        return lambda params, x: _apply(self.encoder, {"params": params, **encoder_state}, x, train)

    def head_fn(
        self, name: str, head_state: Mapping[str, PyTree], train: bool
    ) -> Callable[[PyTree, PyTree], tuple[jax.Array, dict[str, PyTree]]]:
        """``(head_params, z) -> (prediction, new_head_state)`` for task ``name``."""
        if name not in self.heads:
            raise KeyError(f"No head named {name!r}; heads: {list(self.heads)}.")
        head = self.heads[name]
        return lambda params, z: _apply(head, {"params": params, **head_state}, z, train)

    def apply(
        self, variables: Mapping[str, PyTree], x: jax.Array, train: bool = False
    ) -> tuple[dict[str, jax.Array], dict[str, PyTree]]:
        """Full forward pass: ``-> ({task name: prediction}, new_variables)``.

        With ``train=False`` (evaluation) BatchNorm uses its running averages and the returned
        variables are the given ones.
        """
        params, state = self.split(variables)
        z, enc_state = self.encoder_fn(state["encoder"], train)(params["encoder"], x)
        preds, head_states = {}, {}
        for name in self.heads:
            preds[name], head_states[name] = self.head_fn(name, state["heads"][name], train)(
                params["heads"][name], z
            )
        return preds, self.merge(params, {"encoder": enc_state, "heads": head_states})
