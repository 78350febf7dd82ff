"""Geometric loss strategy, GLS (Chennupati et al., "MultiNet++", CVPR-W 2019).

``loss = (prod_k L_k)^(1/K)``, computed as ``exp(mean(log L))``; effective weights
``GLS / (K L_k)``. The losses must be positive. See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import EmptyState

from .base import Scalarizer, check_losses, no_post_step

__all__ = ["gls"]


def gls() -> Scalarizer:
    """Geometric loss strategy (Chennupati et al., "MultiNet++", CVPR-W 2019): ``(prod_k L_k)^(1/K)``.

    Computed as ``exp(mean(log L))``; its gradient has the weights ``GLS / (K L_k)``. The losses
    must be positive (a zero loss makes the product 0 and its own weight infinite).
    """

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, None, "gls")
        loss = jnp.exp(jnp.mean(jnp.log(losses)))
        values = jax.lax.stop_gradient(losses)
        weights = jax.lax.stop_gradient(loss) / (losses.shape[0] * values)
        return loss, weights, state

    return Scalarizer(lambda num_tasks: EmptyState(), scalarize, no_post_step)
