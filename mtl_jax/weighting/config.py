"""ConFIG (Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", ICLR 2025; arXiv 2408.11104), in Gram space.

ConFIG's update (paper eq. 2; official ``conflictfree.grad_operator.ConFIG_update``) is

    g_u = U^+ p,   U = [g_1/|g_1|; ...; g_K/|g_K|],     d = (sum_i g_i . g_u/|g_u|) g_u/|g_u|,

with the preference ``p`` (all ones by default; its scale does not matter): ``g_u`` has the same
(preference-weighted) cosine with every task gradient, and the length is the sum of the
projections of the task gradients on that direction. It is a weighted sum of the task gradients:
with the cosine matrix ``C = U U^T`` and ``y = C^+ p``, ``g_u = U^T y = sum_i (y_i / |g_i|) g_i``
and ``|g_u|^2 = y^T C y``, so

    w_i = (sum_j |g_j| (C y)_j / (y^T C y)) * y_i / |g_i|.

Properties: when the task gradients are linearly independent, ``u_i . g_u = p_i`` for every task,
so ``d`` is non-conflicting (strictly, for positive ``p``) with equal cosine to every task;
linear under scaling (``d(diag(c) J)`` is linear in ``c > 0``: the direction only depends on the
unit gradients); permutation equivariant; positively homogeneous.

Departures from the official code: the pseudo-inverse is taken on the K x K cosine matrix (via its
eigen decomposition, eigenvalues below ``max K eps`` dropped) instead of ``torch.linalg.lstsq`` on
the K x P unit-gradient matrix; both give the minimum-norm least-squares solution, but in Gram
space singular values of ``U`` below ``sqrt(K eps)`` times the largest are treated as zero. Zero
gradients have zero unit vectors (the official ``nan_to_num``). The official two-task shortcut
(``ConFIG_update_double``) computes the same direction and is not special-cased.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtl_jax.weighting._pref import pref_array, pref_or
from mtl_jax.weighting.base import Weighting, stateless

__all__ = ["config_weighting", "config_weights"]


def _pinv_psd(mat: jax.Array) -> jax.Array:
    """Pseudo-inverse of a symmetric PSD matrix, eigenvalues below ``max K eps`` dropped."""
    num = mat.shape[0]
    eps = float(jnp.finfo(mat.dtype).eps)
    lam, vecs = jnp.linalg.eigh(0.5 * (mat + mat.T))
    kept = lam > jnp.max(lam) * num * eps
    inv = jnp.where(kept, 1.0 / jnp.where(kept, lam, 1.0), 0.0)
    return (vecs * inv) @ vecs.T


@jax.jit
def config_weights(gram: jax.Array, pref: jax.Array | None = None) -> jax.Array:
    """ConFIG's weights ``w[K]`` (``d = sum_k w_k g_k``) from ``G[K, K]``."""
    num = gram.shape[0]
    dtype = gram.dtype
    pref = pref_or(pref, num, dtype, 1.0, "config")
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    nonzero = norms > 0
    safe = jnp.where(nonzero, norms, 1.0)
    cosines = gram / (safe[:, None] * safe[None, :]) * (nonzero[:, None] & nonzero[None, :])
    y = _pinv_psd(cosines) @ pref
    Cy = cosines @ y
    direction_sq = y @ Cy  # |g_u|^2
    length_times_norm = norms @ Cy  # (sum_j g_j . g_u)
    ok = direction_sq > 0
    factor = jnp.where(ok, length_times_norm / jnp.where(ok, direction_sq, 1.0), 0.0)
    return jnp.where(nonzero, factor * y / safe, 0.0)


def config_weighting(pref_vector: Sequence[float] | jax.Array | None = None) -> Weighting:
    """ConFIG as a :class:`~mtl_jax.weighting.base.Weighting`."""
    pref = pref_array(pref_vector, "config")
    return stateless(lambda gram: config_weights(gram, pref))
