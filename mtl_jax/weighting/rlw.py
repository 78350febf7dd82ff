"""Random loss weighting, RLW (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022).

At every step the weights are drawn afresh, ``w = softmax(z)`` with ``z ~ N(0, I_K)`` (the
paper's default distribution; LibMTL's ``RLW`` and TorchJD's ``Random``). As an aggregator it
combines the task gradients, ``d = sum_k w_k g_k`` (TorchJD's ``Random``); as a loss-only method
(:func:`mtl_jax.scalarization.rlw`) it weights the losses, which gives the same update at a
fraction of the cost. The draw comes from the PRNG key in the aggregator state, so a seed
reproduces a run.
"""

from __future__ import annotations

import jax

from mtl_jax.weighting.base import Weighting, stateless_random

__all__ = ["random_weighting", "random_weights"]


def random_weights(num_tasks: int, key: jax.Array, dtype=None) -> jax.Array:
    """``softmax(z)``, ``z ~ N(0, I_K)``: weights on the simplex."""
    z = jax.random.normal(key, (num_tasks,), dtype=dtype)
    return jax.nn.softmax(z)


def random_weighting() -> Weighting:
    """RLW as a :class:`~mtl_jax.weighting.base.Weighting` (a fresh draw from ``key`` per call)."""
    return stateless_random(lambda gram, key: random_weights(gram.shape[0], key, gram.dtype))
