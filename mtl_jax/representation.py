"""Representation gradients: MGDA-UB / Aligned-MTL-UB, any weighting on ``d loss_k / d z``.

Sener & Koltun ("Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, Sec. 3.3)
bound the MGDA problem on the shared *parameters* by the same problem on the gradients with
respect to the shared *representation* ``z = encoder(theta, x)``: with ``Z = dz/dtheta``,
``|sum_k w_k g_k| <= |Z| |sum_k w_k dL_k/dz|``, so minimising the right-hand side ("MGDA-UB")
needs only the K cheap head gradients ``dL_k/dz``, not the K encoder backward passes. Senushkin et
al. (CVPR 2023) do the same for Aligned-MTL ("Aligned-MTL-UB"). Any Gram-space weighting works:

1. one encoder forward pass (``jax.vjp``), and each head's loss and gradients with respect to its
   parameters and to ``z`` (as in :func:`mtl_jax.mtl_value_and_grad`);
2. the Gram matrix of the representation gradients, flattened over batch and features
   (``G_kl = sum <dL_k/dz, dL_l/dz>``, as the official MGDA-UB code), and the weights ``w = W(G)``;
3. ONE encoder backward pass of the combined cotangent ``sum_k w_k dL_k/dz``, which gives the
   encoder gradient ``sum_k w_k (dz/dtheta)^T dL_k/dz`` directly.

The cost is that of a summed-loss step plus the K x K Gram matrix of the representation gradients
(``K^2 B D`` for a batch of B representations of size D) and the weighting's solve.

Heads: each head gets the ordinary gradient of its own loss (the library's convention, see
:func:`mtl_jax.multitask`); ``scale_heads=True`` multiplies head k's gradient by ``w_k``, as the
official MGDA code does (it backpropagates ``sum_k w_k L_k`` through the heads).
``sum_over_batch=True`` sums the representation gradients over the batch (leading) axis before
the Gram matrix, as LibMTL's ``rep_grad`` does; the default follows the paper and official code.

Non-finite losses or representation gradients give all-NaN weights and encoder gradient (the
aggregators' documented behaviour) and leave the weighting's state unchanged; the head gradients
are returned as computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.aggregate import guarded_weigh
from mtl_jax.gramian import GLOBAL, group_gramians
from mtl_jax.jacobian import mtl_value_and_grad
from mtl_jax.weighting.base import Weighting
from mtl_jax.weighting.registry import get_weighting

__all__ = ["RepresentationResult", "from_representation", "representation_value_and_grad"]

PyTree = Any


class RepresentationResult(NamedTuple):
    """What :func:`representation_value_and_grad`'s function returns.

    Attributes:
      losses: ``f32[K]``; with ``has_aux``, ``(losses, (encoder_aux, head_aux))``.
      encoder_grads: the encoder gradient, shaped like the encoder parameters (an ordinary
        gradient: feed it to any optax optimizer).
      head_grads: the head gradients, with the container type of the head parameters.
      weights: ``w[K]`` used for the encoder.
      gram: ``G[K, K]`` of the representation gradients (for logging, e.g. conflict metrics).
      state: the weighting's new state.
    """

    losses: Any
    encoder_grads: PyTree
    head_grads: Any
    weights: jax.Array
    gram: jax.Array
    state: PyTree


def _is_stacked(head_loss_fns: Any) -> bool:
    return callable(head_loss_fns) and not isinstance(head_loss_fns, Mapping | Sequence)


def _scale_heads(head_grads: Any, weights: jax.Array, head_loss_fns: Any) -> Any:
    """Head k's gradient times ``w_k`` (for the three ways heads can be given)."""
    if _is_stacked(head_loss_fns):
        return jax.tree.map(
            lambda g: g * jnp.reshape(weights.astype(g.dtype), (-1,) + (1,) * (g.ndim - 1)),
            head_grads,
        )
    scale = lambda k, tree: jax.tree.map(lambda g: g * weights[k].astype(g.dtype), tree)
    if isinstance(head_loss_fns, Mapping):
        return {name: scale(k, head_grads[name]) for k, name in enumerate(head_loss_fns)}
    scaled = [scale(k, g) for k, g in enumerate(head_grads)]
    return type(head_grads)(scaled) if isinstance(head_grads, tuple) else scaled


def _combine_cotangent(weights: jax.Array, rep_grads: PyTree) -> PyTree:
    """``sum_k w_k rep_grads[k]`` leaf by leaf."""
    return jax.tree.map(
        lambda r: jnp.tensordot(weights.astype(r.dtype), r, axes=1).astype(r.dtype), rep_grads
    )


