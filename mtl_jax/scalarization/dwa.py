"""Dynamic weight average, DWA (Liu, Johns & Davison, CVPR 2019).

``w_k = K softmax(r / T)_k`` with ``r_k`` the ratio of task k's average losses over the two
previous epochs (``w = 1`` until two epochs are complete, as LibMTL); ``loss = sum_k w_k L_k``.
Departure: an epoch is ``steps_per_epoch`` calls, counted in the state.
See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .base import (
    Scalarizer,
    check_losses,
    check_num_tasks,
    float_dtype,
    keep_if_finite,
    no_post_step,
    weighted_sum,
)

__all__ = ["DWAState", "dwa"]


class DWAState(NamedTuple):
    """State of :func:`dwa`: the running epoch sum, and the last two epoch averages."""

    loss_sum: jax.Array
    count: jax.Array
    history: jax.Array  # [2, K]: older, newer epoch averages
    num_epochs: jax.Array


def dwa(temperature: float = 2.0, steps_per_epoch: int = 1) -> Scalarizer:
    """Dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019).

    ``w_k(t) = K exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T)`` with ``r_k(t-1) = L_k(t-1) /
    L_k(t-2)``, the ratio of the task's average losses over the two previous epochs; ``w = 1``
    until two epochs are complete (LibMTL). ``loss = sum_k w_k L_k``. The state accumulates the
    losses of every call and closes an epoch every ``steps_per_epoch`` calls: pass your number of
    batches per epoch for the paper's epoch averages (the default 1 makes every step an epoch).
    """
    if not temperature > 0:
        raise ValueError(f"DWA's temperature must be > 0; got {temperature}.")
    if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
        raise ValueError(
            f"DWA's steps_per_epoch must be a positive integer; got {steps_per_epoch}."
        )
    per_epoch = int(steps_per_epoch)

    def init(num_tasks: int) -> DWAState:
        k = check_num_tasks(num_tasks, "dwa")
        dtype = float_dtype()
        zero = jnp.zeros((), jnp.int32)
        return DWAState(jnp.zeros((k,), dtype), zero, jnp.ones((2, k), dtype), zero)

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, state.loss_sum.shape[0], "dwa")
        num = losses.shape[0]
        older, newer = state.history[0], state.history[1]
        ratio = newer / jnp.where(older != 0, older, 1.0)
        weights = jnp.where(
            state.num_epochs >= 2, num * jax.nn.softmax(ratio / temperature), jnp.ones(num)
        ).astype(losses.dtype)
        values = jax.lax.stop_gradient(losses).astype(state.loss_sum.dtype)
        loss_sum = state.loss_sum + values
        count = state.count + 1
        closes = count == per_epoch
        average = loss_sum / per_epoch
        history = jnp.where(closes, jnp.stack([newer, average]), state.history)
        new = DWAState(
            jnp.where(closes, 0.0, loss_sum),
            jnp.where(closes, 0, count),
            history,
            state.num_epochs + closes.astype(jnp.int32),
        )
        return weighted_sum(losses, weights), weights, keep_if_finite(values, new, state)

    return Scalarizer(init, scalarize, no_post_step)
