"""The two-objective toy of CAGrad, Nash-MTL and FAMO: closed-form losses over ``x in R^2``.

The problem (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021, Sec. 5 / Fig. 1 and the official ``toy.py``; reused with ``L1`` scaled by
0.1 by Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Fig. 1,
``experiments/toy/problem.py``, and by Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask
Optimization", NeurIPS 2023, Fig. 2)::

    f1 = log max(|0.5 (-x1 - 7) - tanh(-x2)|, 5e-6) + 6
    f2 = log max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, 5e-6) + 6
    g1 = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    g2 = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    c1 = max(tanh(x2 / 2), 0),   c2 = max(tanh(-x2 / 2), 0)
    L1 = scale * (c1 f1 + c2 g1),   L2 = c1 f2 + c2 g2

For ``x2 > 0`` the losses are the logarithmic valleys ``f``; for ``x2 < 0`` the quadratics
``g``, whose minima ``(7, -8)`` and ``(-7, -8)`` pull ``x1`` apart: the Pareto set is the curve
between them near ``x2 = -8.4`` (:func:`pareto_set`), and the front is its image
(:func:`pareto_front`). The papers start from :data:`CAGRAD_STARTS` (CAGrad) or
:data:`NASH_MTL_STARTS` (Nash-MTL and FAMO) and run Adam with learning rate 1e-3 for 100k
(CAGrad), 35k (Nash-MTL) or 50k (FAMO) steps.

Departures from the official code: none in the losses. The two clamps pass the gradient at
equality as ``torch.clamp`` does (``jnp.maximum`` would halve it), so a step from ``x2 = 0`` (a
Nash-MTL start) is the official one. The papers draw the front as the straight segment
``x2 = -8.3552``, ``x1 in [-7, 7]`` (the stationary point at ``x1 = 0``); :func:`pareto_set`
solves the stationarity condition for every ``x1``: ``x2`` runs from -8.355 (``x1 = 0``) to
-8.434 (``x1 = +-7``). The set does not depend on ``scale`` (Pareto dominance is invariant to
scaling an objective); the front does.

All functions are pure JAX, ``jit``- and ``vmap``-able; ``x`` is ``f[2]`` (or ``f[..., 2]``
where stated), losses ``f[2]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "CAGRAD_STARTS",
    "LOWER",
    "NASH_MTL_STARTS",
    "distance_to_curve",
    "losses",
    "pareto_front",
    "pareto_set",
    "stationarity",
]

#: The clamp of the logarithms' arguments in the official code.
LOWER = 5e-6
#: CAGrad's three starting points (official ``toy.py``).
CAGRAD_STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
#: Nash-MTL's and FAMO's five starting points (their ``experiments/toy/trainer.py``).
NASH_MTL_STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))


def _clamp_below(value: jax.Array, bound: float) -> jax.Array:
    """``max(value, bound)`` with the gradient passing at ``value == bound`` (``torch.clamp``)."""
    return jnp.where(value >= bound, value, bound)


def losses(x: jax.Array, scale: float = 1.0) -> jax.Array:
    """``[L1(x), L2(x)]``, the module docstring's formulas; ``scale`` multiplies ``L1``.

    Args:
      x: ``f[..., 2]``, the parameters ``(x1, x2)`` on the last axis.
      scale: 1 in CAGrad, 0.1 in Nash-MTL and FAMO (unbalanced losses).

    Returns:
      ``f[..., 2]``: ``L1`` and ``L2`` on the last axis.

    Raises:
      ValueError: if the last axis of ``x`` is not of size 2.
    """
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[-1] != 2:
        raise ValueError(
            f"toy.losses needs x of shape [..., 2] (the two parameters x1, x2 on the last axis); "
            f"got shape {x.shape}."
        )
    x1, x2 = x[..., 0], x[..., 1]
    f1 = jnp.log(_clamp_below(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
    f2 = jnp.log(_clamp_below(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c1 = _clamp_below(jnp.tanh(x2 * 0.5), 0.0)
    c2 = _clamp_below(jnp.tanh(-x2 * 0.5), 0.0)
    return jnp.stack([scale * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2], axis=-1)


def pareto_set(num_points: int = 201, iterations: int = 60) -> jax.Array:
    """Points of the Pareto set, from the minimum of ``L2`` (``x1 = -7``) to that of ``L1``.

    For a weight ``w in [0, 1]`` the point where ``w grad L1 + (1 - w) grad L2 = 0`` (scale 1):
    in the lower half-plane the ``x1`` component vanishes at ``x1 = 14 w - 7``, and ``x2`` is the
    root in ``[-10, -8]`` of the ``x2`` component (found by bisection; the component is positive
    at -8 and negative at -10 for every ``w``).

    Args:
      num_points: how many points, at equally spaced ``w``.
      iterations: bisection steps (60 reach float precision).

    Returns:
      ``x[num_points, 2]``, ordered by ``x1``.
    """
    if num_points < 2:
        raise ValueError(f"pareto_set needs num_points >= 2 (the two ends); got {num_points}.")
    w = jnp.linspace(0.0, 1.0, num_points)
    x1 = 14.0 * w - 7.0

    def slope(x1: jax.Array, x2: jax.Array, w: jax.Array) -> jax.Array:
        weighted = lambda x2: jnp.dot(jnp.stack([w, 1 - w]), losses(jnp.stack([x1, x2])))
        return jax.grad(weighted)(x2)

    def root(x1: jax.Array, w: jax.Array) -> jax.Array:
        def halve(_, bounds):
            low, high = bounds  # slope(low) < 0 < slope(high)
            mid = 0.5 * (low + high)
            below = slope(x1, mid, w) < 0
            return jnp.where(below, mid, low), jnp.where(below, high, mid)

        start = (jnp.asarray(-10.0, x1.dtype), jnp.asarray(-8.0, x1.dtype))
        low, high = jax.lax.fori_loop(0, iterations, halve, start)
        return 0.5 * (low + high)

    return jnp.stack([x1, jax.vmap(root)(x1, w)], axis=-1)


def pareto_front(num_points: int = 201, scale: float = 1.0) -> jax.Array:
    """The losses on :func:`pareto_set`: ``f[num_points, 2]``, ``L1`` decreasing and ``L2``
    increasing along it (from the minimum of ``L2`` to that of ``L1``)."""
    return losses(pareto_set(num_points), scale)


def distance_to_curve(points: jax.Array, curve: jax.Array) -> jax.Array:
    """Euclidean distance from each point to the polyline through ``curve``'s points.

    Args:
      points: ``f[..., 2]`` (e.g. final losses, or final ``x``).
      curve: ``f[N, 2]``, e.g. :func:`pareto_front` (loss space) or :func:`pareto_set`.

    Returns:
      ``f[...]``.
    """
    curve = jnp.asarray(curve)
    if curve.ndim != 2 or curve.shape[0] < 2 or curve.shape[1] != 2:
        raise ValueError(
            f"distance_to_curve needs curve of shape [N >= 2, 2] (a polyline); got {curve.shape}."
        )
    a, b = curve[:-1], curve[1:]  # segments [N - 1, 2]
    p = points[..., None, :]  # [..., 1, 2]
    ab = b - a
    t = jnp.clip(jnp.sum((p - a) * ab, -1) / jnp.maximum(jnp.sum(ab * ab, -1), 1e-30), 0.0, 1.0)
    gap = p - (a + t[..., None] * ab)
    return jnp.min(jnp.sqrt(jnp.sum(gap * gap, -1)), axis=-1)


def stationarity(x: jax.Array, scale: float = 1.0) -> jax.Array:
    """``min_{w in [0, 1]} |w grad L1 + (1 - w) grad L2|`` at ``x`` (``f[2]``; ``vmap`` for more):
    0 exactly at a Pareto-stationary point (the MGDA min-norm point of two gradients, in closed
    form: ``w = clip(-g2.(g1 - g2) / |g1 - g2|^2, 0, 1)``)."""
    g1, g2 = jax.jacrev(lambda x: losses(x, scale))(jnp.asarray(x))  # [2 tasks, 2 params]
    diff = g1 - g2
    w = jnp.clip(-jnp.dot(g2, diff) / jnp.maximum(jnp.dot(diff, diff), 1e-30), 0.0, 1.0)
    return jnp.linalg.norm(w * g1 + (1 - w) * g2)
