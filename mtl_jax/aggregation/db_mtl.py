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

from mtl_jax import _tree
from mtl_jax.gramian import GLOBAL, combine, group_gramians
from mtl_jax.weighting.base import require_num_tasks

from ._checks import float_dtype, leaves_finite, map_unmasked, validate_jacobian
from .gramspace import AggregatorState, cast_like, empty_logs

__all__ = [
    "DBMTLState",
    "db_mtl",
    "db_mtl_step",
    "decayed_rate",
    "require_task_losses",
    "row_norms",
    "zero_rows",
]

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


def zero_rows(params: PyTree, num_tasks: int) -> list[jax.Array]:
    """``[K, *leaf.shape]`` zeros for every (non-masked) leaf of ``params``."""
    dtype = float_dtype()
    return [
        jnp.zeros((num_tasks, *jnp.shape(leaf)), dtype)
        for _, leaf in _tree.leaves_with_paths(params)
    ]


def row_norms(rows: Sequence[jax.Array]) -> jax.Array:
    """``[K]``: the norm of every task's row over all leaves."""
    total = sum(jnp.sum(jnp.reshape(jnp.square(r), (r.shape[0], -1)), axis=1) for r in rows)
    return jnp.sqrt(total)


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
        h = leaf.astype(old.dtype) * jnp.reshape(scale, (-1,) + (1,) * (leaf.ndim - 1))
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

    def init(params: PyTree) -> AggregatorState:
        k = require_num_tasks(num_tasks, "db_mtl", "an EMA of the task gradients")
        inner = DBMTLState(zero_rows(params, k), jnp.zeros((), jnp.int32))
        weights, gram = empty_logs([GLOBAL], k)
        return AggregatorState(jax.random.key(0), weights, gram, {GLOBAL: inner})

    def update(jac, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        validate_jacobian(jac, params, task_losses, num_tasks, "db_mtl")
        losses = require_task_losses(task_losses, "db_mtl")
        leaves = [leaf for _, leaf in _tree.leaves_with_paths(jac)]
        inner = state.inner[GLOBAL]
        check_state_leaves(leaves, inner.buffer, "db_mtl")
        alpha, new_inner = db_mtl_step(leaves, losses, inner, beta, beta_sigma)
        finite = leaves_finite(leaves, task_losses)
        alpha = jnp.where(finite, alpha, jnp.nan)
        new_inner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_inner, inner)
        flat_out = [
            jnp.where(finite, combine(alpha, b), jnp.nan).astype(leaf.dtype)
            for leaf, b in zip(leaves, new_inner.buffer, strict=True)
        ]
        updates = map_unmasked(jac, lambda i, leaf: flat_out[i])
        new_state = AggregatorState(
            state.key,
            cast_like({GLOBAL: alpha}, state.weights),
            cast_like(group_gramians(jac, GLOBAL), state.gram),
            {GLOBAL: new_inner},
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)
