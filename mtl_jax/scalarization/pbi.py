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

from .base import Scalarizer, from_value, preference, safe_norm

__all__ = ["pbi"]


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

    def check_k(k: int) -> None:
        preference(pref_vector, k, float, "pbi")
        if ref is not None and ref.shape != (k,):
            raise ValueError(f"pbi: reference has shape {ref.shape}; expected ({k},).")

    def value(losses: jax.Array) -> jax.Array:
        lam = preference(pref_vector, losses.shape[0], losses.dtype, "pbi")
        unit = lam / jnp.linalg.norm(lam)
        shifted = losses - (0.0 if ref is None else jnp.asarray(ref, losses.dtype))
        d1 = jnp.dot(shifted, unit)
        d2 = safe_norm(shifted - d1 * unit)
        return d1 + theta * d2

    return from_value("pbi", value, check_k)
