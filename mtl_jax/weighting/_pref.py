"""Preference vectors (TorchJD's ``pref_vector``): validated once, checked against K at trace time."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_pref", "pref_array", "pref_or"]


def pref_array(pref_vector: Sequence[float] | jax.Array | None, method: str) -> np.ndarray | None:
    """``pref_vector`` as a 1-D array (``None`` stays ``None``); a clear error otherwise."""
    if pref_vector is None:
        return None
    pref = np.asarray(pref_vector, dtype=float)  # kept in float64 until cast to G's dtype
    if pref.ndim != 1:
        raise ValueError(f"{method} pref_vector must be a vector [K]; got shape {pref.shape}.")
    return pref


def check_pref(pref: jax.Array | None, num: int, method: str) -> None:
    """A clear error when a preference vector does not have K entries."""
    if pref is not None and pref.shape[0] != num:
        raise ValueError(
            f"{method} pref_vector has {pref.shape[0]} entries but there are K={num} tasks."
        )


def pref_or(pref: jax.Array | None, num: int, dtype, default: float, method: str) -> jax.Array:
    """The preference vector, or ``default`` repeated K times."""
    check_pref(pref, num, method)
    if pref is None:
        return jnp.full(num, default, dtype)
    return jnp.asarray(pref, dtype)
