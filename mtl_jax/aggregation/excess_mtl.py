"""ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024), an aggregator.

Weights from AdaGrad-estimated excess risks, updated by exponentiated steps of size
``robust_step_size`` after ``warmup_steps`` (the maths: :mod:`mtl_jax.weighting.excess_mtl`).
Not a Gram-space method: the state accumulates squared task gradients per coordinate (as large as
the Jacobian), so it needs ``num_tasks``. The state is an
:class:`~mtl_jax.aggregation.gramspace.AggregatorState` (the last weights and Gram matrix are logged);
non-finite input gives an all-NaN update and keeps the state. See ``docs/methods.md``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree
from mtl_jax.gramian import GLOBAL, combine, group_gramians
from mtl_jax.weighting.base import require_num_tasks
from mtl_jax.weighting.excess_mtl import ExcessMTLState, excess_mtl_step

from ._checks import float_dtype, leaves_finite, map_unmasked, validate_jacobian
from .gramspace import AggregatorState, cast_like, empty_logs

__all__ = ["excess_mtl"]

PyTree = Any
Transform = optax.GradientTransformationExtraArgs


def excess_mtl(
    robust_step_size: float = 1e-2, warmup_steps: int = 1, *, num_tasks: int | None = None
) -> Transform:
    """ExcessMTL (He et al. 2024): weights from AdaGrad-estimated excess risks, exponentiated steps.

    Not a Gram-space method: the state accumulates squared task gradients per coordinate (as
    large as the Jacobian), see :mod:`mtl_jax.weighting.excess_mtl`. Needs ``num_tasks``. The state
    is an :class:`AggregatorState` (:func:`mtl_jax.aggregation.weights` works).
    """
    if robust_step_size <= 0:
        raise ValueError(f"excess_mtl's robust_step_size must be > 0; got {robust_step_size}.")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"excess_mtl's warmup_steps must be an integer >= 0; got {warmup_steps}.")
    warmup = int(warmup_steps)

    def init(params: PyTree) -> AggregatorState:
        k = require_num_tasks(num_tasks, "excess_mtl", "squared task gradients per coordinate")
        dtype = float_dtype()
        leaves = [leaf for _, leaf in _tree.leaves_with_paths(params)]
        inner = ExcessMTLState(
            sq_sums=[jnp.zeros((k, *jnp.shape(leaf)), dtype) for leaf in leaves],
            weights=jnp.full((k,), 1.0 / k, dtype),
            baseline=jnp.zeros((k,), dtype),
            warmup_sum=jnp.zeros((k,), dtype),
            step=jnp.zeros((), jnp.int32),
        )
        weights, gram = empty_logs([GLOBAL], k)
        return AggregatorState(jax.random.key(0), weights, gram, {GLOBAL: inner})

    def update(jac, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        validate_jacobian(jac, params, task_losses, num_tasks, "excess_mtl")
        leaves = [leaf for _, leaf in _tree.leaves_with_paths(jac)]
        inner = state.inner[GLOBAL]
        if len(leaves) != len(inner.sq_sums):
            raise ValueError(
                f"excess_mtl: the Jacobian has {len(leaves)} leaves but the state (made by init) "
                f"has {len(inner.sq_sums)}; call init with parameters of the same structure."
            )
        w, new_inner = excess_mtl_step(leaves, inner, robust_step_size, warmup)
        finite = leaves_finite(leaves, task_losses)
        w = jnp.where(finite, w, jnp.nan)
        new_inner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_inner, inner)
        gram = group_gramians(jac, GLOBAL)
        updates = map_unmasked(jac, lambda i, leaf: combine(w, leaf))
        new_state = AggregatorState(
            state.key,
            cast_like({GLOBAL: w}, state.weights),
            cast_like(gram, state.gram),
            {GLOBAL: new_inner},
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)
