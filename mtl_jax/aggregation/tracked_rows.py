"""The skeleton of the aggregators whose state tracks the Jacobian's rows (ExcessMTL, DB-MTL,
MoCo): one optax transform around a method's pure step, and the helpers their steps share.

Such a method keeps, per Jacobian leaf, a ``[K, *param.shape]`` array (squared gradients, an EMA,
a tracked Jacobian), so it needs ``num_tasks`` at ``init``. :func:`tracked_rows_transform` checks
the input, runs ``step``, keeps the old state and returns an all-NaN update when the input is not
finite, combines the rows the step names with its weights, and logs the weights and the current
Jacobian's Gram matrix in an :class:`~mtl_jax.aggregation.gramspace.AggregatorState` (so
:func:`mtl_jax.aggregation.weights` works).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree
from mtl_jax.gramian import GLOBAL, combine, group_gramians
from mtl_jax.weighting.base import require_num_tasks

from ._checks import float_dtype, leaves_finite, map_unmasked, validate_jacobian
from .gramspace import AggregatorState, cast_like, empty_logs

__all__ = [
    "check_state_leaves",
    "decayed_rate",
    "require_task_losses",
    "scale_rows",
    "tracked_rows_transform",
    "zero_rows",
]

PyTree = Any
#: ``step(leaves, losses, gram, inner) -> (weights [K], rows, new_inner)``: the update is
#: ``sum_k weights[k] rows[k]`` leaf by leaf (``rows``: one ``[K, ...]`` array per leaf);
#: ``gram`` is the current Jacobian's ``[K, K]``; ``losses`` is ``None`` for a method that does
#: not read them.
Step = Callable[
    [Sequence[jax.Array], Any, jax.Array, Any], tuple[jax.Array, Sequence[jax.Array], Any]
]


def zero_rows(params: PyTree, num_tasks: int) -> list[jax.Array]:
    """``[K, *leaf.shape]`` zeros for every (non-masked) leaf of ``params``."""
    dtype = float_dtype()
    return [
        jnp.zeros((num_tasks, *jnp.shape(leaf)), dtype)
        for _, leaf in _tree.leaves_with_paths(params)
    ]


def scale_rows(leaf: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    """``scale[k] * leaf[k]`` for a ``[K, ...]`` leaf, in ``dtype``."""
    return leaf.astype(dtype) * jnp.reshape(scale, (-1,) + (1,) * (leaf.ndim - 1))


def decayed_rate(rate: float, sigma: float, step: jax.Array, dtype: Any) -> jax.Array:
    """LibMTL's decayed step size ``rate / t^sigma`` at step ``t`` (from 1)."""
    return rate / step.astype(dtype) ** sigma


def require_task_losses(task_losses: Any, name: str) -> jax.Array:
    """``task_losses`` as an array, or a clear error when the update was not given them."""
    if task_losses is None:
        raise ValueError(
            f"{name} reads the task losses: pass task_losses=losses to the aggregator's update "
            "(mtl.value_and_grads returns them)."
        )
    return jnp.asarray(task_losses)


def check_state_leaves(leaves: Sequence[jax.Array], rows: Sequence[jax.Array], name: str) -> None:
    """The Jacobian and the state (made by ``init``) must have the same leaves."""
    if len(leaves) != len(rows) or any(
        jnp.shape(a) != jnp.shape(b) for a, b in zip(leaves, rows, strict=False)
    ):
        raise ValueError(
            f"{name}: the Jacobian's leaves {[jnp.shape(x) for x in leaves]} do not match the "
            f"state's rows {[jnp.shape(x) for x in rows]} (made by init); call init with "
            "parameters of the same structure and num_tasks=K."
        )


def tracked_rows_transform(
    name: str,
    why: str,
    num_tasks: int | None,
    init_inner: Callable[[PyTree, int], Any],
    state_rows: Callable[[Any], Sequence[jax.Array]],
    step: Step,
    *,
    reads_losses: bool,
) -> optax.GradientTransformationExtraArgs:
    """The optax transform of a row-tracking method (module docstring).

    Args:
      name: the method's name in error messages.
      why: what the state holds, for the error when ``num_tasks`` is missing.
      num_tasks: K.
      init_inner: ``(params, K) -> the method's state``.
      state_rows: the state's per-leaf ``[K, ...]`` arrays (checked against the Jacobian).
      step: the method's step (:data:`Step`).
      reads_losses: whether ``update`` requires ``task_losses``.
    """

    def init(params: PyTree) -> AggregatorState:
        k = require_num_tasks(num_tasks, name, why)
        weights, gram = empty_logs([GLOBAL], k)
        return AggregatorState(jax.random.key(0), weights, gram, {GLOBAL: init_inner(params, k)})

    def update(jac, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        validate_jacobian(jac, params, task_losses, num_tasks, name)
        losses = require_task_losses(task_losses, name) if reads_losses else task_losses
        leaves = [leaf for _, leaf in _tree.leaves_with_paths(jac)]
        inner = state.inner[GLOBAL]
        check_state_leaves(leaves, state_rows(inner), name)
        gram = group_gramians(jac, GLOBAL)
        weights, rows, new_inner = step(leaves, losses, gram[GLOBAL], inner)
        finite = leaves_finite(leaves, task_losses)
        weights = jnp.where(finite, weights, jnp.nan)  # an all-NaN update
        new_inner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_inner, inner)
        flat_out = [
            combine(weights, r).astype(leaf.dtype) for leaf, r in zip(leaves, rows, strict=True)
        ]
        new_state = AggregatorState(
            state.key,
            cast_like({GLOBAL: weights}, state.weights),
            cast_like(gram, state.gram),
            {GLOBAL: new_inner},
        )
        return map_unmasked(jac, lambda i, leaf: flat_out[i]), new_state

    return optax.GradientTransformationExtraArgs(init, update)
