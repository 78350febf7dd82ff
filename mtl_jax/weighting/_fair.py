"""The alpha-fair allocation ``G w = w^(-1/alpha)`` (w > 0), solved exactly by damped Newton.

Nash-MTL (Navon et al. 2022, alpha = 1) and FairGrad (Ban & Ji 2024, any alpha > 0) choose the
weights of ``d = J^T w`` so that ``g_i . d = (G w)_i = w_i^(-1/alpha)``: the stationarity
condition of the strictly convex ``1/2 w^T G w - sum_i h(w_i)`` (``h' = w^(-1/alpha)``), whose
solution is unique when it exists. Newton's method on it, in the scaled variables ``Delta / w``,
with a step that keeps ``w > 0`` and Armijo backtracking, finds it to machine precision.
Departures (the official solvers fail when no solution exists): tasks with a zero gradient get
weight 0, and the system is solved on the cosine matrix ``C + K eps I`` (negative eigenvalues
clipped), which changes an existing solution by ``O(K eps)``. Derivation and accuracy:
``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["alpha_fair_weights", "psd_part"]


def psd_part(gram: jax.Array) -> jax.Array:
    """``G`` with its (rounding-level) negative eigenvalues set to zero."""
    lam, vecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
    return (vecs * jnp.clip(lam, 0.0)) @ vecs.T


def _utility(w: jax.Array, alpha: float, coef: jax.Array) -> jax.Array:
    """``sum_i coef_i h(w_i)`` with ``h' = w^(-1/alpha)``."""
    if alpha == 1.0:
        return jnp.sum(coef * jnp.log(w))
    p = 1.0 - 1.0 / alpha
    return jnp.sum(coef * w**p) / p


def _marginal(w: jax.Array, alpha: float) -> jax.Array:
    """``h'(w) = w^(-1/alpha)``."""
    return 1.0 / w if alpha == 1.0 else w ** (-1.0 / alpha)


def _curvature_scaled(w: jax.Array, alpha: float) -> jax.Array:
    """``w^2 (-h''(w)) = w^(1 - 1/alpha) / alpha``: the barrier part of the scaled Hessian."""
    return jnp.ones_like(w) if alpha == 1.0 else w ** (1.0 - 1.0 / alpha) / alpha


def _solve_cosine_system(
    cosines: jax.Array, coef: jax.Array, active: jax.Array, alpha: float, max_iter: int
) -> jax.Array:
    """``beta > 0`` solving ``(C + delta I) beta = coef * beta^(-1/alpha)`` on the active tasks."""
    num = cosines.shape[0]
    dtype = cosines.dtype
    eps = float(jnp.finfo(dtype).eps)
    on = active.astype(dtype)
    delta = num * eps
    # Inactive tasks are decoupled (identity rows, coefficient 1): their equation gives beta = 1,
    # which the caller replaces by 0.
    C = psd_part(cosines) * on[:, None] * on[None, :] + delta * jnp.eye(num, dtype=dtype)
    C = C + jnp.diag(1.0 - on)
    coef = jnp.where(active, coef, 1.0)

    def objective(beta: jax.Array) -> jax.Array:
        return 0.5 * beta @ C @ beta - _utility(beta, alpha, coef)

    # Start on the ray through 1 at its optimum: c^(1 + 1/alpha) = sum(coef) / (1^T C 1).
    c = (jnp.sum(coef) / jnp.sum(C)) ** (alpha / (alpha + 1.0))
    beta0 = jnp.full(num, c, dtype)
    tol = 16.0 * num * eps

    def cond(carry):
        _, _, it, done = carry
        return (~done) & (it < max_iter)

    def body(carry):
        beta, f, it, _ = carry
        scaled_grad = beta * (C @ beta) - coef * beta * _marginal(beta, alpha)  # D grad f
        scaled_hess = beta[:, None] * C * beta[None, :] + jnp.diag(
            coef * _curvature_scaled(beta, alpha)
        )
        s = -jnp.linalg.solve(scaled_hess, scaled_grad)
        decrement_sq = -(scaled_grad @ s)  # lambda^2 = s^T H_s s
        step = beta * s
        # Largest step keeping beta > 0 (99% of the way to the boundary), then Armijo backtracking.
        shrink = jnp.where(s < 0, -0.99 / jnp.where(s < 0, s, -1.0), jnp.inf)
        t0 = jnp.minimum(1.0, jnp.min(shrink))

        def ls_cond(ls):
            t, f_t, k = ls
            return (f_t > f - 0.25 * t * decrement_sq) & (k < 60)

        def ls_body(ls):
            t, _, k = ls
            t = 0.5 * t
            return t, objective(beta + t * step), k + 1

        t, f_new, _ = jax.lax.while_loop(ls_cond, ls_body, (t0, objective(beta + t0 * step), 0))
        ok = jnp.isfinite(f_new) & (f_new <= f) & jnp.all(jnp.isfinite(step))
        beta_new = jnp.where(ok, beta + t * step, beta)
        done = (~ok) | (decrement_sq <= tol * tol) | (f_new >= f)
        return beta_new, jnp.where(ok, f_new, f), it + 1, done

    carry = (beta0, objective(beta0), jnp.int32(0), jnp.bool_(False))
    beta, *_ = jax.lax.while_loop(cond, body, carry)
    return beta


@functools.partial(jax.jit, static_argnames=("alpha", "max_iter"))
def alpha_fair_weights(gram: jax.Array, alpha: float = 1.0, max_iter: int = 100) -> jax.Array:
    """Solves ``G w = w^(-1/alpha)`` (``w > 0``) for ``G[K, K]``; zero weights for zero gradients.

    Solved on the cosine matrix: with ``n_i = |g_i|`` and ``w = beta / n``, the system reads
    ``C beta = n^(1/alpha - 1) beta^(-1/alpha)``, whose scale is that of the cosines whatever the
    gradient norms; the regularisation ``delta I`` (``delta = K eps``) is then relative to every
    task's own scale. Tasks whose gradient norm is below ``eps`` times the largest are left out
    (weight 0). The overall scale is handled exactly: ``G = m^2 G^`` maps to
    ``w = m^(-2 alpha / (alpha + 1)) w^``.

    Args:
      gram: ``G[K, K]``, symmetric positive semi-definite.
      alpha: the fairness parameter (> 0; 1 is the Nash bargaining solution).
      max_iter: bound on Newton iterations.

    Returns:
      ``w[K] >= 0``.
    """
    dtype = gram.dtype
    eps = float(jnp.finfo(dtype).eps)
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    top = jnp.max(norms)
    active = norms > eps * top
    top = jnp.where(top > 0, top, 1.0)
    unit_norms = jnp.where(active, norms / top, 1.0)  # in (eps, 1]
    safe = jnp.where(active, norms, 1.0)
    cosines = gram / (safe[:, None] * safe[None, :])
    coef = 1.0 if alpha == 1.0 else unit_norms ** (1.0 / alpha - 1.0)
    beta = _solve_cosine_system(
        cosines, jnp.broadcast_to(coef, norms.shape), active, alpha, max_iter
    )
    w_unit = beta / unit_norms  # solves G^ w = w^(-1/alpha) for G^ = G / top^2
    w = w_unit * top ** (-2.0 * alpha / (alpha + 1.0))
    return jnp.where(active, w, 0.0)
