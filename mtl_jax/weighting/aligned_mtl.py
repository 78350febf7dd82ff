"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for
Multi-Task Learning", CVPR 2023).

The task gradients are replaced by aligned ones, orthogonal with equal norms (Algorithm 1): in
Gram space, with ``G = V L V^T``, the update is ``J^T B w`` with the balance transformation
``B = sqrt(lambda_R) V_r L_r^(-1/2) V_r^T`` over the eigenvalues above ``max(L) K eps``;
``lambda_R`` is the smallest kept eigenvalue (``scale_mode="min"``), their median or their mean
(``"rmse"``), as the official code (SamsungLabs/MTL ``ProcrustesSolver``). Default preference all
ones (official; TorchJD uses ``1/K``). Departure: the rank tolerance uses the eps of G's dtype
(the official code always float32's). Aligned-MTL-UB is this weighting on representation
gradients (:class:`mtl_jax.RepresentationWeighting`). Details: ``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtl_jax.weighting._pref import check_pref, pref_array
from mtl_jax.weighting.base import Weighting, stateless

__all__ = ["SCALE_MODES", "aligned_mtl_weighting", "aligned_mtl_weights", "balance_transformation"]

SCALE_MODES = ("min", "median", "rmse")


def balance_transformation(gram: jax.Array, scale_mode: str = "min") -> jax.Array:
    """``B[K, K] = sqrt(lambda_R) V_r L_r^(-1/2) V_r^T``; the identity when G has rank 0."""
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"Unknown scale_mode {scale_mode!r}; choose from {SCALE_MODES}.")
    num = gram.shape[0]
    eps = float(jnp.finfo(gram.dtype).eps)
    lam, vecs = jnp.linalg.eigh(0.5 * (gram + gram.T))  # ascending
    tol = jnp.max(lam) * num * eps
    kept = lam > tol
    rank = jnp.sum(kept)
    first = num - rank  # the kept eigenvalues are lam[first:], the largest ones
    if scale_mode == "min":
        scale = lam[jnp.minimum(first, num - 1)]
    elif scale_mode == "median":  # torch.median: the lower of the two middle values
        scale = lam[jnp.minimum(first + (rank - 1) // 2, num - 1)]
    else:
        scale = jnp.sum(jnp.where(kept, lam, 0.0)) / jnp.maximum(rank, 1)
    inv_sqrt = jnp.where(kept, 1.0 / jnp.sqrt(jnp.where(kept, lam, 1.0)), 0.0)
    B = jnp.sqrt(jnp.clip(scale, 0.0)) * (vecs * inv_sqrt) @ vecs.T
    return jnp.where(rank > 0, B, jnp.eye(num, dtype=gram.dtype))


@functools.partial(jax.jit, static_argnames=("scale_mode",))
def aligned_mtl_weights(
    gram: jax.Array, pref: jax.Array | None = None, scale_mode: str = "min"
) -> jax.Array:
    """Aligned-MTL's weights ``B @ pref`` (``pref`` defaults to all ones)."""
    num = gram.shape[0]
    pref = jnp.ones(num, gram.dtype) if pref is None else pref.astype(gram.dtype)
    return balance_transformation(gram, scale_mode) @ pref


def aligned_mtl_weighting(
    scale_mode: str = "min", pref_vector: Sequence[float] | jax.Array | None = None
) -> Weighting:
    """Aligned-MTL as a :class:`~mtl_jax.weighting.base.Weighting`."""
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"Unknown scale_mode {scale_mode!r}; choose from {SCALE_MODES}.")
    pref = pref_array(pref_vector, "aligned_mtl")

    def fn(gram: jax.Array) -> jax.Array:
        check_pref(pref, gram.shape[0], "aligned_mtl")
        return aligned_mtl_weights(gram, pref, scale_mode)

    return stateless(fn)
