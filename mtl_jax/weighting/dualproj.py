"""DualProj (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; the
projection of GEM, Lopez-Paz & Ranzato 2017, eq. 11).

DualProj averages the task gradients with the preference ``p`` (default ``1/K``) and projects the
result onto the dual cone ``{d : J d >= 0}``:

    d = pi_J(J^T p) = J^T v,    v = argmin_{v >= p} v^T G v,

one K x K QP solved exactly by :mod:`mtl_jax.weighting._qp`.

Properties: non-conflicting; weighted; permutation equivariant with uniform preference; equal to
the mean whenever the mean does not conflict with any task (``G p >= 0``); positively homogeneous.
Unlike UPGrad it is not linear under scaling.

Departure from TorchJD: no ``1e-4`` regularisation of the trace-normalised G (see
:mod:`mtl_jax.weighting.upgrad`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from mtl_jax.weighting._pref import pref_array, pref_or
from mtl_jax.weighting._qp import project_weights
from mtl_jax.weighting.base import Weighting, stateless

__all__ = ["dualproj_weighting", "dualproj_weights"]


@jax.jit
def dualproj_weights(gram: jax.Array, pref: jax.Array | None = None) -> jax.Array:
    """DualProj's weights ``w[K]`` (``pref`` defaults to ``1/K``)."""
    num = gram.shape[0]
    return project_weights(gram, pref_or(pref, num, gram.dtype, 1.0 / num, "dualproj"))


def dualproj_weighting(pref_vector: Sequence[float] | jax.Array | None = None) -> Weighting:
    """DualProj as a :class:`~mtl_jax.weighting.base.Weighting`."""
    pref = pref_array(pref_vector, "dualproj")
    return stateless(lambda gram: dualproj_weights(gram, pref))
