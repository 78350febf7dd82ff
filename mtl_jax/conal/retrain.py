"""CoNAL's retrain model: the discrete tree architecture, its gradient rows and its update.

After :func:`~mtl_jax.conal.discretise`, the learned architecture is retrained from scratch (Yue,
Zhang & Liang, AAAI 2023, Sec. 3). :class:`TreeModel`: the trunk runs once, every branch (one
task's, or a CoNAL-Pro group's) runs its own copies of the blocks after its branch point, then
each task's head. :func:`tree_value_and_grads` returns the library's one gradient format: Jacobian
rows ``[K, ...]`` for the trunk blocks and group copies (row t: task t's gradient, zero for a
task that does not use the block), each task's own gradient for its own copies and its head;
``optax.chain(mtl.shared_rows(aggregator, tree.task_specific), optimizer)`` consumes it.
:func:`unit_aggregation` aggregates each parameter unit over the rows of exactly the tasks that
use it (what the conal study does); :func:`make_retrain` is the jit-able step. Departure: the
paper retrains with the summed loss; here any aggregator acts on the per-task rows. The long
story: ``docs/recipes/conal.md``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.batchnorm import recompute_statistics

from .architecture import Architecture
from .blocks import Block, PyTree
from .supernet import TASK_MAPS

__all__ = [
    "Retrain",
    "RetrainState",
    "TreeModel",
    "inherit_params",
    "make_retrain",
    "random_block_init",
    "recompute_tree_statistics",
    "tree_init",
    "tree_value_and_grads",
    "unit_aggregation",
]

#: ``(head params, encoder feature z, train) -> prediction`` of one task.
Head = Callable[[PyTree, Any, bool], Any]
#: ``(task name, prediction, targets) -> f32[]`` the loss of one task.
TaskLoss = Callable[[str, Any, Any], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class TreeModel:
    """A discrete tree architecture over blocks, with one head per task.

    ``params = {"trunk": [block params] * D, "branches": [[block params] * (B - p_c)] per branch
    c, "heads": {task: head params}}`` (D = ``arch.trunk_depth``, p_c the branch point of branch
    c); ``state`` likewise without heads (BatchNorm statistics: one set per stream). Equality
    and hashing are by identity, so a tree can be a static argument of ``jax.jit``.

    Attributes:
      blocks: the B blocks, input to output.
      arch: the discrete architecture.
      heads: ``{task name: head}`` in task order (``(params, z, train) -> prediction``; heads
        have no mutable state).
    """

    blocks: tuple[Block, ...]
    arch: Architecture
    heads: Mapping[str, Head]

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if len(self.blocks) != self.arch.num_blocks:
            raise ValueError(
                f"The architecture has {self.arch.num_blocks} blocks but {len(self.blocks)} "
                "blocks were given."
            )
        if len(self.heads) != self.arch.num_tasks:
            raise ValueError(
                f"The architecture has {self.arch.num_tasks} tasks but {len(self.heads)} heads "
                "were given (one per task, in task order)."
            )

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.heads)

    @functools.cached_property
    def branches(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """``(branch point, tasks)`` per branch (:meth:`Architecture.branches`)."""
        return self.arch.branches()

    @functools.cached_property
    def branch_of(self) -> dict[int, int]:
        """``task -> branch index`` for every task with a branch (``p < B``)."""
        return {t: c for c, (_, ts) in enumerate(self.branches) for t in ts}

    def units(self) -> list[tuple[tuple[int, ...], str, Any]]:
        """Parameter units and the tasks that use them: ``(tasks, "trunk", [blocks])`` for trunk
        blocks with the same task set, ``(tasks, "branch", c)`` per branch."""
        bps = self.arch.branch_points
        by_set: dict[tuple[int, ...], list[int]] = collections.OrderedDict()
        for b in range(self.arch.trunk_depth):
            users = tuple(t for t, p in enumerate(bps) if p > b)
            by_set.setdefault(users, []).append(b)
        out = [(users, "trunk", blocks) for users, blocks in by_set.items()]
        out += [(tuple(ts), "branch", c) for c, (_, ts) in enumerate(self.branches)]
        return out

    def trunk(self, params, state, x, train: bool):
        """``([s_0 = x, s_1, ..., s_D], new trunk state)``, D = ``trunk_depth``."""
        feats, new_state = [x], []
        for b in range(self.arch.trunk_depth):
            s, st = self.blocks[b].apply(params[b], state[b], feats[-1], train)
            feats.append(s)
            new_state.append(st)
        return feats, new_state

    def branch(self, c: int, params, state, x, train: bool):
        """Branch c's copies of blocks ``p_c..B-1`` on ``x = s_{p_c}``: ``(z, new state)``."""
        p = self.branches[c][0]
        new_state = []
        for i, b in enumerate(range(p, self.arch.num_blocks)):
            x, st = self.blocks[b].apply(params[i], state[i], x, train)
            new_state.append(st)
        return x, new_state

    def head(self, t: int, params, z, train: bool):
        """Task t's prediction from its encoder feature ``z``."""
        return self.heads[self.task_names[t]](params, z, train)

    def apply(self, params, state, x, train: bool) -> tuple[dict, dict]:
        """``({task: prediction}, new state)``: the whole tree on one batch ``x``.

        ``train=True``: every BatchNorm normalises with the statistics of its own input (the trunk
        with those of ``x``, branch c with those of ``s_{p_c}`` through its own copies) and the new
        state holds each stream's running statistics updated from them. ``train=False``: the
        stored running statistics, the state unchanged.
        """
        feats, trunk_state = self.trunk(params["trunk"], state["trunk"], x, train)
        zs, branch_state = [], []
        for c, (p, _) in enumerate(self.branches):
            z, st = self.branch(c, params["branches"][c], state["branches"][c], feats[p], train)
            zs.append(z)
            branch_state.append(st)
        out = {}
        for t, name in enumerate(self.task_names):
            p = self.arch.branch_points[t]
            z = feats[p] if p == self.arch.num_blocks else zs[self.branch_of[t]]
            out[name] = self.head(t, params["heads"][name], z, train)
        return out, {"trunk": trunk_state, "branches": branch_state}

    def predict(self, params, state, x) -> dict:
        """``{task: prediction}`` in evaluation mode (BatchNorm running statistics)."""
        return self.apply(params, state, x, False)[0]

    @functools.cached_property
    def train_mode_state(self) -> Callable:
        """Jitted ``(params, state, x) -> new state``: one train-mode forward's updated running
        statistics (compiled once per shape, the weights an argument)."""
        return jax.jit(lambda params, state, x: self.apply(params, state, x, True)[1])

    def task_specific(self, params: dict) -> dict:
        """The spec of :func:`mtl_jax.shared_rows` for :func:`tree_value_and_grads`' gradients:
        ``True`` for one task's copies and the heads (own gradient), ``False`` for the trunk and
        group copies (Jacobian rows)."""
        return {
            "trunk": _constant_like(params["trunk"], False),
            "branches": [
                _constant_like(params["branches"][c], len(ts) == 1)
                for c, (_, ts) in enumerate(self.branches)
            ],
            "heads": _constant_like(params["heads"], True),
        }


