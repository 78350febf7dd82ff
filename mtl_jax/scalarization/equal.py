"""Fixed equal weights: the mean loss (weights ``1/K``) and the summed loss (weights 1).

``sum_`` carries a trailing underscore so that it does not shadow the builtin; its registry name
is ``"sum"``. See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

import jax.numpy as jnp

from mtl_jax.weighting.base import EmptyState

from .base import Scalarizer, check_losses, no_post_step

__all__ = ["mean", "sum_"]


def mean() -> Scalarizer:
    """Equal weighting: ``mean_k L_k`` (weights ``1/K``)."""

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, None, "mean")
        num = losses.shape[0]
        return jnp.mean(losses), jnp.full(num, 1.0 / num, losses.dtype), state

    return Scalarizer(lambda num_tasks: EmptyState(), scalarize, no_post_step)


def sum_() -> Scalarizer:
    """The summed loss ``sum_k L_k`` (weights 1); registered as ``"sum"``."""

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, None, "sum")
        return jnp.sum(losses), jnp.ones(losses.shape[0], losses.dtype), state

    return Scalarizer(lambda num_tasks: EmptyState(), scalarize, no_post_step)
