"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

UPGrad ("unconflicting projection of gradients") projects every task gradient ``g_i`` onto the
dual cone of the rows of ``J``, ``{d : J d >= 0}``, and averages the projections with the
preference weights ``p`` (default ``p = 1/K``):

    d = sum_i p_i pi_J(g_i),       pi_J(J^T u) = J^T v(u),   v(u) = argmin_{v >= u} v^T G v

(Proposition 1), so the weights are ``w = sum_i v(p_i e_i)``: K small QPs sharing G, solved
exactly by the Gram-form Lawson-Hanson active-set method of :mod:`mtl_jax.weighting._qp` (one
``vmap``).

Properties (proved in the paper): non-conflicting (``J d >= 0``); linear under scaling
(``d(diag(c) J)`` is linear in ``c > 0``, since the dual cone does not change); weighted
(``d`` is a combination of the task gradients); permutation equivariant with uniform preference;
``d`` equals the mean when no pair of tasks conflicts (every ``g_i`` is then in the cone).

Departure from TorchJD/LibMTL: they normalise G by its trace and add ``1e-4 I`` before calling
quadprog in float64 (regularisation that moves the answer by ~1e-4); here the projections are
exact up to rounding, in G's own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mtl_jax.weighting._pref import pref_array, pref_or
from mtl_jax.weighting._qp import project_weights
from mtl_jax.weighting.base import Weighting, stateless

__all__ = ["upgrad_weighting", "upgrad_weights"]


@jax.jit
def _upgrad_from_pref(gram: jax.Array, pref: jax.Array) -> jax.Array:
    projections = project_weights(gram, jnp.diag(pref))  # row i: v(p_i e_i)
    return jnp.sum(projections, axis=0)


@jax.jit
def upgrad_weights(gram: jax.Array, pref: jax.Array | None = None) -> jax.Array:
    """UPGrad's weights ``w[K]`` (``pref`` defaults to ``1/K``)."""
    num = gram.shape[0]
    return _upgrad_from_pref(gram, pref_or(pref, num, gram.dtype, 1.0 / num, "upgrad"))


def upgrad_weighting(pref_vector: Sequence[float] | jax.Array | None = None) -> Weighting:
    """UPGrad as a :class:`~mtl_jax.weighting.base.Weighting`."""
    pref = pref_array(pref_vector, "upgrad")
    return stateless(lambda gram: upgrad_weights(gram, pref))
