"""The exact minimum-norm point of a convex hull, in Gram space (Wolfe 1976), jit-able.

Given ``G = J J^T`` of K points ``g_k``, find ``w`` in the simplex minimising ``w^T G w``. Wolfe's
active-set algorithm ("Finding the nearest point in a polytope", Math. Programming 11, 1976) keeps a
corral of affinely independent points; its answer is the solution of the final KKT system (not an
iterate of Frank-Wolfe, as in Sener & Koltun's MGDA code), and the KKT system stays non-singular for
rank-deficient G. Safeguards: G normalised by its largest diagonal entry, a major cycle that does
not decrease ``|x|^2`` ends the search, a non-finite KKT solution keeps the last point, bounded
loops. The cycles and the safeguards in full: ``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import diag_scale

__all__ = ["min_norm_weights"]


def _affine_min_norm(gram: jax.Array, corral: jax.Array) -> jax.Array:
    """Weights of the minimum-norm point of aff{g_k : corral[k]} (zero outside the corral)."""
    num = gram.shape[0]
    inside = corral.astype(gram.dtype)
    block = gram * inside[:, None] * inside[None, :] + jnp.diag(1.0 - inside)
    kkt = jnp.zeros((num + 1, num + 1), gram.dtype)
    kkt = kkt.at[:num, :num].set(block).at[:num, num].set(inside).at[num, :num].set(inside)
    rhs = jnp.zeros(num + 1, gram.dtype).at[num].set(1.0)
    return jnp.linalg.solve(kkt, rhs)[:num] * inside


def _minor_cycle(gram: jax.Array, lam: jax.Array, corral: jax.Array, tiny: float, limit: int):
    """Moves ``lam`` to the affine minimiser of the corral, dropping points on the way."""

    def cond(carry):
        _, _, it, done = carry
        return (~done) & (it < limit)

    def body(carry):
        lam, corral, it, _ = carry
        y = _affine_min_norm(gram, corral)
        broken = ~jnp.all(jnp.isfinite(y))
        interior = jnp.all(jnp.where(corral, y > tiny, True))
        blocking = corral & (y <= tiny)
        ratio = jnp.where(blocking, lam / jnp.where(blocking, lam - y, 1.0), jnp.inf)
        theta = jnp.clip(jnp.min(ratio), 0.0, 1.0)
        moved = lam + theta * (y - lam)
        moved_corral = corral & (moved > tiny)
        moved = jnp.where(moved_corral, moved, 0.0)
        moved = moved / jnp.sum(moved)
        new_lam = jnp.where(broken, lam, jnp.where(interior, y, moved))
        new_corral = jnp.where(broken | interior, corral, moved_corral)
        # A broken solve (affinely dependent corral, from rounding) drops the newest weight-free
        # points so that the corral matches the support of the kept point.
        new_corral = jnp.where(broken, corral & (lam > tiny), new_corral)
        return new_lam, new_corral, it + 1, broken | interior

    lam, corral, _, _ = jax.lax.while_loop(
        cond, body, (lam, corral, jnp.int32(0), jnp.bool_(False))
    )
    return lam, corral


@functools.partial(jax.jit, static_argnames=("max_iter",))
def min_norm_weights(gram: jax.Array, max_iter: int | None = None) -> jax.Array:
    """``argmin_{w in simplex} w^T G w``: the weights of the min-norm point of conv{g_k}.

    Args:
      gram: ``G[K, K]``, symmetric positive semi-definite.
      max_iter: bound on major cycles (default ``10 K + 50``).

    Returns:
      ``w[K]``, non-negative, summing to 1. All-zero G gives the uniform weights. The weights are
      invariant to scaling G.
    """
    num = gram.shape[0]
    dtype = gram.dtype
    eps = float(jnp.finfo(dtype).eps)
    tiny = 16 * eps
    tol = 8 * eps
    limit = max_iter if max_iter is not None else 10 * num + 50
    G = gram / diag_scale(gram)

    start = jnp.argmin(jnp.diagonal(G))
    lam0 = jax.nn.one_hot(start, num, dtype=dtype)
    corral0 = lam0 > 0

    def cond(carry):
        _, _, it, done, _ = carry
        return (~done) & (it < limit)

    def body(carry):
        lam, corral, it, _, _ = carry
        g_lam = G @ lam
        xx = lam @ g_lam
        j = jnp.argmin(g_lam)
        converged = (xx - g_lam[j] <= tol) | corral[j]
        new_lam, new_corral = jax.lax.cond(
            converged,
            lambda: (lam, corral),
            lambda: _minor_cycle(G, lam, corral.at[j].set(True), tiny, num + 2),
        )
        improved = new_lam @ G @ new_lam < xx
        stop = converged | ~improved
        lam = jnp.where(stop, lam, new_lam)
        corral = jnp.where(stop, corral, new_corral)
        return lam, corral, it + 1, stop, xx

    lam, _, _, _, _ = jax.lax.while_loop(
        cond, body, (lam0, corral0, jnp.int32(0), jnp.bool_(False), jnp.asarray(jnp.inf, dtype))
    )
    all_zero = jnp.max(jnp.abs(gram)) == 0
    return jnp.where(all_zero, jnp.full(num, 1.0 / num, dtype), lam)
