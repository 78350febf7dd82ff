"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), gradient part.

IMTL-G finds the update ``d = sum_k a_k g_k`` with ``sum_k a_k = 1`` whose projections onto every
task's unit direction are equal: ``d . u_k = const`` with ``u_k = g_k / |g_k|``. The paper's closed
form (Sec. 3.2) is ``a_{2:K} = g_1 U^T (D U^T)^{-1}``, ``a_1 = 1 - sum a_{2:K}`` with
``D = [g_1 - g_k]`` and ``U = [u_1 - u_k]``. Equivalently ``G a = lambda n`` with ``n_k = |g_k|``,
so ``a = G^+ n / (1^T G^+ n)``: this Gram-space form (also TorchJD's) uses a pseudo-inverse, so
rank-deficient G gives finite weights; ``1^T G^+ n = 0`` gives zero weights.

Departure: the official code and LibMTL invert ``D U^T`` without a guard (NaN on parallel or
zero gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, diag_scale, stateless

__all__ = ["imtl_g_weighting", "imtl_g_weights"]


@jax.jit
def imtl_g_weights(gram: jax.Array) -> jax.Array:
    """IMTL-G's weights ``a[K]`` (summing to 1) from ``G[K, K]``."""
    G = gram / diag_scale(gram)
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(G), 0.0))
    v = jnp.linalg.pinv(G, hermitian=True) @ norms
    total = jnp.sum(v)
    ok = jnp.abs(total) > jnp.finfo(G.dtype).eps * jnp.sum(jnp.abs(v))
    return jnp.where(ok, v / jnp.where(ok, total, 1.0), jnp.zeros_like(v))


def imtl_g_weighting() -> Weighting:
    """IMTL-G as a :class:`~mtl_jax.weighting.base.Weighting`."""
    return stateless(imtl_g_weights)
