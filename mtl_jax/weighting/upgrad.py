"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

Every task gradient projected onto the dual cone ``{d : J d >= 0}``, averaged with the preference
``p`` (default ``1/K``): ``d = sum_i p_i pi_J(g_i)``, ``pi_J(J^T u) = J^T v(u)``,
``v(u) = argmin_{v >= u} v^T G v`` (Proposition 1): K small QPs sharing G, solved exactly under
one ``vmap`` by :mod:`mtl_jax.weighting._qp`. Non-conflicting; linear under scaling; weighted;
permutation equivariant with uniform preference; the mean when no pair conflicts. Departure from
TorchJD/LibMTL: by default no trace normalisation plus ``1e-4 I`` before quadprog in float64;
the projections are exact up to rounding, in G's own dtype. That ridge moves the answer by
~1e-4 when the task gradients have similar norms, but not when they span many orders of
magnitude (instance-wise objectives: a sample the model fits has a near-zero gradient, the
exact weight on it grows like ``1/|g|``, the ridge caps it): ``reg_eps=1e-4`` solves TorchJD's
regularised problem ``G / tr(G) + reg_eps I`` (:func:`torchjd_regularized`). Details:
``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtl_jax.weighting._pref import pref_array, pref_or
from mtl_jax.weighting._qp import project_weights
from mtl_jax.weighting.base import Weighting, stateless

__all__ = ["torchjd_regularized", "upgrad_weighting", "upgrad_weights"]


def torchjd_regularized(gram: jax.Array, reg_eps: float) -> jax.Array:
    """TorchJD's ``regularize(normalize(G, 1e-4), reg_eps)``: ``G / tr(G) + reg_eps I``, and
    ``reg_eps I`` when ``tr(G) < 1e-4`` (``torchjd/_linalg/_gramian.py``); ``G`` unchanged for
    ``reg_eps = 0``."""
    if reg_eps == 0.0:
        return gram
    trace = jnp.trace(gram)
    safe = jnp.where(trace < 1e-4, jnp.ones_like(trace), trace)
    normalized = jnp.where(trace < 1e-4, jnp.zeros_like(gram), gram / safe)
    return normalized + reg_eps * jnp.eye(gram.shape[0], dtype=gram.dtype)


def check_reg_eps(reg_eps: float, method: str) -> float:
    reg_eps = float(reg_eps)
    if not reg_eps >= 0.0:
        raise ValueError(
            f"{method}: reg_eps must be >= 0 (0: the exact projection; TorchJD's default 1e-4); "
            f"got {reg_eps}."
        )
    return reg_eps


@jax.jit
def _upgrad_from_pref(gram: jax.Array, pref: jax.Array) -> jax.Array:
    projections = project_weights(gram, jnp.diag(pref))  # row i: v(p_i e_i)
    return jnp.sum(projections, axis=0)


@jax.jit
def upgrad_weights(gram: jax.Array, pref: jax.Array | None = None) -> jax.Array:
    """UPGrad's weights ``w[K]`` (``pref`` defaults to ``1/K``)."""
    num = gram.shape[0]
    return _upgrad_from_pref(gram, pref_or(pref, num, gram.dtype, 1.0 / num, "upgrad"))


def upgrad_weighting(
    pref_vector: Sequence[float] | jax.Array | None = None, reg_eps: float = 0.0
) -> Weighting:
    """UPGrad as a :class:`~mtl_jax.weighting.base.Weighting`; ``reg_eps > 0``: on TorchJD's
    regularised Gram matrix (:func:`torchjd_regularized`)."""
    pref = pref_array(pref_vector, "upgrad")
    reg_eps = check_reg_eps(reg_eps, "upgrad")
    return stateless(lambda gram: upgrad_weights(torchjd_regularized(gram, reg_eps), pref))
