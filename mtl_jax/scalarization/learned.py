"""Learnable per-task loss scalars (the machinery of :mod:`.uw` and :mod:`.imtl_l`).

A scalarizer whose loss ``loss_fn(losses, s)`` has learnable per-task ``s`` (init 0). The
network sees ``s`` as constants; ``s`` lives in the state with the state of its own optax
optimizer and takes one step per call on ``d loss / d s`` at the current loss values: the
simultaneous update of joint training, without adding ``s`` to the model's parameters.
See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .base import (
    PyTree,
    Scalarizer,
    check_losses,
    check_num_tasks,
    float_dtype,
    keep_if_finite,
    no_post_step,
)

__all__ = ["LearnedState", "adam_unless_given", "learned_scalarizer"]


class LearnedState(NamedTuple):
    """Per-task learnable scalars (UW's log-variances, IMTL-L's log-scales) and their optimizer."""

    params: jax.Array
    opt_state: PyTree


def learned_scalarizer(
    method: str,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    weight_fn: Callable[[jax.Array], jax.Array],
) -> Scalarizer:
    """A scalarizer whose loss ``loss_fn(losses, s)`` has learnable per-task ``s`` (init 0).

    The network sees ``s`` as constants; ``s`` takes one ``optimizer`` step on ``d loss / d s`` at
    the current loss values, i.e. the simultaneous update of joint training.
    """

    def init(num_tasks: int) -> LearnedState:
        k = check_num_tasks(num_tasks, method)
        params = jnp.zeros((k,), float_dtype())
        return LearnedState(params, optimizer.init(params))

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, state.params.shape[0], method)
        s = state.params.astype(losses.dtype)
        loss = loss_fn(losses, jax.lax.stop_gradient(s))
        values = jax.lax.stop_gradient(losses)
        grad_s = jax.grad(lambda p: loss_fn(values, p))(s).astype(state.params.dtype)
        updates, opt_state = optimizer.update(grad_s, state.opt_state, state.params)
        new = LearnedState(optax.apply_updates(state.params, updates), opt_state)
        return loss, weight_fn(s), keep_if_finite(values, new, state)

    return Scalarizer(init, scalarize, no_post_step)


def adam_unless_given(
    learning_rate: float, optimizer: optax.GradientTransformation | None
) -> optax.GradientTransformation:
    """``optimizer`` if given, else ``optax.adam(learning_rate)`` (a ``learning_rate`` > 0)."""
    if optimizer is not None:
        return optimizer
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    return optax.adam(learning_rate)
