"""The Gramian engine below the cut: heads by one backward, the trunk's G without its rows.

A loss vector with task-specific heads (stacked under one ``vmap``, a list, Recon-style
branches) separates at its **cut** (:mod:`mtl_jax.cut`): everything after it reaches one task
per slice. The engine alone (:mod:`mtl_jax.autogram.engine`) pulls K one-hot cotangents back
through the whole program, so K stacked heads see ``[K, K, batch, ...]`` cotangents and their
site rows ``[K, K, ...]``: quadratic in K, and measured 2.7x slower than the Jacobian path at
K = 40 on the issue-25 MLP. Here instead, with ONE forward of the trunk:

1. the engine's forward of the trunk alone (a zero perturbation on every site's output, kept
   for the pullbacks), up to the cut values;
2. the rest of the program at those values and ONE all-ones backward after the cut
   (:func:`mtl_jax.cut.separate_at`): every task-specific leaf's own gradient and
   ``C_c = d loss_k / d cut_c`` (``[K, *cut_c]``);
3. the engine's K pullbacks of the trunk from the rows ``C[k]``: by the chain rule at the cut
   they are the loss vector's, so G, the weights and the update ``sum_k w_k g_k`` are exact;
4. the heads keep the gradient of step 2 (as :func:`mtl_jax.aggregation.shared_rows` leaves
   task-specific leaves: their own task's gradient).

Falls back to the plain engine where there is no cut or a leaf after the cut is shared (its
rows would belong in G).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from mtl_jax import _tree
from mtl_jax.autogram import engine
from mtl_jax.autogram.engine import (
    EnginePlan,
    GramianWeighting,
    LeafPlan,
    engine_value_and_grads,
)
from mtl_jax.cut import Cut, Separated, find_cut, separate_at
from mtl_jax.gramian import GLOBAL
from mtl_jax.sharing import task_specific_leaves

PyTree = Any

__all__ = ["engine_at_cut"]

WHAT = "value_and_grads(gramian=...)"


def _find_cut(loss_fn, has_aux, task_specific, params, args, kwargs) -> Cut | None:
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

    cut = find_cut(split_loss, leaves, has_aux, check)
    if cut is None or not cut.trunk_leaves:
        return None
    trunk = set(cut.trunk_leaves)
    after_the_cut = [i for i in range(len(leaves)) if i not in trunk]
    return None if any(not specific[i] for i in after_the_cut) else cut


def _trunk_values(cut: Cut, trunk: Callable[[list[Any]], Any]) -> Callable[[PyTree], Any]:
    """``params -> (cut values, crossing values)``: the cut's ``trunk(trunk leaves)`` as a
    function of all the parameters, the form the engine traces (the values are its outputs,
    the crossing values its aux)."""

    def trunk_values(params: PyTree) -> Any:
        flat = jax.tree.leaves(params)
        cut_vals, crossing = trunk([flat[i] for i in cut.trunk_leaves])
        return list(cut_vals), list(crossing)

    return trunk_values


def _below_the_cut(
    cut: Cut, params: PyTree, identities: bool | str, task_map: str
) -> tuple[engine._Prepared, engine._Run, Separated]:
    """Steps 1-3 of the module docstring: the engine's plan and run of the trunk, and the cut's
    losses, head gradients and aux."""
    leaves = jax.tree.leaves(params)
    box: dict[str, Any] = {}

    def forward(trunk: Callable, trunk_vals: list[Any]) -> tuple[list[Any], list[Any]]:
        del trunk_vals  # the engine reads them from the parameters
        prep = engine._prepare(
            _trunk_values(cut, trunk),
            has_aux=True,
            instance_wise=False,
            identities=identities,
            params=params,
            args=(),
            kwargs={},
            what=WHAT,
            num_objectives=cut.num_tasks,
        )
        fwd = engine._forward(prep, leaves)
        box["prep"], box["fwd"] = prep, fwd
        return [v[0] for v in fwd.outputs], [a[0] for a in fwd.aux]

    sep = separate_at(cut, leaves, forward=forward)
    prep, fwd = box["prep"], box["fwd"]
    rows = [c[:, None] for c in sep.cotangents]  # [K, B = 1, *cut value]
    deltas, d_fb = engine._pull(fwd, rows, task_map)
    fb_rows = dict(zip(prep.fallback, d_fb, strict=True))
    run = engine._Run(sep.losses[None], None, fwd.captured, deltas, fb_rows)
    return prep, run, sep


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
    weighting = plain.weighting
    grouped = gramian.granularity != GLOBAL

    def fn(
        params: PyTree,
        *args: Any,
        weighting_state: PyTree = None,
        key: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        _tree.check_not_variables(params, WHAT)
        _tree.check_float_leaves(params, WHAT)
        cut = _find_cut(loss_fn, has_aux, task_specific, params, args, kwargs)
        if cut is None:
            return plain(params, *args, weighting_state=weighting_state, key=key, **kwargs)
        labels = engine._labels(params, task_specific, gramian.granularity)
        state = engine._state_or_init(
            weighting, params, labels, grouped, cut.num_tasks, weighting_state
        )
        prep, run, sep = _below_the_cut(cut, params, gramian.identities, task_map)
        leaves, treedef = jax.tree.flatten(params)
        out_aux, grads = engine._weighted_step(
            prep, run, leaves, labels, weighting, grouped, state, key, WHAT
        )
        for i, g in sep.head_grads.items():
            grads[i] = g.astype(leaves[i].dtype)
        if has_aux:
            out_aux["aux"] = sep.aux
        return (sep.losses, out_aux), jax.tree.unflatten(treedef, grads)

    def plan(params: PyTree, *args: Any, **kwargs: Any) -> EnginePlan:
        box: dict[str, EnginePlan] = {}

        def trace(p: PyTree, a: tuple, kw: dict) -> int:
            cut = _find_cut(loss_fn, has_aux, task_specific, p, a, kw)
            if cut is None:
                box["plan"] = plain.plan(p, *a, **kw)
                return 0
            prep, _, _ = _below_the_cut(cut, p, gramian.identities, task_map)
            inner = engine._plan_of(prep, p)
            trunk = set(cut.trunk_leaves)
            box["plan"] = dataclasses.replace(
                inner,
                leaves=tuple(
                    leaf
                    if i in trunk
                    else LeafPlan(leaf.path, "own", (), "after the cut: one all-ones backward")
                    for i, leaf in enumerate(inner.leaves)
                ),
                num_objectives=cut.num_tasks,
            )
            return 0

        jax.eval_shape(trace, params, args, kwargs)
        return box["plan"]

    fn.plan = plan  # type: ignore[attr-defined]
    fn.init_weighting_state = plain.init_weighting_state  # type: ignore[attr-defined]
    fn.weighting = weighting  # type: ignore[attr-defined]
    return fn
