"""CoNAL's alternating first-order search step (the official ``search.py``).

One pure, jit-able ``step`` (:func:`make_search`): an architecture update of ``alpha`` on a held-out
batch, then a weight update on a training batch with the new ``alpha``. Conflict noticing: the
shared blocks' per-task Jacobian rows go through :func:`mtl_jax.aggregation.nocl` with one group per
block (:func:`block_grouping`); the rows come from one trunk pass and K backward passes through the
trunk alone. Departure: the official ``NOCLGrad`` leaves the private parameters with the last task's
gradient; here they get the summed-loss gradient. Gumbel-softmax (straight-through) is optional.
Details and defaults: ``docs/recipes/conal.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.aggregation import nocl
from mtl_jax.gramian import group_gramians

from .blocks import PyTree
from .supernet import Supernet, branch_weights

Batch = tuple[Any, Any]

__all__ = [
    "Search",
    "SearchConfig",
    "SearchState",
    "block_grouping",
    "default_arch_optimizer",
    "default_weight_optimizer",
    "make_search",
]


def block_grouping(path: str) -> str:
    """The grouping ``path -> group`` of the shared blocks' parameters: one group per block.

    Paths of ``params["shared"]`` start with the block index (``'2/params/Dense_0/kernel'``);
    the group is ``'block2'``. Use as ``mtl.aggregation.nocl(granularity=block_grouping)``.
    """
    return "block" + path.split("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Hyper-parameters of :func:`make_search` (defaults: the official ``search.py``).

    Attributes:
      weight_lr, weight_decay, grad_clip: weight optimizer ``clip_by_global_norm(grad_clip)``,
        L2 decay added to the gradient, Adam. ``grad_clip = 0`` disables clipping.
      arch_lr, arch_weight_decay: architecture optimizer (L2 decay + Adam).
      nocl: CoNAL's conflict rule on the shared blocks (else the summed-loss gradient).
      track_conflict: compute the shared blocks' per-task Gram matrices even with ``nocl=False``
        (for the ``shared_conflict`` metric); costs the Jacobian rows of the shared blocks.
      gumbel, tau, hard: Gumbel-softmax sampling of the mixing weights (default: plain softmax).
      seed: PRNG seed for Gumbel samples.
    """

    weight_lr: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 5.0
    arch_lr: float = 5e-5
    arch_weight_decay: float = 1e-5
    nocl: bool = True
    track_conflict: bool = False
    gumbel: bool = False
    tau: float = 1.0
    hard: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_lr", "arch_lr", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SearchConfig.{name} must be > 0; got {getattr(self, name)}.")
        for name in ("weight_decay", "arch_weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"SearchConfig.{name} must be >= 0; got {getattr(self, name)}.")


def default_weight_optimizer(config: SearchConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm -> add_decayed_weights -> adam`` (torch Adam with ``weight_decay``)."""
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    parts += [optax.add_decayed_weights(config.weight_decay), optax.adam(config.weight_lr)]
    return optax.chain(*parts)


def default_arch_optimizer(config: SearchConfig) -> optax.GradientTransformation:
    """``add_decayed_weights -> adam`` on ``alpha``."""
    return optax.chain(
        optax.add_decayed_weights(config.arch_weight_decay), optax.adam(config.arch_lr)
    )


class SearchState(NamedTuple):
    """The state of the search (fixed structure, shapes and dtypes from ``init`` on).

    Attributes:
      params: ``{"shared", "private", "alpha": f32[K, P], "heads"}``.
      model_state: ``{"shared", "private"}`` (BatchNorm statistics; private leaves ``[K, ...]``).
      weight_opt_state: state of the weight optimizer (on shared, private and heads).
      arch_opt_state: state of the architecture optimizer (on alpha).
      aggregator_state: state of the shared-block aggregator (``optax.EmptyState()`` if none).
      candidates: ``bool[K, P]``, the branch points each task may choose (all, except in
        CoNAL-Pro stages).
      tie: ``f32[B, K, K]``, per block the row-averaging matrix of tied task groups (CoNAL-Pro);
        the identity otherwise.
      step: ``int32``, steps taken.
      key: PRNG key for Gumbel samples.
    """

    params: dict[str, Any]
    model_state: dict[str, Any]
    weight_opt_state: Any
    arch_opt_state: Any
    aggregator_state: Any
    candidates: jax.Array
    tie: jax.Array
    step: jax.Array
    key: jax.Array


class Search(NamedTuple):
    """``init(key, x, head_params) -> SearchState``; ``step(state, train_batch, val_batch)``."""

    init: Callable[..., SearchState]
    step: Callable[..., tuple[SearchState, dict[str, jax.Array]]]
    supernet: Supernet
    config: SearchConfig


def _weights_of(params: dict[str, Any]) -> dict[str, Any]:
    return {"shared": params["shared"], "private": params["private"], "heads": params["heads"]}


def _apply_tie(tree_list: list[PyTree], tie: jax.Array) -> list[PyTree]:
    """Per block b: every leaf ``[K, ...] -> tie[b] @ leaf`` (group means; identity: unchanged)."""

    def one(t: jax.Array, leaf: jax.Array) -> jax.Array:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            return leaf
        out = jnp.tensordot(t.astype(leaf.dtype), leaf, axes=1, precision=jax.lax.Precision.HIGHEST)
        return out.astype(leaf.dtype)

    return [jax.tree.map(lambda x, t=tie[b]: one(t, x), tree) for b, tree in enumerate(tree_list)]


def _check_losses(losses: Any, k: int) -> None:
    if jnp.shape(losses) != (k,):
        raise ValueError(
            f"loss_fn must return the task losses f32[K] = [{k}]; got shape {jnp.shape(losses)}."
        )


def make_search(
    supernet: Supernet,
    loss_fn: Callable[[PyTree, jax.Array, Any], jax.Array],
    config: SearchConfig = SearchConfig(),
    *,
    weight_optimizer: optax.GradientTransformation | None = None,
    arch_optimizer: optax.GradientTransformation | None = None,
    shared_aggregator: optax.GradientTransformation | None = None,
) -> Search:
    """CoNAL's alternating search as a pure ``init`` and a pure, jit-able ``step``.

    Args:
      supernet: the search space.
      loss_fn: ``(head_params, features[K, N, ...], targets) -> losses f32[K]``; the heads are
        any pytree (e.g. stacked per-task heads applied with ``jax.vmap``). ``losses[t]`` must
        depend on ``features[t]`` only (not on another task's features): the step reads every
        task's gradient with respect to the shared features off one backward pass of the summed
        loss, then gets the shared blocks' Jacobian rows from K backward passes through the
        shared blocks alone (not through the K private streams).
      config: :class:`SearchConfig`.
      weight_optimizer: optimizer of the weights (shared, private, heads); default
        :func:`default_weight_optimizer`.
      arch_optimizer: optimizer of alpha; default :func:`default_arch_optimizer`.
      shared_aggregator: an aggregator (:mod:`mtl_jax.aggregation`) for the shared blocks'
        Jacobian rows; default ``mtl.aggregation.nocl(granularity=block_grouping)`` when
        ``config.nocl``, else the summed-loss gradient (no Jacobian).

    Returns:
      :class:`Search`. ``step(state, (x_train, y_train), (x_val, y_val)) -> (state, metrics)``
      with metrics ``train_losses[K]``, ``val_losses[K]``, ``alpha_softmax[K, P]`` (the masked
      softmax after the update: log it for the alpha trajectory), ``shared_conflict[B]`` (1 where
      some pair of task gradients on that shared block had a negative inner product: with nocl
      the block was not updated; 0 everywhere when no Jacobian is computed).

    Example::

      search = mtl.conal.make_search(supernet, loss_fn)
      state = search.init(jax.random.key(0), x, head_params)
      step = jax.jit(search.step)
      for train_batch, val_batch in batches:
          state, metrics = step(state, train_batch, val_batch)
      branch_points = mtl.conal.discretise(state.params["alpha"])
    """
    k, nb = supernet.num_tasks, supernet.num_blocks
    weight_tx = weight_optimizer or default_weight_optimizer(config)
    arch_tx = arch_optimizer or default_arch_optimizer(config)
    aggregator = shared_aggregator
    if aggregator is None and config.nocl:
        aggregator = nocl(granularity=block_grouping, num_tasks=k)
    track = aggregator is not None or config.track_conflict
    if aggregator is None and track:
        aggregator = nocl(granularity=block_grouping, num_tasks=k)  # only for its Gram matrices
    use_aggregate = shared_aggregator is not None or config.nocl

    def init(key: jax.Array, x: Any, head_params: PyTree = None) -> SearchState:
        params, model_state = supernet.init(key, x)
        params["heads"] = {} if head_params is None else head_params
        return SearchState(
            params=params,
            model_state=model_state,
            weight_opt_state=weight_tx.init(_weights_of(params)),
            arch_opt_state=arch_tx.init(params["alpha"]),
            aggregator_state=aggregator.init(params["shared"]) if track else optax.EmptyState(),
            candidates=jnp.ones((k, nb + 1), bool),
            tie=jnp.broadcast_to(jnp.eye(k, dtype=jnp.float32), (nb, k, k)),
            step=jnp.zeros((), jnp.int32),
            key=jax.random.key(config.seed),
        )

    def mixing(alpha: jax.Array, candidates: jax.Array, key: jax.Array) -> jax.Array:
        return branch_weights(
            alpha, candidates, key, gumbel=config.gumbel, tau=config.tau, hard=config.hard
        )

    def step(
        state: SearchState, train_batch: Batch, val_batch: Batch
    ) -> tuple[SearchState, dict[str, jax.Array]]:
        x_train, y_train = train_batch
        x_val, y_val = val_batch
        params = state.params
        key, arch_key, weight_key = jax.random.split(state.key, 3)

        # (1) architecture step on the held-out batch (weights fixed)
        def arch_loss(alpha: jax.Array) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
            w = mixing(alpha, state.candidates, arch_key)
            feats, new_ms = supernet.apply(params, state.model_state, x_val, w, train=True)
            losses = loss_fn(params["heads"], feats, y_val)
            _check_losses(losses, k)
            return jnp.sum(losses), (losses, new_ms)

        (_, (val_losses, model_state)), g_alpha = jax.value_and_grad(arch_loss, has_aux=True)(
            params["alpha"]
        )
        upd, arch_opt_state = arch_tx.update(g_alpha, state.arch_opt_state, params["alpha"])
        alpha = optax.apply_updates(params["alpha"], upd)

        # (2) weight step on the training batch with the new alpha
        w = jax.lax.stop_gradient(mixing(alpha, state.candidates, weight_key))

        # one trunk pass; its per-task cotangents come from ONE backward pass of the summed loss
        # through the private streams: task t's loss depends on row t of the broadcast trunk
        # features only, so row t of their cotangent is d loss_t / d s_b. The shared blocks'
        # Jacobian rows are then K (vmapped) backward passes through the trunk alone.
        def trunk(shared: PyTree) -> tuple[list[Any], list[PyTree]]:
            feats, new_state = supernet.trunk(shared, model_state["shared"], x_train, train=True)
            return feats[1:], new_state  # s_1..s_B (s_0 = x does not depend on the params)

        feats, trunk_vjp, shared_ms = jax.vjp(trunk, params["shared"], has_aux=True)
        x_k = supernet.broadcast([x_train])

        def private_losses(feats_k: list[Any], rest: PyTree) -> tuple[jax.Array, list[PyTree]]:
            z, new_private = supernet.mix(
                rest["private"], model_state["private"], x_k + feats_k, w, train=True
            )
            losses = loss_fn(rest["heads"], z, y_train)
            _check_losses(losses, k)
            return losses, new_private

        rest = {"private": params["private"], "heads": params["heads"]}
        losses, private_vjp, private_ms = jax.vjp(
            private_losses, supernet.broadcast(feats), rest, has_aux=True
        )
        model_state = {"shared": shared_ms, "private": private_ms}
        g_feats_k, g_rest = private_vjp(jnp.ones_like(losses))  # g_feats_k[b]: [K, ...]
        g_shared = trunk_vjp([jnp.sum(g, axis=0) for g in g_feats_k])[0]
        agg_state = state.aggregator_state
        conflict = jnp.zeros((nb,), jnp.float32)
        if track:
            jac = jax.vmap(lambda g: trunk_vjp(g)[0])(g_feats_k)  # leaves [K, ...]
            g_agg, agg_state = aggregator.update(
                jac, agg_state, params["shared"], task_losses=losses
            )
            if use_aggregate:
                g_shared = g_agg
            grams = group_gramians(jac, block_grouping)  # (XLA shares it with nocl's)
            off = ~jnp.eye(k, dtype=bool)
            conflict = jnp.stack(
                [
                    jnp.any(off & (grams[f"block{b}"] < 0)).astype(jnp.float32)
                    if f"block{b}" in grams
                    else jnp.zeros((), jnp.float32)
                    for b in range(nb)
                ]
            )
        grads = {"shared": g_shared, "private": g_rest["private"], "heads": g_rest["heads"]}
        weights = _weights_of(params)
        upd, weight_opt_state = weight_tx.update(grads, state.weight_opt_state, weights)
        weights = optax.apply_updates(weights, upd)
        weights["private"] = _apply_tie(weights["private"], state.tie)
        model_state = {
            "shared": model_state["shared"],
            "private": _apply_tie(model_state["private"], state.tie),
        }
        new_params = {**weights, "alpha": alpha}
        new_state = SearchState(
            params=new_params,
            model_state=model_state,
            weight_opt_state=weight_opt_state,
            arch_opt_state=arch_opt_state,
            aggregator_state=agg_state,
            candidates=state.candidates,
            tie=state.tie,
            step=state.step + 1,
            key=key,
        )
        metrics = {
            "train_losses": losses,
            "val_losses": val_losses,
            "alpha_softmax": branch_weights(alpha, state.candidates),
            "shared_conflict": conflict,
        }
        return new_state, metrics

    return Search(init, step, supernet, config)
