"""COSMOS's scalarisation (Ruchte & Grabocka, ICDM 2021, eq. 3): ``r . L - lam cos(r, L)``.

The preference-weighted sum of the losses minus a penalty on the angle between the preference
``r`` and the loss vector, which pulls the solution toward the ray of ``r``. The weights are
``d loss / d L = r - lam d cos(r, L) / d L``. Departures from the paper: the preference is one
vector per run (``pref_vector``, default ``1/K``) instead of a Dirichlet sample per batch fed to
the network as an input (that conditioning is a change of the model, not of the loss); ``lam``
defaults to 1 (the paper tunes it per data set). See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .base import Scalarizer, from_value, preference, safe_norm

__all__ = ["cosmos"]


def cosmos(lam: float = 1.0, pref_vector: Sequence[float] | None = None) -> Scalarizer:
    """COSMOS (Ruchte & Grabocka 2021): ``sum_k r_k L_k - lam cos(r, L)`` with ``r`` =
    ``pref_vector`` (default ``1/K``) and ``lam`` >= 0 the weight of the cosine penalty."""
    if not lam >= 0:
        raise ValueError(f"COSMOS's lam must be >= 0; got {lam}.")

    def value(losses: jax.Array) -> jax.Array:
        r = preference(pref_vector, losses.shape[0], losses.dtype, "cosmos")
        norm = safe_norm(losses)
        cos = jnp.dot(r, losses) / (jnp.linalg.norm(r) * jnp.where(norm > 0, norm, 1.0))
        return jnp.dot(r, losses) - lam * jnp.where(norm > 0, cos, 0.0)

    return from_value("cosmos", value, lambda k: preference(pref_vector, k, float, "cosmos"))
