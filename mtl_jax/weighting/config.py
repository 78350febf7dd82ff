"""ConFIG (Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", ICLR 2025; arXiv 2408.11104), in Gram space.

``g_u = U^+ p`` (``U``: the unit task gradients, ``p`` the preference), ``d = (sum_i g_i .
g_u/|g_u|) g_u/|g_u|`` (eq. 2): equal cosine with every task for independent gradients; as weights,
``w_i`` proportional to ``y_i / |g_i|`` with ``y = C^+ p`` on the cosine matrix ``C``. Departures:
the least-squares problem is solved through ``C`` by a rank-revealing pivoted Cholesky ``C = L L^T``
and a QR solve in the factor's coordinates (as well conditioned as the official ``lstsq`` on the K x
P matrix; ranks below ``K eps`` dropped), not ``torch.linalg.lstsq``; zero gradients get zero unit
vectors (the official ``nan_to_num``). float32 error up to ~8e-5 on K = 40 conflicting gradients, at
the floor set by the float32 Gram matrix. Derivation and measurements: ``docs/methods.md``, "Method
notes".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from mtl_jax.weighting._pref import pref_array, pref_or
from mtl_jax.weighting.base import Weighting, stateless

__all__ = ["config_weighting", "config_weights"]


_HIGHEST = jax.lax.Precision.HIGHEST


def _pivoted_cholesky(mat: jax.Array, tol: float) -> tuple[jax.Array, jax.Array]:
    """Rank-revealing Cholesky ``mat ~ L L^T`` of a PSD matrix (complete diagonal pivoting).

    Step j picks the row ``i`` with the largest remaining Schur-complement diagonal ``d_i`` and
    sets column j of ``L`` to ``(mat[:, i] - L L[i]^T) / sqrt(d_i)`` on the rows not picked yet;
    it stops (the remaining columns are zero) once ``max d_i <= tol``.

    Args:
      mat: ``[K, K]`` symmetric PSD.
      tol: the stopping threshold on the remaining diagonal.

    Returns:
      ``(L[K, K], rank)``: rows in ``mat``'s order, column j the j-th pivot's, columns ``>= rank``
      zero.
    """
    num = mat.shape[0]

    def step(j: jax.Array, carry: tuple) -> tuple:
        factor, diag, picked = carry
        remaining = jnp.where(picked, -jnp.inf, diag)
        i = jnp.argmax(remaining)
        pivot = remaining[i]
        ok = pivot > tol
        col = mat[:, i] - jnp.matmul(factor, factor[i], precision=_HIGHEST)
        col = jnp.where(picked, 0.0, col) / jnp.sqrt(jnp.where(ok, pivot, 1.0))
        col = jnp.where(ok, col.at[i].set(jnp.sqrt(jnp.where(ok, pivot, 1.0))), 0.0)
        return factor.at[:, j].set(col), diag - col**2, picked.at[i].set(picked[i] | ok)

    init = (jnp.zeros_like(mat), jnp.diagonal(mat), jnp.zeros(num, bool))
    factor, _, picked = jax.lax.fori_loop(0, num, step, init)
    return factor, jnp.sum(picked)


def _least_squares_in_factor(
    factor: jax.Array, rank: jax.Array, pref: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``z = L^+ p`` and the minimum-norm ``y`` with ``L^T y = z`` (so ``y = (L L^T)^+ p``).

    Thin QR of the first ``rank`` columns (``L = Q R``): ``z = R^-1 Q^T p``, ``y = Q R^-T z``.
    ``factor``: ``[K, K]``, columns ``>= rank`` zero; ``z``: ``[K]`` (zero from ``rank`` on).
    """
    num = factor.shape[0]
    cols = jnp.arange(num) < rank
    q, r = jnp.linalg.qr(factor)
    r = jnp.where(cols[:, None] & cols[None, :], r, jnp.eye(num, dtype=r.dtype))
    qt_p = jnp.where(cols, jnp.matmul(q.T, pref, precision=_HIGHEST), 0.0)
    z = solve_triangular(r, qt_p, lower=False)
    v = solve_triangular(r, z, lower=False, trans="T")
    y = jnp.matmul(q, jnp.where(cols, v, 0.0), precision=_HIGHEST)
    return z, y


@jax.jit
def config_weights(gram: jax.Array, pref: jax.Array | None = None) -> jax.Array:
    """ConFIG's weights ``w[K]`` (``d = sum_k w_k g_k``) from ``G[K, K]``.

    ``C = L L^T`` (pivoted Cholesky, see the module docstring), ``z = L^+ p`` (``|g_u| = |z|``,
    ``C y = L z``), ``y = C^+ p``; ``w_i = (sum_j |g_j| (L z)_j / |z|^2) y_i / |g_i|``.
    """
    num = gram.shape[0]
    dtype = gram.dtype
    pref = pref_or(pref, num, dtype, 1.0, "config")
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    nonzero = norms > 0
    safe = jnp.where(nonzero, norms, 1.0)
    cosines = gram / (safe[:, None] * safe[None, :]) * (nonzero[:, None] & nonzero[None, :])
    cosines = 0.5 * (cosines + cosines.T)
    eps = float(jnp.finfo(dtype).eps)
    factor, rank = _pivoted_cholesky(cosines, num * eps)
    z, y = _least_squares_in_factor(factor, rank, pref)
    direction_sq = z @ z  # |g_u|^2 = y^T C y
    length_times_norm = norms @ jnp.matmul(factor, z, precision=_HIGHEST)  # sum_j g_j . g_u
    ok = direction_sq > 0
    scale = jnp.where(ok, length_times_norm / jnp.where(ok, direction_sq, 1.0), 0.0)
    return jnp.where(nonzero, scale * y / safe, 0.0)


def config_weighting(pref_vector: Sequence[float] | jax.Array | None = None) -> Weighting:
    """ConFIG as a :class:`~mtl_jax.weighting.base.Weighting`."""
    pref = pref_array(pref_vector, "config")
    return stateless(lambda gram: config_weights(gram, pref))
