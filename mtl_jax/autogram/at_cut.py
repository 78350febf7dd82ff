"""The Gramian engine below the cut: heads by one backward, the trunk's G without its rows.

A loss vector with task-specific heads (stacked under one ``vmap``, a list, Recon-style
branches) separates at its **cut** (:mod:`mtl_jax.cut`): everything after it reaches one task
per slice. The engine alone (:mod:`mtl_jax.autogram.engine`) pulls K one-hot cotangents back
through the whole program, so K stacked heads see ``[K, K, batch, ...]`` cotangents and their
site rows ``[K, K, ...]``: quadratic in K, and measured 2.7x slower than the Jacobian path at
K = 40 on the issue-25 MLP. Here instead:

1. the cut's forward and ONE all-ones backward after it (:func:`mtl_jax.cut.separate`): every
   task-specific leaf's own gradient and ``C_c = d loss_k / d cut_c`` (``[K, *cut_c]``);
2. the engine on the trunk alone, as the loss vector ``p_k(theta) = sum_c <C_c[k],
   trunk_c(theta)>`` with ``C`` held fixed: its Jacobian rows ARE the trunk's rows
   ``d loss_k / d theta`` (chain rule at the cut), so its Gram matrix, weights and update
   ``sum_k w_k g_k`` are the loss vector's, exactly;
3. the heads keep the gradient of step 1 (as :func:`mtl_jax.aggregation.shared_rows` leaves
   task-specific leaves: their own task's gradient).

Falls back to the plain engine where there is no cut or a leaf after the cut is shared (its
rows would belong in G). The trunk's forward runs twice in the traced program (the cut's and
the engine's); XLA merges the two where they are identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax import _tree
from mtl_jax.autogram.engine import (
    EnginePlan,
    GramianWeighting,
    LeafPlan,
    engine_value_and_grads,
)
from mtl_jax.cut import Separated, separate
from mtl_jax.sharing import task_specific_leaves

PyTree = Any

__all__ = ["engine_at_cut"]


def _projected_loss(sep: Separated) -> Callable[..., jax.Array]:
    """``(params, cotangents, losses) -> [K]``: the value ``losses`` (what a weighting that
    reads the losses must see), the gradient that of ``p_k = sum_c <cotangents[c][k],
    trunk_c(params)>``."""

    def projected(params: PyTree, cotangents: list[jax.Array], losses: jax.Array) -> jax.Array:
        flat = jax.tree.leaves(params)
        cut = sep.trunk([flat[i] for i in sep.trunk_leaves])
        terms = [
            jnp.tensordot(c, v.astype(c.dtype), axes=jnp.ndim(v))
            for c, v in zip(cotangents, cut, strict=True)
        ]
        p = sum(terms[1:], terms[0]).astype(losses.dtype)
        return losses + (p - jax.lax.stop_gradient(p))

    return projected


def _separated(loss_fn, has_aux, task_specific, params, args, kwargs) -> Separated | None:
    """The cut of ``loss_fn`` at ``params``, or ``None`` where the plain engine must run."""
    leaves, treedef = jax.tree.flatten(params)
    specific = (
        [False] * len(leaves)
        if task_specific is None
        else jax.tree.leaves(task_specific_leaves(task_specific, params))
    )

    def split_loss(flat: list[Any]) -> Any:
        return loss_fn(jax.tree.unflatten(treedef, flat), *args, **kwargs)

    def check(losses: Any) -> None:
        _tree.check_loss_vector(losses, "value_and_grads(gramian=...): loss_fn")

    sep = separate(split_loss, leaves, has_aux, check, differentiate_trunk=False)
    if sep is None or not sep.trunk_leaves or any(not specific[i] for i in sep.head_grads):
        return None
    return sep


def engine_at_cut(
    loss_fn: Callable[..., Any],
    gramian: GramianWeighting,
    task_specific: PyTree | Callable[[PyTree], PyTree] | None,
    *,
    has_aux: bool = False,
    task_map: str = "vmap",
) -> Callable[..., Any]:
    """:func:`~mtl_jax.autogram.engine_value_and_grads`'s contract (same call, same outputs),
    computed below the cut (module docstring). ``gramian.instance_wise`` must be ``False``."""
    if gramian.instance_wise:
        raise ValueError("engine_at_cut: instance-wise objectives use the plain engine.")
    plain = engine_value_and_grads(
        loss_fn, gramian, task_specific, has_aux=has_aux, task_map=task_map
    )

    def trunk_engine(sep: Separated) -> Callable[..., Any]:
        return engine_value_and_grads(
            _projected_loss(sep), gramian, task_specific, task_map=task_map
        )

    def fn(
        params: PyTree,
        *args: Any,
        weighting_state: PyTree = None,
        key: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        _tree.check_not_variables(params, "value_and_grads(gramian=...)")
        _tree.check_float_leaves(params, "value_and_grads(gramian=...)")
        sep = _separated(loss_fn, has_aux, task_specific, params, args, kwargs)
        if sep is None:
            return plain(params, *args, weighting_state=weighting_state, key=key, **kwargs)
        (_, out_aux), grads = trunk_engine(sep)(
            params, sep.cotangents, sep.losses, weighting_state=weighting_state, key=key
        )
        leaves, treedef = jax.tree.flatten(grads)
        for i, g in sep.head_grads.items():
            leaves[i] = g.astype(leaves[i].dtype)
        if has_aux:
            out_aux = {**out_aux, "aux": sep.aux}
        return (sep.losses, out_aux), jax.tree.unflatten(treedef, leaves)

    def plan(params: PyTree, *args: Any, **kwargs: Any) -> EnginePlan:
        box: dict[str, EnginePlan] = {}

        def trace(p: PyTree, a: tuple, kw: dict) -> int:
            sep = _separated(loss_fn, has_aux, task_specific, p, a, kw)
            if sep is None:
                box["plan"] = plain.plan(p, *a, **kw)
                return 0
            inner = trunk_engine(sep).plan(p, sep.cotangents, sep.losses)
            heads = set(sep.head_grads)
            box["plan"] = dataclasses.replace(
                inner,
                leaves=tuple(
                    LeafPlan(leaf.path, "own", (), "after the cut: one all-ones backward")
                    if i in heads
                    else leaf
                    for i, leaf in enumerate(inner.leaves)
                ),
                num_objectives=sep.num_tasks,
            )
            return 0

        jax.eval_shape(trace, params, args, kwargs)
        return box["plan"]

    fn.plan = plan  # type: ignore[attr-defined]
    fn.init_weighting_state = plain.init_weighting_state  # type: ignore[attr-defined]
    fn.weighting = plain.weighting  # type: ignore[attr-defined]
    return fn