def representation_value_and_grad(
    encoder_fn: Callable[..., Any],
    head_loss_fns: Callable[..., Any] | Sequence[Callable[..., Any]] | Mapping[str, Callable],
    weighting: Weighting | str,
    *,
    has_aux: bool = False,
    sum_over_batch: bool = False,
    scale_heads: bool = False,
) -> Callable[..., RepresentationResult]:
    """Builds the representation-gradient step: a weighting of ``dL_k/dz`` and one encoder backward.

    Args:
      encoder_fn: ``(encoder_params, x) -> z`` (any pytree ``z`` whose leaves have a leading batch
        axis); with ``has_aux``, ``(encoder_params, x) -> (z, encoder_aux)``.
      head_loss_fns: the task heads, given as for :func:`mtl_jax.mtl_value_and_grad` (a sequence,
        a mapping, or one function for stacked homogeneous heads).
      weighting: a :class:`~mtl_jax.weighting.base.Weighting` or a name registered in
        :data:`mtl_jax.WEIGHTINGS` (``"mgda"`` gives MGDA-UB, ``"aligned_mtl"`` Aligned-MTL-UB).
      has_aux: whether the encoder and the heads return auxiliary outputs.
      sum_over_batch: sum the representation gradients over the batch axis before the Gram matrix
        (LibMTL); the default flattens over batch and features (Sener & Koltun).
      scale_heads: multiply head k's gradient by ``w_k`` (the official MGDA code).

    Returns:
      ``fn(encoder_params, head_params, x, targets, state, key=None) -> RepresentationResult``,
      pure and jit-able. ``state`` is the weighting's state, ``weighting.init(K)`` (``fn.weighting``
      is the weighting); ``key`` (a PRNG key) feeds randomised weightings and must change between
      steps for them (default: a fixed key).

    Example::

      step_grads = mtl.representation_value_and_grad(encoder_fn, head_loss, "mgda")
      state = step_grads.weighting.init(num_tasks)
      res = jax.jit(step_grads)(enc_params, head_params, x, targets, state)
      enc_updates, enc_opt = tx.update(res.encoder_grads, enc_opt, enc_params)
    """
    if isinstance(weighting, str):
        weighting = get_weighting(weighting)
    if not isinstance(weighting, Weighting):
        raise TypeError(
            f"weighting must be a mtl_jax Weighting or a registered name; got {type(weighting)}."
        )
    heads = mtl_value_and_grad(
        (lambda _, z: (z, None)) if has_aux else (lambda _, z: z), head_loss_fns, has_aux=has_aux
    )

    def fn(
        encoder_params: PyTree,
        head_params: Any,
        x: Any,
        targets: Any,
        state: PyTree,
        key: jax.Array | None = None,
    ) -> RepresentationResult:
        def encode(p: PyTree) -> Any:
            return encoder_fn(p, x)

        if has_aux:
            z, pullback, encoder_aux = jax.vjp(encode, encoder_params, has_aux=True)
        else:
            z, pullback = jax.vjp(encode, encoder_params)
        # The heads see z as the output of an identity "encoder" without parameters: this yields
        # the losses, the head gradients and rep_grads[k] = dL_k/dz; the empty encoder Jacobian
        # costs nothing.
        first, _, head_grads, rep_grads = heads((), head_params, z, targets)
        losses = first[0] if has_aux else first
        reduced = (
            jax.tree.map(lambda r: jnp.sum(r, axis=1), rep_grads) if sum_over_batch else rep_grads
        )
        gram = group_gramians(reduced, GLOBAL)[GLOBAL]
        step_key = jax.random.PRNGKey(0) if key is None else key
        finite = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(losses))
        weights, new_state = guarded_weigh(weighting, gram, state, step_key, losses, finite)
        weights = jnp.where(finite & jnp.all(jnp.isfinite(weights)), weights, jnp.nan)
        (encoder_grads,) = pullback(_combine_cotangent(weights, rep_grads))
        if scale_heads:
            head_grads = _scale_heads(head_grads, weights, head_loss_fns)
        out_losses = (losses, (encoder_aux, first[1][1])) if has_aux else losses
        return RepresentationResult(out_losses, encoder_grads, head_grads, weights, gram, new_state)

    fn.weighting = weighting  # type: ignore[attr-defined]
    return fn


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
    matrix of ``rep_grads`` (``d L_k / d z`` from :func:`mtl_jax.mtl_value_and_grad`, flattened as
    in :func:`representation_value_and_grad`) and returns ``sum_k w_k g_k``: the same encoder
    gradient as the one backward pass of ``sum_k w_k d L_k / d z`` (the pullback is linear), for a
    loop that computes the Jacobian for other reasons (conflict metrics). Without that need,
    :func:`representation_value_and_grad` is the cheap path.
    """
    from mtl_jax.aggregate import from_weights_fn

    if isinstance(weighting, str):
        weighting = get_weighting(weighting)

    def weights_fn(jac, gram, inner, key, task_losses, extra_args):
        del jac, gram
        rep_grads = extra_args.get("rep_grads")
        if rep_grads is None:
            raise ValueError(
                f"{name} needs rep_grads=... (d loss_k / d z, leaves [K, B, ...]) in update."
            )
        reduced = (
            jax.tree.map(lambda r: jnp.sum(r, axis=1), rep_grads) if sum_over_batch else rep_grads
        )
        rep_gram = group_gramians(reduced, GLOBAL)[GLOBAL]
        finite = jnp.all(jnp.isfinite(rep_gram))
        if task_losses is not None:
            finite &= jnp.all(jnp.isfinite(task_losses))
        return guarded_weigh(weighting, rep_gram, inner, key, task_losses, finite)

    return from_weights_fn(
        weights_fn, lambda: weighting.init(num_tasks), num_tasks=num_tasks, seed=seed, name=name
    )
