"""Penalty-based boundary intersection, PBI (Zhang & Li, IEEE TEVC 2007, MOEA/D, eq. 6).

``loss = d1 + theta d2`` with ``d1 = (L - z) . lambda / |lambda|`` (the progress along the
preference direction) and ``d2 = |L - z - d1 lambda / |lambda||`` (the distance from that ray).
The weights are ``d loss / d L``, so one backward pass of the loss is the method. Departure from
MOEA/D: one preference vector per run (a population of subproblems is a set of runs), and the
gradient of ``d2`` at ``d2 = 0`` is taken as 0. See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .base import Scalarizer, check_losses, check_num_tasks, no_post_step

__all__ = ["pbi", "preference", "safe_norm"]


def preference(pref_vector: Sequence[float] | None, k: int, method: str) -> np.ndarray | None:
    """The checked preference vector ``[K]`` (``None``: uniform ``1/K`` at trace time)."""
    if pref_vector is None:
        return None
    pref = np.asarray(pref_vector, dtype=float)
    if pref.shape != (k,):
        raise ValueError(f"{method}: pref_vector has shape {pref.shape}; expected ({k},).")
    if np.any(pref < 0) or not np.any(pref > 0):
        raise ValueError(
            f"{method}: pref_vector must be non-negative and not all zero; got {pref.tolist()}."
        )
    return pref


def safe_norm(x: jax.Array) -> jax.Array:
    """``|x|`` with gradient 0 at ``x = 0`` (``jnp.linalg.norm``'s is NaN there)."""
    sq = jnp.sum(x * x)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def pbi(
    theta: float = 5.0,
    pref_vector: Sequence[float] | None = None,
    reference: Sequence[float] | None = None,
) -> Scalarizer:
    """PBI (Zhang & Li 2007): ``d1 + theta d2`` along the preference ``lambda`` (``pref_vector``,
    default ``1/K``) from the ideal point ``z`` (``reference``, default 0); ``theta`` >= 0
    penalises the distance from the preference ray (MOEA/D's default 5)."""
    if not theta >= 0:
        raise ValueError(f"PBI's theta must be >= 0; got {theta}.")
    ref = None if reference is None else np.asarray(reference, dtype=float)

    def init(num_tasks: int) -> optax.EmptyState:
        k = check_num_tasks(num_tasks, "pbi")
        preference(pref_vector, k, "pbi")
        if ref is not None and ref.shape != (k,):
            raise ValueError(f"pbi: reference has shape {ref.shape}; expected ({k},).")
        return optax.EmptyState()

    def value(losses: jax.Array) -> jax.Array:
        k = losses.shape[0]
        pref = preference(pref_vector, k, "pbi")
        lam = (
            jnp.full(k, 1.0 / k, losses.dtype) if pref is None else jnp.asarray(pref, losses.dtype)
        )
        unit = lam / jnp.linalg.norm(lam)
        shifted = losses - (0.0 if ref is None else jnp.asarray(ref, losses.dtype))
        d1 = jnp.dot(shifted, unit)
        d2 = safe_norm(shifted - d1 * unit)
        return d1 + theta * d2

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, None, "pbi")
        weights = jax.grad(value)(jax.lax.stop_gradient(losses))
        return value(losses), weights, state

    return Scalarizer(init, scalarize, no_post_step)