def _constant_like(tree: PyTree, value: bool) -> PyTree:
    return jax.tree.map(lambda _: value, tree)


# --------------------------------------------------------------------------------------------
# Initialisation


BlockVars = Callable[[int, int | None], tuple[PyTree, PyTree]]


def tree_init(tree: TreeModel, block_vars: BlockVars, *, init: str = "fresh") -> tuple[dict, dict]:
    """``(params, state)`` of the encoder (``{"trunk", "branches"}``; add ``"heads"``).

    ``block_vars(b, variant)`` gives block b's ``(params, state)``: ``variant=None`` the trunk's
    instance, ``variant=t`` task t's. ``init="fresh"``: a branch's copies are the variant of its
    first task (every copy its own init, as the official ``new_bb()``); ``"copy"``: the trunk's
    instance (every copy starts from the same block).
    """
    if init not in ("fresh", "copy"):
        raise ValueError(f"tree_init: init must be 'fresh' or 'copy'; got {init!r}.")
    nb = tree.arch.num_blocks
    trunk = [block_vars(b, None) for b in range(tree.arch.trunk_depth)]
    branches = []
    for _, ts in tree.branches:
        p = tree.arch.branch_points[ts[0]]
        variant = ts[0] if init == "fresh" else None
        branches.append([block_vars(b, variant) for b in range(p, nb)])
    params = {"trunk": [v[0] for v in trunk], "branches": [[v[0] for v in br] for br in branches]}
    state = {"trunk": [v[1] for v in trunk], "branches": [[v[1] for v in br] for br in branches]}
    return params, state


