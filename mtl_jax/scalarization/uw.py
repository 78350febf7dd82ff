"""Uncertainty weighting, UW (Kendall, Gal & Cipolla, CVPR 2018), log-variance form.

``loss = sum_k 1/2 exp(-s_k) L_k + 1/2 s_k`` with learnable log-variances ``s`` (init 0; LibMTL
starts at -0.5), stepped by :func:`~mtl_jax.scalarization.learned.learned_scalarizer`.
See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from .base import Scalarizer
from .learned import adam_unless_given, learned_scalarizer

__all__ = ["uw"]


def uw(
    learning_rate: float = 1e-3, optimizer: optax.GradientTransformation | None = None
) -> Scalarizer:
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), log-variance form.

    ``loss = sum_k 1/2 exp(-s_k) L_k + 1/2 s_k`` with learnable log-variances ``s = log sigma^2``
    (init 0, i.e. uniform weights; LibMTL starts at -0.5); weights ``1/2 exp(-s_k)``. ``s`` takes one
    step of ``optimizer`` (default ``optax.adam(learning_rate)``; the paper trains ``s`` with the
    network's optimizer, so pass that one for fidelity) per call on ``d loss / d s =
    1/2 - 1/2 exp(-s) L``. For fixed losses ``s`` converges to ``log L_k``.
    """
    return learned_scalarizer(
        "uw",
        adam_unless_given(learning_rate, optimizer),
        lambda losses, s: jnp.sum(0.5 * jnp.exp(-s) * losses + 0.5 * s),
        lambda s: 0.5 * jnp.exp(-s),
    )
