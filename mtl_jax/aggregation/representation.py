"""``from_representation``: MGDA-UB-style weights applied to a task Jacobian.

Sener & Koltun (NeurIPS 2018, Sec. 3.3) bound the MGDA problem on the shared parameters by the
same problem on the gradients with respect to the shared representation ``z``; any Gram-space
weighting can take its weights from ``G_kl = sum <dL_k/dz, dL_l/dz>`` instead of the Jacobian's
Gram matrix. ``update(jac, state, params, task_losses=..., rep_grads=...)`` weighs
``rep_grads`` (leaves ``[K, B, ...]``) and returns ``sum_k w_k g_k``: by linearity of the
pullback, the same encoder gradient as the one backward pass of ``sum_k w_k dL_k/dz`` of
the one-backward path (:class:`mtl_jax.RepresentationWeighting`), for a loop that has the Jacobian anyway. See
``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from mtl_jax.gradients import representation_gram
from mtl_jax.weighting.base import Weighting
from mtl_jax.weighting.registry import as_weighting

from .gramspace import WeighFirst, from_weights_fn, guarded_weigh, weigh_first

__all__ = ["from_representation", "representation_weigh"]


def from_representation(
    weighting: Weighting | str,
    *,
    num_tasks: int,
    sum_over_batch: bool = False,
    seed: int = 0,
    name: str = "representation",
) -> Any:
    """MGDA-UB-style weights applied to a task Jacobian a train loop has anyway.

    ``update(jac, state, params, task_losses=..., rep_grads=...)`` takes the weights from the Gram
    matrix of ``rep_grads`` (``d L_k / d z`` from ``value_and_grads(TrunkAndHeads(...), representation=True)``,
    flattened as the one-backward path does) and returns ``sum_k w_k g_k``: the same
    encoder gradient as the one backward pass of ``sum_k w_k d L_k / d z`` (the pullback is
    linear), for a loop that computes the Jacobian for other reasons (conflict metrics). Without
    that need, :class:`mtl_jax.RepresentationWeighting` is the cheap path.
    """
    weighting = as_weighting(weighting, name)
    return from_weights_fn(
        _weights_fn(weighting, sum_over_batch, name),
        lambda: weighting.init(num_tasks),
        num_tasks=num_tasks,
        seed=seed,
        name=name,
    )


def _weights_fn(weighting: Weighting, sum_over_batch: bool, name: str) -> Callable:
    def weights_fn(jac, gram, inner, key, task_losses, extra_args):
        del jac, gram
        rep_grads = extra_args.get("rep_grads")
        if rep_grads is None:
            raise ValueError(
                f"{name} needs rep_grads=... (d loss_k / d z, leaves [K, B, ...]) in update."
            )
        rep_gram = representation_gram(rep_grads, sum_over_batch)
        finite = jnp.all(jnp.isfinite(rep_gram))
        if task_losses is not None:
            finite &= jnp.all(jnp.isfinite(task_losses))
        return guarded_weigh(weighting, rep_gram, inner, key, task_losses, finite)

    return weights_fn


def representation_weigh(
    weighting: Weighting | str, *, sum_over_batch: bool = False, name: str = "representation"
) -> WeighFirst:
    """``weigh(state, task_losses, rep_grads=...) -> (w, state)``: the weights of
    :func:`from_representation`'s aggregator (``state`` is its state) before the backward pass,
    for a loop that then pulls ``sum_k w_k d L_k / d z`` back through the trunk ONCE
    (:func:`mtl_jax.aggregation.weigh_first`)."""
    weighting = as_weighting(weighting, name)
    return weigh_first(_weights_fn(weighting, sum_over_batch, name), name=name)
