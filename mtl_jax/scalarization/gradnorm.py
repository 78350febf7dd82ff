"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, Algorithm 1), and the task
gradient norms of one shared layer that it balances (:func:`layer_grad_norms`).

``loss = sum_k w_k L_k``; the weights ``w`` take one Adam step per call on GradNorm's
``L_grad = sum_k |w_k n_k - mean(w n) r_k^alpha|`` with the targets held constant, then are
renormalised to sum to K. Departure: ``w`` has its own Adam (the paper uses the network's
optimizer). See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree

from .base import (
    PyTree,
    Scalarizer,
    check_losses,
    check_num_tasks,
    float_dtype,
    keep_if_finite,
    no_post_step,
    weighted_sum,
)

__all__ = ["GradNormState", "gradnorm", "layer_grad_norms"]


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`: the task weights, their optimizer, ``L(0)`` and the step."""

    weights: jax.Array
    opt_state: PyTree
    initial_losses: jax.Array
    step: jax.Array


def layer_grad_norms(jac: PyTree, layer: str | Callable[[str], bool]) -> jax.Array:
    """``|d L_k / d W|`` for every task: the norms of the rows of the layer ``W`` in a task Jacobian.

    Args:
      jac: a task Jacobian (leaves ``[K, ...]``), e.g. from :func:`mtl_jax.value_and_grads`.
        Under ``jit`` only the selected leaves are computed: XLA drops the rest of the K backward
        passes, so differentiating all the parameters and selecting the last shared layer costs
        K backward passes through the layers above it only.
      layer: a ``/``-joined path prefix (``"params/Dense_2"``) or a predicate ``path -> bool``.

    Returns:
      ``norms[K]``, the input of :func:`gradnorm`'s ``grad_norms``.
    """
    select = (
        layer if callable(layer) else (lambda path: path == layer or path.startswith(layer + "/"))
    )
    chosen = [leaf for path, leaf in _tree.leaves_with_paths(jac) if select(path)]
    if not chosen:
        paths = [path for path, _ in _tree.leaves_with_paths(jac)]
        raise ValueError(f"layer {layer!r} selects no leaf of the Jacobian; its leaves: {paths}.")
    _tree.task_axis_size(chosen)
    sq = jnp.zeros((chosen[0].shape[0],), jnp.result_type(*chosen))
    for leaf in chosen:
        sq = sq + jnp.sum(jnp.reshape(jnp.square(leaf), (leaf.shape[0], -1)), axis=1)
    return jnp.sqrt(sq)


def gradnorm(alpha: float = 1.5, learning_rate: float = 0.025) -> Scalarizer:
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, Algorithm 1).

    ``loss = sum_k w_k L_k``. With ``n_k = |d L_k / d W|`` for a chosen shared layer ``W`` (pass them
    as ``grad_norms``: :func:`layer_grad_norms` reads them off that layer's rows of a task
    Jacobian), ``G_k = w_k n_k``, ``G_bar = mean_k G_k``, ``r_k = L~_k / mean(L~)`` with
    ``L~_k = L_k / L_k(0)``, GradNorm minimises ``L_grad = sum_k |G_k - G_bar r_k^alpha|`` over ``w``
    with the targets held constant: one Adam step (``learning_rate``) on ``d L_grad / d w_k =
    sign(G_k - target_k) n_k``, then ``w`` is renormalised to sum to K. The network uses the weights
    of the current step; the new ones apply from the next. ``L(0)`` are the losses of the first
    call; weights start at 1. Defaults: alpha 1.5 (paper's NYUv2 value, LibMTL), Adam learning
    rate 0.025 (common in public implementations; the paper trains ``w`` with the network's
    optimizer).
    """
    if not alpha >= 0:
        raise ValueError(f"GradNorm's alpha must be >= 0; got {alpha}.")
    optimizer = optax.adam(learning_rate)

    def init(num_tasks: int) -> GradNormState:
        k = check_num_tasks(num_tasks, "gradnorm")
        dtype = float_dtype()
        weights = jnp.ones((k,), dtype)
        return GradNormState(
            weights, optimizer.init(weights), jnp.ones((k,), dtype), jnp.zeros((), jnp.int32)
        )

    def scalarize(losses, state, *, grad_norms=None):
        if grad_norms is None:
            raise ValueError(
                "gradnorm needs grad_norms=[K]: the task gradient norms of the shared layer W "
                "(see mtl_jax.scalarization.layer_grad_norms)."
            )
        losses = check_losses(losses, state.weights.shape[0], "gradnorm")
        norms = jnp.asarray(grad_norms)
        if norms.shape != losses.shape:
            raise ValueError(
                f"gradnorm: grad_norms has shape {norms.shape}; expected {losses.shape}."
            )
        num = losses.shape[0]
        dtype = state.weights.dtype
        w = state.weights
        values = jax.lax.stop_gradient(losses).astype(dtype)
        norms = jax.lax.stop_gradient(norms).astype(dtype)
        initial = jnp.where(state.step == 0, values, state.initial_losses)
        ratio = values / jnp.where(initial != 0, initial, 1.0)
        inverse_rate = ratio / jnp.mean(ratio)
        weighted_norms = w * norms
        target = jnp.mean(weighted_norms) * inverse_rate**alpha
        grad_w = jnp.sign(weighted_norms - target) * norms
        updates, opt_state = optimizer.update(grad_w, state.opt_state, w)
        stepped = optax.apply_updates(w, updates)
        renormalised = num * stepped / jnp.sum(stepped)
        new = GradNormState(renormalised, opt_state, initial, state.step + 1)
        finite = jnp.all(jnp.isfinite(norms))
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        weights = w.astype(losses.dtype)
        return weighted_sum(losses, weights), weights, keep_if_finite(values, new, state)

    return Scalarizer(init, scalarize, no_post_step)
