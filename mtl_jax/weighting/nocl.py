"""CoNAL's conflict-noticing rule, "nocl" (Yue, Zhang & Liang, "Learning Conflict-Noticed
Architecture for Multi-Task Learning", AAAI 2023).

For every shared block, if any pair of task gradients has a negative inner product
(``g_i . g_j < 0`` for some ``i != j``), the block gets no update at this step; otherwise it gets
the mean of the task gradients (official code ``NOCLGrad._project_conflicting``: zero the whole
block on the first conflicting pair, then average). While conflicts persist, tasks can only lower
their losses through their private modules and the architecture weights, which is how conflicts
steer CoNAL towards earlier branching.

A "block" is a group of the aggregator's ``granularity``: pass a grouping function that maps a
parameter path to its block (CoNAL uses the backbone's stages, e.g. ResNet's ``layer1..layer4``),
or :func:`mtl_jax.gramian.by_module` for per-module blocks; ``"global"`` treats all shared parameters as one
block. The rule is positively homogeneous and permutation equivariant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, stateless

__all__ = ["nocl_weighting", "nocl_weights"]


@jax.jit
def nocl_weights(gram: jax.Array) -> jax.Array:
    """``1/K`` if no off-diagonal entry of ``G`` is negative, else 0."""
    num = gram.shape[0]
    off_diagonal = ~jnp.eye(num, dtype=bool)
    conflict = jnp.any(off_diagonal & (gram < 0))
    return jnp.where(conflict, 0.0, jnp.full(num, 1.0 / num, gram.dtype))


def nocl_weighting() -> Weighting:
    """CoNAL's nocl rule as a :class:`~mtl_jax.weighting.base.Weighting`."""
    return stateless(nocl_weights)