def random_block_init(blocks: Sequence[Block], key: jax.Array, x: Any) -> BlockVars:
    """``block_vars`` for :func:`tree_init` from the blocks' own initialisers: block b of
    variant v (None: the trunk) from ``fold_in(key, b)`` or ``fold_in(key, 1 + v * B + b)``;
    ``x`` an example input batch (shapes only)."""
    nb = len(blocks)
    shapes = [x]
    for b in range(nb):
        p, s = blocks[b].init(jax.random.key(0), shapes[-1])
        shapes.append(blocks[b].apply(p, s, shapes[-1], False)[0])

    def block_vars(b: int, variant: int | None) -> tuple[PyTree, PyTree]:
        k = jax.random.fold_in(key, 1 + (variant or 0) * nb + b)
        if variant is None:
            k = jax.random.fold_in(key, b)
        return blocks[b].init(k, shapes[b])

    return block_vars


def inherit_params(supernet_tree: dict[str, Any], arch: Architecture) -> dict[str, Any]:
    """Tree params (or state) ``{"trunk", "branches"}`` taken from supernet params (or state).

    The trunk keeps the supernet's shared blocks ``0..trunk_depth-1``; a branch's copy of block b
    is the private copy of its first task. For checks and warm starts; the paper retrains from
    scratch (:func:`tree_init`).
    """
    trunk = list(supernet_tree["shared"][: arch.trunk_depth])
    branches = [
        [
            jax.tree.map(lambda a, t=tasks[0]: a[t], supernet_tree["private"][b])
            for b in range(p, arch.num_blocks)
        ]
        for p, tasks in arch.branches()
    ]
    return {"trunk": trunk, "branches": branches}


# --------------------------------------------------------------------------------------------
# Gradients


def _map_tasks(fn: Callable, xs: Any, task_map: str) -> Any:
    """``fn`` over the leading (task) axis of ``xs``: vmapped, ``lax.map`` or K traced calls."""
    if task_map == "vmap":
        return jax.vmap(fn)(xs)
    if task_map == "scan":
        return jax.lax.map(fn, xs)
    k = jax.tree.leaves(xs)[0].shape[0]
    rows = [fn(jax.tree.map(lambda a, t=t: a[t], xs)) for t in range(k)]
    return jax.tree.map(lambda *r: jnp.stack(r), *rows)


