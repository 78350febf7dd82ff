"""Fixed weightings: the mean, the sum, and a constant vector."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, stateless

__all__ = ["linear_weighting", "mean_weighting", "sum_weighting"]


def mean_weighting() -> Weighting:
    """``w = 1/K``: the gradient of the mean loss (equal weighting, "EW" / joint training)."""
    return stateless(lambda gram: jnp.full(gram.shape[0], 1.0 / gram.shape[0], gram.dtype))


def sum_weighting() -> Weighting:
    """``w = 1``: the gradient of the summed loss."""
    return stateless(lambda gram: jnp.ones(gram.shape[0], gram.dtype))


def linear_weighting(weights: Sequence[float] | jax.Array) -> Weighting:
    """``w = weights``: a constant combination (LibMTL/TorchJD "Constant")."""
    fixed = jnp.asarray(weights)
    if fixed.ndim != 1:
        raise ValueError(f"linear weights must be a vector [K]; got shape {fixed.shape}.")

    def fn(gram: jax.Array) -> jax.Array:
        if gram.shape[0] != fixed.shape[0]:
            raise ValueError(
                f"linear weights have length {fixed.shape[0]} but there are K={gram.shape[0]} tasks."
            )
        return fixed.astype(gram.dtype)

    return stateless(fn)
