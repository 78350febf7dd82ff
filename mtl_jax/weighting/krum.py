"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017), as a Gram-space weighting.

With ``f = n_byzantine``, every task gradient gets the score ``s(i) = sum_{j in N(i)} |g_i - g_j|^2``
over its ``K - f - 2`` nearest other gradients (Sec. 4, the squared distances come from G:
``|g_i - g_j|^2 = G_ii + G_jj - 2 G_ij``); Krum returns the gradient of smallest score, Multi-Krum
(``n_selected = m``) the mean of the ``m`` gradients of smallest scores: ``w = 1/m`` on them.
Hyper-parameters, defaults and checks as TorchJD's ``Krum(n_byzantine, n_selected=1)``: K must be
at least ``n_byzantine + 3`` and at least ``n_selected``. Departures: the scores sum SQUARED
distances (the paper's definition; TorchJD sums the distances themselves, which can select another
gradient); ``n_byzantine`` defaults to 0 (TorchJD has no default); rounding below 0 in a squared
distance is clipped to 0; ties in the scores go to the lowest task index (stable sort).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import EmptyState, Weighting

__all__ = ["check_krum_tasks", "krum_scores", "krum_weighting", "krum_weights"]


def check_krum_tasks(num_tasks: int, n_byzantine: int, n_selected: int) -> None:
    """TorchJD's checks on K: ``K >= n_byzantine + 3`` (one neighbour at least) and
    ``K >= n_selected``."""
    if num_tasks < n_byzantine + 3:
        raise ValueError(
            f"krum with n_byzantine={n_byzantine} needs at least n_byzantine + 3 = "
            f"{n_byzantine + 3} tasks (K - n_byzantine - 2 nearest neighbours per gradient); "
            f"got K={num_tasks}. Lower n_byzantine or use another method."
        )
    if num_tasks < n_selected:
        raise ValueError(
            f"krum with n_selected={n_selected} needs at least {n_selected} tasks; got "
            f"K={num_tasks}. Lower n_selected."
        )


def krum_scores(gram: jax.Array, n_byzantine: int) -> jax.Array:
    """``s[K]``: the sum of the squared distances of each ``g_i`` to its ``K - f - 2`` nearest
    other gradients, from ``G[K, K]``."""
    k = gram.shape[0]
    sq_norms = jnp.diagonal(gram)
    sq_dist = jnp.clip(sq_norms[:, None] + sq_norms[None, :] - 2.0 * gram, 0.0)
    others = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, sq_dist)  # [K, K], self excluded
    nearest = jnp.sort(others, axis=1)[:, : k - n_byzantine - 2]
    return jnp.sum(nearest, axis=1)


def krum_weights(gram: jax.Array, n_byzantine: int = 0, n_selected: int = 1) -> jax.Array:
    """``w[K]``: ``1 / n_selected`` on the ``n_selected`` gradients of smallest Krum score."""
    k = gram.shape[0]
    check_krum_tasks(k, n_byzantine, n_selected)
    order = jnp.argsort(krum_scores(gram, n_byzantine), stable=True)
    selected = jnp.zeros(k, gram.dtype).at[order[:n_selected]].set(1.0)
    return selected / n_selected


def krum_weighting(n_byzantine: int = 0, n_selected: int = 1) -> Weighting:
    """Krum (``n_selected = 1``) or Multi-Krum: the mean of the selected task gradients."""
    if int(n_byzantine) != n_byzantine or n_byzantine < 0:
        raise ValueError(f"krum's n_byzantine must be an integer >= 0; got {n_byzantine}.")
    if int(n_selected) != n_selected or n_selected < 1:
        raise ValueError(f"krum's n_selected must be an integer >= 1; got {n_selected}.")
    f, m = int(n_byzantine), int(n_selected)

    def init(num_tasks: int | None) -> EmptyState:
        if num_tasks is not None:
            check_krum_tasks(int(num_tasks), f, m)
        return EmptyState()

    def weigh(gram: jax.Array, state: Any, key: jax.Array, losses: Any = None) -> Any:
        del key, losses
        return krum_weights(gram, f, m), state

    return Weighting(init=init, weigh=weigh)
