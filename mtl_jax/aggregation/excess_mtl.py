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

import jax.numpy as jnp
import optax

from mtl_jax.weighting.excess_mtl import ExcessMTLState, excess_mtl_step

from ._checks import float_dtype
from .tracked_rows import tracked_rows_transform, zero_rows

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

    def init_inner(params: PyTree, k: int) -> ExcessMTLState:
        dtype = float_dtype()
        return ExcessMTLState(
            sq_sums=zero_rows(params, k),
            weights=jnp.full((k,), 1.0 / k, dtype),
            baseline=jnp.zeros((k,), dtype),
            warmup_sum=jnp.zeros((k,), dtype),
            step=jnp.zeros((), jnp.int32),
        )

    def step(leaves, losses, gram, inner):
        del losses, gram
        w, new_inner = excess_mtl_step(leaves, inner, robust_step_size, warmup)
        return w, leaves, new_inner

    return tracked_rows_transform(
        "excess_mtl",
        "squared task gradients per coordinate",
        num_tasks,
        init_inner,
        lambda inner: inner.sq_sums,
        step,
        reads_losses=False,
    )
