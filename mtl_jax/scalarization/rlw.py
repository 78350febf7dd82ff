"""Random loss weighting, RLW (Lin, Ye, Xu, Shi & Zhang, TMLR 2022) on the losses.

``loss = sum_k w_k L_k`` with a fresh ``w = softmax(N(0, I))`` per call, drawn from the PRNG key in
the state (LibMTL ``RLW``). The same weights as the aggregator :func:`mtl_jax.aggregation.random_weighting`
(:mod:`mtl_jax.weighting.rlw`), at the cost of one backward pass. See ``docs/methods.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from mtl_jax.weighting.rlw import random_weights

from .base import Scalarizer, check_losses, check_num_tasks, no_post_step, weighted_sum

__all__ = ["RLWState", "rlw"]


class RLWState(NamedTuple):
    """State of :func:`rlw`: the PRNG key, split at every call."""

    key: jax.Array


def rlw(seed: int = 0) -> Scalarizer:
    """Random loss weighting (Lin et al., TMLR 2022): ``sum_k w_k L_k``, ``w = softmax(N(0, I))``.

    A fresh draw per call, from the key in the state (LibMTL ``RLW``); see also the aggregator
    :func:`mtl_jax.aggregation.random_weighting`.
    """

    def init(num_tasks: int) -> RLWState:
        check_num_tasks(num_tasks, "rlw")
        return RLWState(jax.random.key(seed))

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, None, "rlw")
        key, sub = jax.random.split(state.key)
        weights = random_weights(losses.shape[0], sub, losses.dtype)
        return weighted_sum(losses, weights), weights, RLWState(key)

    return Scalarizer(init, scalarize, no_post_step)
