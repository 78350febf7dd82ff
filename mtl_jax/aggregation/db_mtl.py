"""DB-MTL (Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023), an aggregator.

Loss balancing: every task gradient is that of its log-loss, ``g_k / (L_k + 1e-8)`` (Sec. 3.1).
Gradient balancing (Sec. 3.2, eqs. 5-6): an EMA of those rows, ``b_k <- h_k + beta_t (b_k - h_k)``
with ``beta_t = beta / t^beta_sigma`` (step ``t`` from 1, ``b`` from 0), then every row rescaled
to the largest norm, ``d = sum_k max_j |b_j| / (|b_k| + 1e-8) b_k``. Hyper-parameters, defaults
(``beta = 0.9``, ``beta_sigma = 0``) and the 1e-8 constants as LibMTL's ``weighting/DB_MTL.py``.
Not a Gram-space method: the state keeps the EMA rows (as large as the Jacobian), so it needs
``num_tasks``, and the update reads ``task_losses``. The state is an
:class:`~mtl_jax.aggregation.gramspace.AggregatorState`: the logged weights are the scale factors
``max_j |b_j| / (|b_k| + 1e-8)`` (they multiply the EMA rows, not the current gradients), the Gram
matrix the current Jacobian's. Departure: a loss is not checked to be > 0 (LibMTL neither; the
log-loss gradient then has the loss's sign). Non-finite input gives an all-NaN update and keeps
the state. See ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .tracked_rows import decayed_rate, scale_rows, tracked_rows_transform, zero_rows

__all__ = ["DBMTLState", "db_mtl", "db_mtl_step", "row_norms"]

PyTree = Any
Transform = optax.GradientTransformationExtraArgs
EPS = 1e-8  # LibMTL's constant in log(L + eps) and in |b| + eps


class DBMTLState(NamedTuple):
    """State of DB-MTL.

    Attributes:
      buffer: one array per Jacobian leaf, ``[K, *param.shape]``: the EMA of the log-loss rows.
      step: number of steps so far.
    """

    buffer: list[jax.Array]
    step: jax.Array


def row_norms(rows: Sequence[jax.Array]) -> jax.Array:
    """``[K]``: the norm of every task's row over all leaves."""
    total = sum(jnp.sum(jnp.reshape(jnp.square(r), (r.shape[0], -1)), axis=1) for r in rows)
    return jnp.sqrt(total)


def db_mtl_step(
    leaves: Sequence[jax.Array],
    losses: jax.Array,
    state: DBMTLState,
    beta: float,
    beta_sigma: float,
) -> tuple[jax.Array, DBMTLState]:
    """One DB-MTL step: ``(alpha[K], new_state)``; the update is ``sum_k alpha_k b_k``."""
    step = state.step + 1
    rate = decayed_rate(beta, beta_sigma, step, state.buffer[0].dtype)
    scale = 1.0 / (losses.astype(rate.dtype) + EPS)  # d log(L + eps) = g / (L + eps)
    buffer = []
    for leaf, old in zip(leaves, state.buffer, strict=True):
        h = scale_rows(leaf, scale, old.dtype)
        buffer.append(h + rate * (old - h))
    norms = row_norms(buffer)
    alpha = jnp.max(norms) / (norms + EPS)
    return alpha, DBMTLState(buffer, step)


def db_mtl(
    beta: float = 0.9, beta_sigma: float = 0.0, *, num_tasks: int | None = None
) -> Transform:
    """DB-MTL (Lin et al. 2023): log-loss gradients, their EMA, every row rescaled to the
    largest norm, summed (see the module docstring). Needs ``num_tasks`` and ``task_losses``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"db_mtl's beta must be in [0, 1]; got {beta}.")
    if beta_sigma < 0:
        raise ValueError(f"db_mtl's beta_sigma must be >= 0; got {beta_sigma}.")

    def init_inner(params: PyTree, k: int) -> DBMTLState:
        return DBMTLState(zero_rows(params, k), jnp.zeros((), jnp.int32))

    def step(leaves, losses, gram, inner):
        del gram
        alpha, new_inner = db_mtl_step(leaves, losses, inner, beta, beta_sigma)
        return alpha, new_inner.buffer, new_inner

    return tracked_rows_transform(
        "db_mtl",
        "an EMA of the task gradients",
        num_tasks,
        init_inner,
        lambda inner: inner.buffer,
        step,
        reads_losses=True,
    )
