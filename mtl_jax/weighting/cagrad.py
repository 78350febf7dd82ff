"""CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021).

``max_d min_i g_i . d`` s.t. ``|d - g0| <= c |g0|``; its dual (eq. 4 / Alg. 1) gives
``d = g0 + c |g0| g_w / |g_w|``, ``g_w = J^T w*``, with an optional ``1 / (1 + c^2)`` rescaling
(off by default, as in the paper; the official code's default is on). Solver: the dual is a 1-D
convex problem over ``rho`` (Illinois root finding) around exact min-norm problems (Wolfe) on a
translated Gram matrix, all on G. At a Pareto-stationary point (``g_w = 0``) the projection of
``g0`` onto the dual cone is returned instead. Departure: the official code solves the dual with
scipy's SLSQP on a smoothed ``sqrt(w^T G w + 1e-8)`` on the host; here it is exact up to the
root-finding tolerance, under jit. The derivation: ``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mtl_jax.weighting._minnorm import min_norm_weights
from mtl_jax.weighting._qp import project_weights
from mtl_jax.weighting.base import Weighting, diag_scale, stateless

__all__ = ["cagrad_dual_weights", "cagrad_weighting", "cagrad_weights"]


@functools.partial(jax.jit, static_argnames=("c", "max_iter"))
def cagrad_dual_weights(gram: jax.Array, c: float, max_iter: int = 60) -> jax.Array:
    """The dual solution ``w*`` (in the simplex) of CAGrad for ``G[K, K]``."""
    num = gram.shape[0]
    dtype = gram.dtype
    eps = float(jnp.finfo(dtype).eps)
    G = gram / diag_scale(gram)
    mean_w = jnp.full(num, 1.0 / num, dtype)
    b = G @ mean_w  # g_k . g0
    g0_sq = jnp.clip(mean_w @ b, 0.0)
    radius = c * jnp.sqrt(g0_sq)
    safe_radius = jnp.where(radius > 0, radius, 1.0)

    def inner(rho: jax.Array) -> tuple[jax.Array, jax.Array]:
        t = rho / safe_radius
        translated = G + t * (b[:, None] + b[None, :]) + t * t * g0_sq
        w = min_norm_weights(translated)
        return rho * rho - w @ G @ w, w

    # The bracket: h(rho) = rho^2 - |g_w(rho)|^2 is non-decreasing (psi is convex) and
    # h(max_k |g_k|) >= 0. The lower end is a small rho > 0, not 0: at rho = 0 the inner problem
    # ignores g0 (it is MGDA), and h(0) = 0 when the origin is in the hull says nothing about 0+.
    # In Gram space |g_w|^2 carries an absolute rounding error ~eps |g|^2, so rho is resolved
    # down to ~sqrt(eps) max|g_k|; below that the solution at the lower end is returned (its
    # dual objective is within ~sqrt(eps) c |g0| max|g_k| of the optimum).
    hi = jnp.sqrt(jnp.max(jnp.diagonal(G)))
    lo = hi * 8.0 * math.sqrt(eps)
    f_lo, w_lo = inner(lo)
    f_hi, w_hi = inner(hi)

    def cond(carry):
        _lo, _hi, _f_lo, _f_hi, _, _, it, done = carry
        return (~done) & (it < max_iter)

    def body(carry):
        lo, hi, f_lo, f_hi, side, _w, it, _ = carry
        denom = f_hi - f_lo
        falsi = jnp.where(
            denom > 0, (lo * f_hi - hi * f_lo) / jnp.where(denom > 0, denom, 1.0), 0.5 * (lo + hi)
        )
        # Far-apart ends (the bracket starts at rho ~ eps): bisect geometrically first.
        guess = jnp.where(hi > 64.0 * lo, jnp.sqrt(lo * hi), jnp.clip(falsi, lo, hi))
        f_guess, w_guess = inner(guess)
        above = f_guess > 0
        new_lo = jnp.where(above, lo, guess)
        new_hi = jnp.where(above, guess, hi)
        # Illinois: halve the stale end's value when the same end moves twice in a row.
        new_f_lo = jnp.where(above, jnp.where(side == -1, 0.5 * f_lo, f_lo), f_guess)
        new_f_hi = jnp.where(above, f_guess, jnp.where(side == 1, 0.5 * f_hi, f_hi))
        new_side = jnp.where(above, -1, 1).astype(jnp.int32)
        # h = rho^2 - |g_w|^2 is O(rho^2) near 0: a relative test, never an absolute one.
        done = (jnp.abs(f_guess) <= 4 * eps * guess * guess) | (new_hi - new_lo <= 4 * eps * new_hi)
        return new_lo, new_hi, new_f_lo, new_f_hi, new_side, w_guess, it + 1, done

    start_done = f_lo >= 0  # rho* ~ 0: the optimum has g_w ~ 0 and d ~ g0
    carry = (lo, hi, f_lo, f_hi, jnp.int32(0), w_hi, jnp.int32(0), start_done)
    *_, w, _, _ = jax.lax.while_loop(cond, body, carry)
    return jnp.where(start_done, w_lo, w)


def _worst_improvement(G: jax.Array, w: jax.Array) -> jax.Array:
    """``min_i g_i . d`` for ``d = J^T w``: CAGrad's primal objective, in Gram space."""
    return jnp.min(G @ w)


