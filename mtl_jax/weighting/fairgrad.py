"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

The alpha-fair allocation of the update among the tasks' directional derivatives: ``d = J^T w``
with ``G w = w^(-1/alpha)``, ``w > 0`` (Algorithm 1). ``alpha = 1`` is Nash-MTL without its
clipping, ``alpha = 0`` gives the mean (as TorchJD), large alpha tends to max-min fairness. The
update is homogeneous of degree ``(1 - alpha) / (1 + alpha)`` in the gradients. Departure: the
official code (OptMN-Lab/fairgrad, also LibMTL) calls ``scipy.optimize.least_squares`` on the
host from ``w = 1/K``; here the system is solved exactly inside jit by damped Newton
(:mod:`mtl_jax.weighting._fair`, which also handles zero gradients and problems without a
solution). Details: ``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtl_jax.weighting._fair import alpha_fair_weights
from mtl_jax.weighting.base import Weighting, stateless

__all__ = ["fairgrad_weighting", "fairgrad_weights"]


@functools.partial(jax.jit, static_argnames=("alpha",))
def fairgrad_weights(gram: jax.Array, alpha: float = 1.0) -> jax.Array:
    """FairGrad's weights ``w[K]`` solving ``G w = w^(-1/alpha)`` (zero for zero gradients)."""
    if alpha == 0:
        return jnp.full(gram.shape[0], 1.0 / gram.shape[0], gram.dtype)
    return alpha_fair_weights(gram, float(alpha))


def fairgrad_weighting(alpha: float = 1.0) -> Weighting:
    """FairGrad as a :class:`~mtl_jax.weighting.base.Weighting`."""
    if not alpha >= 0:
        raise ValueError(f"FairGrad's alpha must be >= 0; got {alpha}.")
    return stateless(lambda gram: fairgrad_weights(gram, float(alpha)))
