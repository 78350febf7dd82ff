"""DualProj (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; the
projection of GEM, Lopez-Paz & Ranzato 2017, eq. 11).

The preference-weighted mean (default ``1/K``) projected onto the dual cone ``{d : J d >= 0}``:
``d = J^T v``, ``v = argmin_{v >= p} v^T G v``, one K x K QP solved exactly by
:mod:`mtl_jax.weighting._qp`. Non-conflicting; permutation equivariant with uniform preference;
the mean whenever the mean conflicts with no task; positively homogeneous; unlike UPGrad not
linear under scaling. Departure from TorchJD: by default no ``1e-4`` regularisation of the
trace-normalised G; ``reg_eps=1e-4`` applies it (see :mod:`mtl_jax.weighting.upgrad`). Details: ``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from mtl_jax.weighting._pref import pref_array, pref_or
from mtl_jax.weighting._qp import project_weights
from mtl_jax.weighting.base import Weighting, stateless
from mtl_jax.weighting.upgrad import check_reg_eps, torchjd_regularized

__all__ = ["dualproj_weighting", "dualproj_weights"]


@jax.jit
def dualproj_weights(gram: jax.Array, pref: jax.Array | None = None) -> jax.Array:
    """DualProj's weights ``w[K]`` (``pref`` defaults to ``1/K``)."""
    num = gram.shape[0]
    return project_weights(gram, pref_or(pref, num, gram.dtype, 1.0 / num, "dualproj"))


def dualproj_weighting(
    pref_vector: Sequence[float] | jax.Array | None = None, reg_eps: float = 0.0
) -> Weighting:
    """DualProj as a :class:`~mtl_jax.weighting.base.Weighting`; ``reg_eps > 0``: on TorchJD's
    regularised Gram matrix (:func:`mtl_jax.weighting.upgrad.torchjd_regularized`)."""
    pref = pref_array(pref_vector, "dualproj")
    reg_eps = check_reg_eps(reg_eps, "dualproj")
    return stateless(lambda gram: dualproj_weights(torchjd_regularized(gram, reg_eps), pref))