@functools.partial(jax.jit, static_argnames=("c", "rescale"))
def cagrad_weights(gram: jax.Array, c: float = 0.5, rescale: bool = False) -> jax.Array:
    """CAGrad's final weights: ``1/K + c |g0| w* / |g_w*|`` (divided by ``1 + c^2`` if rescale).

    The reconstruction divides by ``|g_w*|``, which is 0 when the origin is in the convex hull of
    the task gradients (a Pareto-stationary point) and ``c >= 1``: the dual optimum is then 0 at
    ``g_w* = 0``, and ``g_w* / |g_w*|`` is rounding noise (a conflicting update with weights of
    ~1e6). The primal optimum is still well defined: ``max_d min_i g_i . d`` over the ball
    ``|d - g0| <= c |g0|``. So the update is the better, by that objective, of two feasible
    candidates: the dual reconstruction, and the projection of ``g0`` onto the dual cone
    ``{d : J d >= 0}`` (DualProj's direction, :mod:`mtl_jax.weighting._qp`) when it lies in the
    ball. The projection is the point of the cone nearest to ``g0``, so it is in the ball whenever
    any non-conflicting direction is: the update never conflicts where a non-conflicting one is
    feasible. Away from that degeneracy the reconstruction is optimal and is kept.
    """
    num = gram.shape[0]
    dtype = gram.dtype
    eps = float(jnp.finfo(dtype).eps)
    G = gram / diag_scale(gram)
    mean_w = jnp.full(num, 1.0 / num, dtype)
    g0_sq = jnp.clip(mean_w @ G @ mean_w, 0.0)
    radius = c * jnp.sqrt(g0_sq)
    w = cagrad_dual_weights(gram, c)
    gw_norm = jnp.sqrt(jnp.clip(w @ G @ w, 0.0))
    ok = (gw_norm > 0) & (radius > 0)
    weights = mean_w + jnp.where(ok, radius / jnp.where(ok, gw_norm, 1.0), 0.0) * w
    if c > 0:
        projected = project_weights(G, mean_w)
        step = projected - mean_w
        distance_sq = jnp.clip(step @ G @ step, 0.0)
        # Rounding of the quadratic forms in G: a few ulps of |step|^T |G| |step| and of g0_sq.
        absG = jnp.abs(G)
        slack = 16.0 * num * eps * (jnp.abs(step) @ absG @ jnp.abs(step) + mean_w @ absG @ mean_w)
        inside = distance_sq <= radius * radius + slack
        better = _worst_improvement(G, projected) > _worst_improvement(G, weights)
        weights = jnp.where(inside & better, projected, weights)
    return weights / (1.0 + c * c) if rescale else weights


def cagrad_weighting(c: float = 0.5, rescale: bool = False) -> Weighting:
    """CAGrad as a :class:`~mtl_jax.weighting.base.Weighting`."""
    if c < 0:
        raise ValueError(f"CAGrad's c must be >= 0; got {c}.")
    return stateless(lambda gram: cagrad_weights(gram, c, rescale))