def tree_value_and_grads(
    tree: TreeModel, loss_fn: TaskLoss, *, task_map: str = "vmap"
) -> Callable[..., tuple[jax.Array, dict, dict]]:
    """``fn(params, state, x, targets) -> (losses f32[K], grads, new_state)`` (train mode).

    ``grads`` is shaped like ``params`` but for the trunk and group copies, whose leaves are
    Jacobian rows ``[K, ...]`` (row t: ``d loss_t / d leaf``, zero for tasks that do not use it);
    one task's copies and the heads get that task's own gradient (:meth:`TreeModel.task_specific`).

    Cost: one trunk forward; per task one forward and backward through its branch and head (their
    structures differ per task: a Python loop); K backward passes through the trunk alone for
    the rows, mapped over the tasks by ``task_map``: ``"vmap"`` (default), ``"scan"``
    (``lax.map``) or ``"unroll"`` (K calls, no batched convolutions: the XLA:CPU choice).

    Args:
      tree: the model.
      loss_fn: ``(task name, prediction, targets) -> f32[]``.
      task_map: one of ``"vmap"``, ``"scan"``, ``"unroll"``.
    """
    if task_map not in TASK_MAPS:
        raise ValueError(f"Unknown task_map {task_map!r}; choose from {TASK_MAPS}.")
    k = tree.arch.num_tasks

    def fn(params: dict, state: dict, x: Any, targets: Any) -> tuple[jax.Array, dict, dict]:
        def trunk_fn(trunk_params):
            feats, new_state = tree.trunk(trunk_params, state["trunk"], x, True)
            return feats[1:], new_state

        feats, trunk_vjp, trunk_state = jax.vjp(trunk_fn, params["trunk"], has_aux=True)
        all_feats = [x, *feats]
        losses, cotangents, trunk_rows = [], [], []
        branch_rows: dict[int, list] = {}
        head_grads, branch_state = {}, [None] * len(tree.branches)
        for t, name in enumerate(tree.task_names):
            p = tree.arch.branch_points[t]
            c = tree.branch_of.get(t)

            def task_loss(inp, bparams, hparams, c=c, t=t, name=name):
                new_bs = None
                z = inp
                if c is not None:
                    z, new_bs = tree.branch(c, bparams, state["branches"][c], inp, True)
                pred = tree.head(t, hparams, z, True)
                return loss_fn(name, pred, targets), new_bs

            bparams = params["branches"][c] if c is not None else []
            loss, vjp, new_bs = jax.vjp(
                task_loss, all_feats[p], bparams, params["heads"][name], has_aux=True
            )
            g_inp, g_branch, g_head = vjp(jnp.ones_like(loss))
            losses.append(loss)
            head_grads[name] = g_head
            if c is not None:
                branch_rows.setdefault(c, {})[t] = g_branch
                if branch_state[c] is None:
                    branch_state[c] = new_bs
            if tree.arch.trunk_depth:
                cot = [jnp.zeros_like(f) for f in feats]
                if p > 0:
                    cot[p - 1] = g_inp
                if task_map == "unroll":  # (in the loop, as the study's step always did)
                    trunk_rows.append(trunk_vjp(cot)[0])
                else:
                    cotangents.append(cot)
        if not tree.arch.trunk_depth:
            trunk_grads = []
        elif task_map == "unroll":
            trunk_grads = jax.tree.map(lambda *r: jnp.stack(r), *trunk_rows)
        else:
            stacked = jax.tree.map(lambda *c: jnp.stack(c), *cotangents)
            trunk_grads = _map_tasks(lambda cot: trunk_vjp(cot)[0], stacked, task_map)
        grads = {
            "trunk": trunk_grads,
            "branches": [_branch_grads(branch_rows[c], k) for c in range(len(tree.branches))],
            "heads": head_grads,
        }
        new_state = {"trunk": trunk_state, "branches": branch_state}
        return jnp.stack(losses), grads, new_state

    return fn


def _branch_grads(rows: dict[int, PyTree], k: int) -> PyTree:
    """One task's branch: its gradient; a group's: rows ``[K, ...]``, zero for non-members."""
    if len(rows) == 1:
        return next(iter(rows.values()))
    some = next(iter(rows.values()))
    full = [rows[t] if t in rows else jax.tree.map(jnp.zeros_like, some) for t in range(k)]
    return jax.tree.map(lambda *r: jnp.stack(r), *full)


# --------------------------------------------------------------------------------------------
# The update


def _unit_params(params: dict, unit: tuple[tuple[int, ...], str, Any]) -> PyTree:
    _, where, what = unit
    return [params["trunk"][b] for b in what] if where == "trunk" else params["branches"][what]


