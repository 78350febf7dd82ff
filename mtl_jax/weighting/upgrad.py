"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

Every task gradient projected onto the dual cone ``{d : J d >= 0}``, averaged with the preference
``p`` (default ``1/K``): ``d = sum_i p_i pi_J(g_i)``, ``pi_J(J^T u) = J^T v(u)``,
``v(u) = argmin_{v >= u} v^T G v`` (Proposition 1): K small QPs sharing G, solved exactly under
one ``vmap`` by :mod:`mtl_jax.weighting._qp`. Non-conflicting; linear under scaling; weighted;
permutation equivariant with uniform preference; the mean when no pair conflicts. Departure from
TorchJD/LibMTL: no trace normalisation plus ``1e-4 I`` before quadprog in float64 (which moves
the answer by ~1e-4); the projections are exact up to rounding, in G's own dtype. Details:
``docs/methods.md``, "Method notes".
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
