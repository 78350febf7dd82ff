"""MGDA (Désidéri 2012; Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018): the minimum-norm element of the convex hull of the task gradients.

``d = J^T w`` with ``w = argmin_{w in simplex} w^T G w`` (Sener & Koltun eq. 3), solved exactly in
Gram space by Wolfe's algorithm (:mod:`mtl_jax.weighting._minnorm`). ``d`` is common descent for
every task: ``d . g_k >= |d|^2 >= 0``, and ``d = 0`` exactly when the origin is in the hull
(Pareto-stationary point).

``normalization`` (Sec. 3.2 and the official ``min_norm_solvers.gradient_normalizers``; LibMTL's
``mgda_gn``): the weights are solved for ``g_k / n_k`` with ``n_k`` = 1 (``"none"``, the default),
``|g_k|`` (``"l2"``), ``L_k`` (``"loss"``) or ``L_k |g_k|`` (``"loss+"``). As in the official
code (``train_multi_task.py``: ``loss = sum_t scale[t] * loss_t``), the update combines the RAW
gradients with those weights, ``d = sum_k w_k g_k``; LibMTL instead combines the normalised ones
(``sum_k w_k g_k / n_k``). So with a normalisation the update is no longer common descent:
re-applying the scales favours the large gradients (``"l2"`` on 5 tasks with scales 0.1-10:
55 of 60 samples conflict with some task). Departures from the official code: their Algorithm 2 is Frank-Wolfe
(at most 250 iterations, tolerance 1e-3), this solver is exact up to rounding; a divisor that is
not > 0 (a zero gradient, a non-positive loss) is replaced by 1, where theirs divides by it.
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
    """Per-task divisors ``n[K]`` of Sener & Koltun's code: the weights are solved for ``g_k / n_k``.

    ``"l2"``: ``|g_k|``; ``"loss"``: ``L_k``; ``"loss+"``: ``L_k |g_k|``; ``"none"``: 1.
    Divisors that are not > 0 are replaced by 1.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"Unknown MGDA normalization {normalization!r}; choose from {NORMALIZATIONS}."
        )
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    if normalization == "none":
        scales = jnp.ones_like(norms)
    elif normalization == "l2":
        scales = norms
    else:
        if losses is None:
            raise ValueError(
                f"MGDA normalization {normalization!r} divides by the task losses: pass "
                "task_losses=... to the aggregator's update."
            )
        scales = losses.astype(gram.dtype) * (norms if normalization == "loss+" else 1.0)
    return jnp.where(scales > 0, scales, jnp.ones_like(scales))


def mgda_weighting(normalization: str = "none", max_iter: int | None = None) -> Weighting:
    """MGDA's min-norm weights, solved on the normalised gradients ``g_k / n_k`` and applied to
    the raw ones (the official code's update; see the module docstring)."""
    normalization_scales(jnp.eye(1), jnp.ones(1), normalization)  # validate eagerly

    def weigh(gram: jax.Array, state: Any, key: jax.Array, losses: Any = None) -> Any:
        del key
        if normalization == "none":
            return min_norm_weights(gram, max_iter), state
        scales = normalization_scales(gram, losses, normalization)
        normed = gram / (scales[:, None] * scales[None, :])
        return min_norm_weights(normed, max_iter), state

    return Weighting(init=lambda num_tasks: EmptyState(), weigh=weigh)
