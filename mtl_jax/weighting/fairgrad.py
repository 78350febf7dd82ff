"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

Tasks share the "resource" ``d`` (the update) and task i's utility is its directional derivative
``u_i = g_i . d``. FairGrad picks the alpha-fair allocation, ``max sum_i u_i^(1-alpha) / (1-alpha)``
over the ball (``sum_i log u_i`` for alpha = 1), whose solution is ``d = J^T w`` with (the step
decision of the paper's Algorithm 1)

    G w = w^(-1/alpha),    w > 0.

``alpha = 1`` is Nash-MTL's bargaining solution (without its norm clipping); ``alpha -> 0`` tends
to linear scalarisation (``alpha = 0`` is accepted and gives the mean, as in TorchJD); large alpha
tends to max-min fairness. The official code (OptMN-Lab/fairgrad, also LibMTL) solves the system
with ``scipy.optimize.least_squares`` on the host from ``w = 1/K``; here it is solved exactly
inside jit as the stationarity condition of a strictly convex problem, by damped Newton
(:mod:`mtl_jax.weighting._fair`, which also documents the handling of zero gradients and of
degenerate problems without a solution).

Scaling: ``G -> c^2 G`` maps ``w -> c^(-2 alpha / (1 + alpha)) w``, so the update is homogeneous of
degree ``(1 - alpha) / (1 + alpha)`` in the gradients (degree 0, scale-free, for alpha = 1). The
solver works on the cosine matrix and rescales (:func:`mtl_jax.weighting._fair.alpha_fair_weights`).
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
