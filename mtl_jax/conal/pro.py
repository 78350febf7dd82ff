"""CoNAL-Pro: the progressive search with task groups (details UNVERIFIED in the paper).

Stages go from the deepest branch point ``d = B`` toward the input; in stage d the undecided
tasks search over ``0..d``; those whose argmax is d are decided and form task groups whose
private copies of blocks ``d..B-1`` are averaged and tied (the paper's partially-specific
``h_S``). Our additions: tasks whose shared-block gradients conflicted at the stage's last step
go to different groups (:func:`split_by_conflict`); stages reuse one jitted step. The algorithm
step by step: ``docs/recipes/conal.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import aggregation

from .architecture import Architecture, discretise
from .search import Batch, Search, SearchState, _apply_tie

__all__ = ["pro_architecture", "pro_decide", "pro_restrict", "search_pro", "split_by_conflict"]


def _decided(candidates: np.ndarray) -> np.ndarray:
    return candidates.sum(axis=1) == 1


def pro_restrict(state: SearchState, depth: int) -> SearchState:
    """Starts the CoNAL-Pro stage ``depth``: undecided tasks may choose branch points ``0..depth``."""
    cand = np.asarray(state.candidates)
    p = cand.shape[1]
    if not 0 <= depth < p:
        raise ValueError(f"depth must lie in 0..{p - 1}; got {depth}.")
    undecided = ~_decided(cand)
    row = np.arange(p) <= depth
    cand = np.where(undecided[:, None], row[None, :], cand)
    return state._replace(candidates=jnp.asarray(cand))


def _shared_gram(state: SearchState) -> np.ndarray | None:
    """The last step's Gram matrix of the task gradients summed over the shared blocks, if any."""
    grams = aggregation.gram(state.aggregator_state)
    if grams is None:
        return None
    if isinstance(grams, dict):
        return np.sum([np.asarray(g) for g in grams.values()], axis=0) if grams else None
    return np.asarray(grams)


def split_by_conflict(tasks: Sequence[int], gram: np.ndarray | None) -> list[tuple[int, ...]]:
    """Greedy grouping in task order: a task joins the first group it conflicts with in no pair
    (``G_tu >= 0`` for every member u), else starts a new group. ``gram=None``: one group."""
    if gram is None:
        return [tuple(tasks)] if tasks else []
    groups: list[list[int]] = []
    for t in tasks:
        for g in groups:
            if all(gram[t, u] >= 0 for u in g):
                g.append(t)
                break
        else:
            groups.append([t])
    return [tuple(g) for g in groups]


def pro_decide(
    state: SearchState,
    depth: int,
    *,
    tie_break: str = "shared",
    force: bool = False,
    split_conflicting: bool = True,
) -> tuple[SearchState, tuple[tuple[int, ...], ...]]:
    """Ends the CoNAL-Pro stage ``depth``: decides the undecided tasks whose argmax is ``depth``.

    With ``force`` every undecided task is decided at ``depth`` (the last stage). The decided
    tasks get a one-hot candidate row. When ``depth < B`` they form task groups: with
    ``split_conflicting`` (and a shared-block Gram matrix in the state, i.e. ``nocl`` or
    ``track_conflict``) tasks whose gradients on the shared blocks conflicted at the last step
    go to different groups (:func:`split_by_conflict`; our choice: a group copy shared by
    conflicting tasks would reintroduce the conflict CoNAL removes), else one group. Each group's
    private copies (params and model state) of blocks ``depth..B-1`` are averaged and tied
    (``state.tie``), so the group trains one partially-specific copy from now on.

    Returns:
      ``(state, groups)``: the decided task groups (tuples of task indices).
    """
    cand = np.asarray(state.candidates)
    p = cand.shape[1]
    nb = p - 1
    undecided = np.flatnonzero(~_decided(cand))
    choice = discretise(state.params["alpha"], cand, tie_break=tie_break)
    decided = [int(t) for t in undecided if force or choice[t] == depth]
    if not decided:
        return state, ()
    cand = cand.copy()
    cand[decided] = np.arange(p) == depth
    gram = _shared_gram(state) if split_conflicting else None
    groups = tuple(split_by_conflict(decided, gram)) if depth < nb else (tuple(decided),)
    tie = np.asarray(state.tie).copy()
    for group in groups:
        if depth == nb or len(group) < 2:
            continue
        g = np.array(group)
        for b in range(depth, nb):
            tie[b][np.ix_(g, g)] = 1.0 / len(g)
    tie_j = jnp.asarray(tie, state.tie.dtype)
    params = {**state.params, "private": _apply_tie(state.params["private"], tie_j)}
    model_state = {
        "shared": state.model_state["shared"],
        "private": _apply_tie(state.model_state["private"], tie_j),
    }
    new = state._replace(
        params=params, model_state=model_state, candidates=jnp.asarray(cand), tie=tie_j
    )
    return new, groups


def pro_architecture(state: SearchState) -> Architecture:
    """The grouped :class:`Architecture` of a finished CoNAL-Pro search (every task decided).

    Branch points from the one-hot candidate rows; groups from the tie matrices of the last
    block (tasks tied there share their copies).
    """
    cand = np.asarray(state.candidates)
    if not _decided(cand).all():
        raise ValueError("pro_architecture: some tasks are undecided; finish the stages first.")
    bps = tuple(int(np.flatnonzero(row)[0]) for row in cand)
    last_tie = np.asarray(state.tie)[-1]
    labels = tuple(int(np.flatnonzero(row > 0)[0]) for row in last_tie)
    return Architecture(bps, cand.shape[1] - 1, grouped=True, group_labels=labels)


def search_pro(
    search: Search,
    state: SearchState,
    batches: Iterator[tuple[Batch, Batch]],
    steps_per_stage: int,
    *,
    tie_break: str = "shared",
    step_fn: Callable | None = None,
) -> tuple[Architecture, SearchState, list[dict[str, Any]]]:
    """CoNAL-Pro: progressive stages from the deepest branch point toward the input.

    Args:
      search: from :func:`make_search`.
      state: its initial (or a warm) state.
      batches: yields ``(train_batch, val_batch)``.
      steps_per_stage: search steps per stage.
      tie_break: as in :func:`discretise`.
      step_fn: the step to call (default ``jax.jit(search.step)``; pass your jitted step to reuse
        its compilation).

    Returns:
      ``(Architecture(grouped=True), final state, history)``; history has one entry per stage:
      ``{"depth", "decided": task groups, "alpha_softmax"}`` (the last step's masked softmax).
    """
    if steps_per_stage < 1:
        raise ValueError(f"steps_per_stage must be >= 1; got {steps_per_stage}.")
    step = step_fn or jax.jit(search.step)
    nb = search.supernet.num_blocks
    history: list[dict[str, Any]] = []
    for depth in range(nb, -1, -1):
        if _decided(np.asarray(state.candidates)).all() and depth < nb:
            break
        metrics: dict[str, Any] = {}
        if depth > 0:  # (at depth 0 the remaining tasks have a single candidate: no search)
            state = pro_restrict(state, depth)
            for _ in range(steps_per_stage):
                train_batch, val_batch = next(batches)
                state, metrics = step(state, train_batch, val_batch)
        state, groups = pro_decide(state, depth, tie_break=tie_break, force=depth == 0)
        history.append(
            {
                "depth": depth,
                "decided": groups,
                "alpha_softmax": np.asarray(metrics["alpha_softmax"]) if metrics else None,
            }
        )
    return pro_architecture(state), state, history
