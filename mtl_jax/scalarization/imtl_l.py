"""IMTL-L (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), the loss balance.

``loss = sum_k exp(s_k) L_k - s_k`` with learnable log-scales ``s`` (init 0), stepped by
:func:`~mtl_jax.scalarization.learned.learned_scalarizer`; drives every scaled loss
``exp(s_k) L_k`` towards 1. IMTL-G, the gradient part, is the aggregator :func:`mtl_jax.aggregation.imtl_g`.
See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from .base import Scalarizer
from .learned import adam_unless_given, learned_scalarizer

__all__ = ["imtl_l"]


def imtl_l(
    learning_rate: float = 1e-3, optimizer: optax.GradientTransformation | None = None
) -> Scalarizer:
    """IMTL-L (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), loss balance.

    ``loss = sum_k exp(s_k) L_k - s_k`` with learnable log-scales ``s`` (init 0); weights
    ``exp(s_k)``; ``s`` is stepped like :func:`~mtl_jax.scalarization.uw`'s on ``d loss / d s =
    exp(s) L - 1``, which drives every scaled loss ``exp(s_k) L_k`` towards 1.
    """
    return learned_scalarizer(
        "imtl_l",
        adam_unless_given(learning_rate, optimizer),
        lambda losses, s: jnp.sum(jnp.exp(s) * losses - s),
        jnp.exp,
    )
