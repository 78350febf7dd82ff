"""MGDA (Désidéri 2012; Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018): the minimum-norm element of the convex hull of the task gradients.

``d = J^T w`` with ``w = argmin_{w in simplex} w^T G w`` (Sener & Koltun eq. 3), solved exactly in
Gram space by Wolfe's algorithm (:mod:`mtl_jax.weighting._minnorm`). ``d`` is common descent for
every task: ``d . g_k >= |d|^2 >= 0``, and ``d = 0`` exactly when the origin is in the hull
(Pareto-stationary point).

Departure from the official code (isl-org/MultiObjectiveOptimization): their Algorithm 2 is
Frank-Wolfe with at most 250 iterations and stopping tolerance 1e-3, which is approximate; this
solver is exact up to rounding. Gradient normalisation (their ``l2``/``loss``/``loss+`` options)
is not applied by default; pass ``normalization`` to apply it to G before solving.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax.weighting._minnorm import min_norm_weights
from mtl_jax.weighting.base import EmptyState, Weighting

__all__ = ["NORMALIZATIONS", "mgda_weighting", "normalization_scales"]

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def normalization_scales(
    gram: jax.Array, losses: jax.Array | None, normalization: str
) -> jax.Array:
    """Per-task divisors ``n_k`` of Sener & Koltun's code: ``g_k / n_k`` before solving.

    ``"l2"``: ``|g_k|``; ``"loss"``: ``L_k``; ``"loss+"``: ``L_k |g_k|``; ``"none"``: 1.
    Zero divisors are replaced by 1.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalization {normalization!r}; choose from {NORMALIZATIONS}.")
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    if normalization == "none":
        scales = jnp.ones_like(norms)
    elif normalization == "l2":
        scales = norms
    else:
        if losses is None:
            raise ValueError(f"MGDA normalization {normalization!r} needs task_losses=... .")
        scales = losses.astype(gram.dtype) * (norms if normalization == "loss+" else 1.0)
    return jnp.where(scales > 0, scales, jnp.ones_like(scales))


def mgda_weighting(normalization: str = "none", max_iter: int | None = None) -> Weighting:
    """MGDA's min-norm weights (optionally on normalised gradients, then mapped back to raw ones)."""
    normalization_scales(jnp.eye(1), jnp.ones(1), normalization)  # validate eagerly

    def weigh(gram: jax.Array, state: Any, key: jax.Array, losses: Any = None) -> Any:
        del key
        scales = normalization_scales(gram, losses, normalization)
        normed = gram / (scales[:, None] * scales[None, :])
        w = min_norm_weights(normed, max_iter)
        return w / scales, state

    return Weighting(init=lambda num_tasks: EmptyState(), weigh=weigh)
