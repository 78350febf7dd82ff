"""GradDrop (Chen et al., "Just Pick a Sign", NeurIPS 2020, eqs. 1-3) on the parameter Jacobian.

Not a Gram-space method: per coordinate, the gradient values whose sign disagrees with a sign
sampled from the coordinate's sign purity ``P = (1 + sum_k g_k / sum_k |g_k|) / 2`` are dropped
(kept with the per-task leak ``l_k``). Departure from the paper: the paper applies it to the
gradient with respect to a layer's activations, summed over the batch; like TorchJD's ``GradDrop``
this applies it to the per-task parameter gradients (each leaf element is a coordinate). The state
is the PRNG key only (no logged weights). See ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree

from ._checks import float_dtype, map_unmasked, validate_jacobian

__all__ = ["GradDropState", "graddrop", "graddrop_leaf"]

PyTree = Any
Transform = optax.GradientTransformationExtraArgs


class GradDropState(NamedTuple):
    """State of :func:`graddrop`: the PRNG key."""

    key: jax.Array


def graddrop_leaf(leaf: jax.Array, key: jax.Array, leak: jax.Array) -> jax.Array:
    """GradDrop on one Jacobian leaf ``[K, ...]`` (Chen et al. 2020, eqs. 1-3).

    ``P = (1 + sum_k g_k / sum_k |g_k|) / 2`` is the positive-sign purity of every coordinate;
    with ``U ~ Uniform(0, 1)`` per coordinate, task k keeps its coordinate when
    ``(P > U and g_k > 0) or (P < U and g_k < 0)``; the output is
    ``sum_k (leak_k + (1 - leak_k) M_k) g_k``.
    """
    total = jnp.sum(leaf, axis=0)
    mass = jnp.sum(jnp.abs(leaf), axis=0)
    purity = 0.5 * (1.0 + jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1.0), 0.0))
    u = jax.random.uniform(key, purity.shape, dtype=purity.dtype)
    keep = ((purity > u) & (leaf > 0)) | ((purity < u) & (leaf < 0))
    leak = jnp.reshape(leak.astype(leaf.dtype), (-1,) + (1,) * (leaf.ndim - 1))
    return jnp.sum((leak + (1.0 - leak) * keep.astype(leaf.dtype)) * leaf, axis=0)


def graddrop(
    leak: float | Sequence[float] = 0.0, seed: int = 0, *, num_tasks: int | None = None
) -> Transform:
    """GradDrop (Chen et al., "Just Pick a Sign", NeurIPS 2020) on the parameter Jacobian.

    Not a Gram-space method: it drops, per coordinate, the gradient values whose sign disagrees
    with a sign sampled from the coordinate's sign purity (:func:`graddrop_leaf`); ``leak`` is the
    paper's per-task leak ``l_k`` (0: full dropping).

    Departure from the paper: the paper applies GradDrop to the gradient with respect to a layer's
    activations, summed over the batch; like TorchJD's ``GradDrop`` this applies it to the
    per-task parameter gradients (each leaf element is a coordinate).
    """
    leak_arr = jnp.atleast_1d(jnp.asarray(leak, dtype=float_dtype()))

    def init(params: PyTree) -> GradDropState:
        del params
        return GradDropState(jax.random.key(seed))

    def update(jac, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        k = validate_jacobian(jac, params, task_losses, num_tasks, "graddrop")
        if leak_arr.shape[0] not in (1, k):
            raise ValueError(f"graddrop leak has {leak_arr.shape[0]} entries for K={k} tasks.")
        leak_k = jnp.broadcast_to(leak_arr, (k,))
        key, sub = jax.random.split(state.key)
        n_leaves = len(_tree.leaves_with_paths(jac))
        keys = jax.random.split(sub, n_leaves)
        finite = jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(x)) for _, x in _tree.leaves_with_paths(jac)])
        )
        if task_losses is not None:
            finite &= jnp.all(jnp.isfinite(task_losses))

        def one(i: int, leaf: jax.Array) -> jax.Array:
            out = graddrop_leaf(leaf, keys[i], leak_k)
            return jnp.where(finite, out, jnp.nan)

        return map_unmasked(jac, one), GradDropState(key)

    return optax.GradientTransformationExtraArgs(init, update)
