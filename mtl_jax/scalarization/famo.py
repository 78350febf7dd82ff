"""FAMO (Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023).

``loss = sum_k z_k log(L_k - b_k + 1e-8) / c`` with ``z = softmax(xi)`` and ``c`` the constant
that makes the effective weights sum to 1. The logits ``xi`` learn from the change of the
log-losses across the model step, in ``post_step`` (one extra forward pass per step, as in the
official code): the one loss-only method whose ``post_step`` is not a no-op.
See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .base import PyTree, Scalarizer, check_losses, check_num_tasks, float_dtype, keep_if_finite

__all__ = ["FAMOState", "famo"]


class FAMOState(NamedTuple):
    """State of :func:`famo`: the logits, their optimizer state, and the losses before the step."""

    logits: jax.Array
    opt_state: PyTree
    prev_losses: jax.Array


_FAMO_EPS = 1e-8


def famo(
    gamma: float = 0.01, w_lr: float = 0.025, min_losses: float | Sequence[float] = 0.0
) -> Scalarizer:
    """FAMO (Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023).

    ``loss = sum_k z_k log(L_k - b_k + 1e-8) / c`` with ``z = softmax(xi)`` and the constant
    ``c = sum_k z_k / (L_k - b_k + 1e-8)`` (so the weights ``z_k / (c (L_k - b_k))`` sum to 1);
    ``b`` = ``min_losses`` (default 0: the losses must be positive).

    The logits ``xi`` are learned from the change of the log-losses across the model step:
    ``post_step(state, new_losses)``, called after the optimizer step with the losses recomputed on
    the same batch (one extra forward pass, as in the official code), sets ``delta = log(L_before -
    b) - log(L_after - b)``, the gradient ``J_softmax(xi)^T delta`` and takes one Adam step with
    learning rate ``w_lr`` and L2 weight decay ``gamma`` (``torch.optim.Adam(weight_decay=gamma)``:
    ``optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))``). Defaults are the official
    standalone ``famo.py`` (gamma 0.01, w_lr 0.025; LibMTL uses gamma 1e-3). The official
    ``max_norm`` clipping of the shared gradient belongs in the optax chain
    (``optax.clip_by_global_norm(1.0)``).
    """
    optimizer = optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))
    bound = np.asarray(min_losses, dtype=float)

    def init(num_tasks: int) -> FAMOState:
        k = check_num_tasks(num_tasks, "famo")
        if bound.ndim != 0 and bound.shape != (k,):
            raise ValueError(f"famo min_losses has shape {bound.shape}; expected () or ({k},).")
        dtype = float_dtype()
        logits = jnp.zeros((k,), dtype)
        return FAMOState(logits, optimizer.init(logits), jnp.zeros((k,), dtype))

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, state.logits.shape[0], "famo")
        z = jax.nn.softmax(state.logits).astype(losses.dtype)
        gap = losses - jnp.asarray(bound, losses.dtype) + _FAMO_EPS
        c = jax.lax.stop_gradient(jnp.sum(z / gap))
        loss = jnp.sum(z * jnp.log(gap)) / c
        weights = jax.lax.stop_gradient(z / (c * gap))
        values = jax.lax.stop_gradient(losses).astype(state.prev_losses.dtype)
        new = state._replace(prev_losses=values)
        return loss, weights, keep_if_finite(values, new, state)

    def post_step(state: FAMOState, new_losses: jax.Array) -> FAMOState:
        new_losses = check_losses(new_losses, state.logits.shape[0], "famo.post_step")
        b = jnp.asarray(bound, state.prev_losses.dtype)
        after = jax.lax.stop_gradient(new_losses).astype(state.prev_losses.dtype)
        delta = jnp.log(state.prev_losses - b + _FAMO_EPS) - jnp.log(after - b + _FAMO_EPS)
        _, vjp = jax.vjp(jax.nn.softmax, state.logits)
        (grad,) = vjp(delta)
        updates, opt_state = optimizer.update(grad, state.opt_state, state.logits)
        new = FAMOState(optax.apply_updates(state.logits, updates), opt_state, state.prev_losses)
        return keep_if_finite(delta, new, state)

    return Scalarizer(init, scalarize, post_step)