def unit_aggregation(
    tree: TreeModel, aggregator_for: Callable[[int], optax.GradientTransformation]
) -> optax.GradientTransformationExtraArgs:
    """Aggregates every parameter unit (:meth:`TreeModel.units`) over the rows of exactly the
    tasks that use it; heads and one task's copies keep their own gradient.

    Consumes :func:`tree_value_and_grads`' gradients (``update(grads, state, params, *,
    task_losses)``): a unit used by n > 1 tasks gets its own aggregator ``aggregator_for(n)``
    over those n rows (and their n losses), a unit of one task that task's row. Unlike
    ``mtl.shared_rows(aggregator, tree.task_specific)`` (one aggregator over all K rows, zero
    rows included), ``mean`` then averages over a block's users only.
    """
    units = tree.units()
    aggregators = [aggregator_for(len(users)) if len(users) > 1 else None for users, _, _ in units]

    def init(params: dict) -> tuple:
        return tuple(
            optax.EmptyState() if a is None else a.init(_unit_params(params, units[u]))
            for u, a in enumerate(aggregators)
        )

    def update(grads: dict, state: tuple, params: dict | None = None, **extra: Any):
        if params is None:
            raise ValueError("unit_aggregation needs the parameters: update(grads, state, params).")
        task_losses = extra.get("task_losses")
        out = {"trunk": [None] * len(grads["trunk"]), "branches": list(grads["branches"])}
        new_state = list(state)
        for u, (users, where, what) in enumerate(units):
            rows = (
                [grads["trunk"][b] for b in what] if where == "trunk" else grads["branches"][what]
            )
            if aggregators[u] is None:
                d = jax.tree.map(lambda r, t=users[0]: r[t], rows) if where == "trunk" else rows
            else:
                idx = np.array(users)
                jac = jax.tree.map(lambda r, i=idx: r[i], rows)
                kw = {} if task_losses is None else {"task_losses": task_losses[jnp.array(users)]}
                d, new_state[u] = aggregators[u].update(
                    jac, state[u], _unit_params(params, units[u]), **kw
                )
            if where == "trunk":
                for i, b in enumerate(what):
                    out["trunk"][b] = d[i]
            else:
                out["branches"][what] = d
        return {**out, "heads": grads["heads"]}, tuple(new_state)

    return optax.GradientTransformationExtraArgs(init, update)


class RetrainState(NamedTuple):
    """``params`` and ``model_state`` as :class:`TreeModel`'s; ``opt_state`` of the transform;
    ``first_nonfinite``: the first step with a non-finite task loss (-1: none)."""

    step: jax.Array
    params: dict
    model_state: dict
    opt_state: Any
    first_nonfinite: jax.Array


class Retrain(NamedTuple):
    """``init(params, model_state) -> RetrainState``; ``step(state, x, targets) -> (state,
    {"losses": f32[K]})``."""

    init: Callable[[dict, dict], RetrainState]
    step: Callable[..., tuple[RetrainState, dict[str, jax.Array]]]


def make_retrain(
    tree: TreeModel,
    loss_fn: TaskLoss,
    tx: optax.GradientTransformation,
    *,
    task_map: str = "vmap",
) -> Retrain:
    """The retrain step: :func:`tree_value_and_grads`, then ``tx`` on the whole tree.

    ``tx`` takes the gradient format of :func:`tree_value_and_grads` and ``task_losses``: e.g.
    ``optax.chain(mtl.shared_rows(aggregator, tree.task_specific), optimizer)`` or
    ``optax.chain(unit_aggregation(tree, aggregator_for), optimizer)``.
    """
    value_and_grads = tree_value_and_grads(tree, loss_fn, task_map=task_map)

    def init(params: dict, model_state: dict) -> RetrainState:
        return RetrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            first_nonfinite=jnp.full((), -1, jnp.int32),
        )

    def step(state: RetrainState, x: Any, targets: Any) -> tuple[RetrainState, dict]:
        losses, grads, model_state = value_and_grads(state.params, state.model_state, x, targets)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, task_losses=losses)
        finite = jnp.all(jnp.isfinite(losses))
        first = jnp.where((state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite)
        new_state = RetrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            model_state=model_state,
            opt_state=opt_state,
            first_nonfinite=first,
        )
        return new_state, {"losses": losses}

    return Retrain(init, step)


def recompute_tree_statistics(
    tree: TreeModel, params: dict, model_state: dict, inputs: Sequence[Any]
) -> dict:
    """Every stream's running statistics recomputed from train-mode forwards of ``params`` over
    the input batches ``inputs`` (``x [B, ...]`` each): the trunk's from ``x``, branch c's from
    its own input ``s_{p_c}``; nothing shared or averaged across streams. Precise BN (Wu &
    Johnson 2021, :func:`mtl_jax.batchnorm.recompute_statistics`: per stream the mean over the
    batches of the batch mean and of the biased batch variance)."""
    if not jax.tree.leaves(model_state):  # no BatchNorm
        return model_state

    def update_fn(state: dict, x: Any) -> dict:
        return tree.train_mode_state(params, state, x)

    return recompute_statistics(update_fn, model_state, inputs)
