"""Mutable state (BatchNorm statistics) of the task streams.

A normalisation layer inside the task streams keeps per-task running statistics; its scale and
bias stay shared unless the layer itself is branched. State leaves marked :data:`COPIED` keep
their K rows; a :data:`SHARED` leaf computed before the branch comes out of the ``vmap``
unbatched, exactly; a shared leaf computed inside the streams is an error unless
``state_reduction`` averages it on purpose; a layer whose parameters are copied but whose
statistics are not is an error. :func:`state_spec_per_task` and :func:`copy_state_per_task`
copy every statistic; :func:`reduce_task_state` reduces a state with a task axis as
:func:`~mtl_jax.sharing.per_task` does.

The rules and why: ``docs/custom_loop.md``, section "Mutable state in the task streams".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import _tree

from .markers import COPIED, SHARED, Marker, _is_marker, _normalize
from .paths import COLLECTIONS, _listing, _paths, layer_key
from .specs import _expand, copy_per_task

PyTree = Any

__all__ = [
    "StateReduction",
    "copy_state_per_task",
    "reduce_task_state",
    "state_spec_per_task",
]


StateReduction = str | Callable[[jax.Array], jax.Array] | None


def _reduce_mean(x: jax.Array) -> jax.Array:
    """Mean over the task axis; exactly ``x[0]`` when all rows agree (layers before the branch)."""
    x = jnp.asarray(x)
    same = jnp.all(x == x[0])
    mean = jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.inexact) else x[0]
    return jnp.where(same, x[0], mean).astype(x.dtype)


def _strip_collection(path: str, collections: Sequence[str] = COLLECTIONS) -> str:
    """``path`` without a leading Flax collection name (``'batch_stats/bn1/mean' -> 'bn1/mean'``)."""
    head, sep, rest = path.partition("/")
    return rest if sep and head in collections else path


def _match_path(path: str, candidates: Sequence[str]) -> str | None:
    """The candidate naming the same leaf (or layer) as ``path``: itself if present, else the
    *unique* candidate that ends with ``'/' + path`` (a suffix aligned on whole path components,
    e.g. ``'encoder/bn1'`` for ``'bn1'``); ``None`` when there is none or several (``'bn1'`` vs
    ``'bn1'`` and ``'layer1_0/bn1'`` of a ResNet: exact only)."""
    if path in candidates:
        return path
    hits = [c for c in candidates if c.endswith("/" + path)]
    return hits[0] if len(hits) == 1 else None


def _state_markers(state: PyTree, spec: PyTree, state_spec: PyTree | None) -> list[Marker]:
    """The marker of every state leaf: from ``state_spec``, or matched by path in ``spec``.

    Matching (no ``state_spec``): the spec leaf at the same path; else, with a leading Flax
    collection stripped on both sides, the same path; else the unique spec path that ends with
    it on a whole component (:func:`_match_path`); else :data:`SHARED`.
    """
    if state_spec is not None:
        return _expand(state_spec, state)
    spec_flat = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_marker)[0]
    full = {_tree.path_str(p): m for p, m in spec_flat}
    stripped: dict[str, list[Any]] = {}
    for path, m in full.items():
        stripped.setdefault(_strip_collection(path), []).append(m)
    unique = {k: v[0] for k, v in stripped.items() if len(v) == 1}
    keys = list(unique)
    markers = []
    for path in _paths(state):
        if path in full:
            found = full[path]
        else:  # e.g. the spec covers (params, batch_stats) and apply returns batch_stats only
            key = _match_path(_strip_collection(path), keys)
            found = unique[key] if key is not None else SHARED
        markers.append(_normalize(found, path))
    _check_copied_layers_keep_state(state, markers, full)
    return markers


def _check_copied_layers_keep_state(
    state: PyTree, markers: list[Marker], spec_by_path: dict[str, Any]
) -> None:
    """No silent averaging: a state leaf of a layer whose parameters are copied must be copied.

    Layers are matched by exact :func:`layer_key` (collection stripped), or by a unique suffix
    aligned on whole path components (``'bn1'`` is not ``'layer1_0/bn1'``)."""
    spec_layers = list(dict.fromkeys(layer_key(p) for p in spec_by_path))
    copied_layers = {layer_key(p) for p, m in spec_by_path.items() if _normalize(m, p) is COPIED}
    bad = []
    for path, marker in zip(_paths(state), markers, strict=True):
        if marker is not COPIED and _match_path(layer_key(path), spec_layers) in copied_layers:
            bad.append(path)
    if bad:
        raise ValueError(
            f"State leaves [{_listing(bad)}] belong to layers whose parameters are copied per "
            "task, but the spec does not copy them, so per_task would average their per-task "
            "values. Build the spec over the whole variables (mtl.sharing.layer_spec(variables, "
            "layers) or mtl.recon.branch) and copy_per_task them too, or pass state_spec "
            "explicitly (SHARED there averages them on purpose)."
        )


def _reducer(reduction: StateReduction) -> Callable[[jax.Array], jax.Array] | None:
    if reduction is None:
        return None
    if reduction == "mean":
        return _reduce_mean
    if callable(reduction):
        return reduction
    raise ValueError(f"state_reduction must be None, 'mean' or a callable; got {reduction!r}.")


def _stream_dependent_error(caller: str, paths: Sequence[str]) -> ValueError:
    return ValueError(
        f"{caller}: the shared state leaves [{_listing(paths)}] are computed inside the task "
        "streams (after a copied or masked leaf), so each stream has its own value; averaging "
        "them over the tasks would evaluate every stream with the statistics of all streams. "
        "Copy the state per task: mtl.recon.branch does, or mtl.sharing.copy_per_task with a "
        "state spec that is COPIED (mtl.sharing.state_spec_per_task / copy_state_per_task); or "
        "pass state_reduction='mean' explicitly to average on purpose."
    )


def _split_state(
    state: PyTree, spec: PyTree, state_spec: PyTree | None, reduction: StateReduction
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """A task stream's new state as (leaves that come out with their K rows, shared leaves that
    must come out of the vmap unbatched, how to put them back together)."""
    markers = _state_markers(state, spec, state_spec)
    leaves, treedef = jax.tree.flatten(state)
    keep = [m is COPIED or reduction is not None for m in markers]
    info = {"treedef": treedef, "markers": markers, "keep": keep, "paths": _paths(state)}
    rows = [x for x, k in zip(leaves, keep, strict=True) if k]
    shared = [x for x, k in zip(leaves, keep, strict=True) if not k]
    return rows, shared, info


def _join_state(
    rows: list[Any], shared: list[Any], info: dict[str, Any], reduction: StateReduction
) -> PyTree:
    reduce = _reducer(reduction)
    rows_it, shared_it = iter(rows), iter(shared)
    out = []
    for m, k in zip(info["markers"], info["keep"], strict=True):
        if not k:
            out.append(next(shared_it))
        else:
            x = next(rows_it)
            out.append(x if m is COPIED else reduce(x))
    return info["treedef"].unflatten(out)


def _is_out_axes_error(err: ValueError) -> bool:
    return "out_axes" in str(err)


def _shared_paths(info: dict[str, Any], dependent: Sequence[bool]) -> list[str]:
    """Paths of the shared (un-kept) state leaves flagged ``dependent`` (all of them if none is:
    the data-flow analysis is conservative, vmap's verdict is the reference)."""
    paths = [p for p, k in zip(info["paths"], info["keep"], strict=True) if not k]
    flagged = [p for p, d in zip(paths, dependent, strict=True) if d]
    return flagged or paths


def _state_flags(tree: PyTree, whole_tree_is_state: bool) -> list[bool]:
    """Per array leaf of ``tree`` (flattening order): is it a running statistic (mutable state)?

    NNX states: leaves held by an ``nnx.BatchStat``. Linen variables (a mapping with a
    ``'params'`` collection): every leaf outside ``params``. Any other tree:
    ``whole_tree_is_state``."""
    from flax import nnx

    is_var = lambda x: isinstance(x, nnx.Variable)
    n_leaves = len(jax.tree.leaves(tree))
    variables = jax.tree.leaves(tree, is_leaf=is_var)
    if any(is_var(v) for v in variables):
        flags = [isinstance(v, nnx.BatchStat) for v in variables]
        if len(flags) != n_leaves:
            raise ValueError("An NNX state whose variables hold several arrays is not supported.")
        return flags
    if isinstance(tree, dict) and "params" in tree:
        return [
            _tree.path_str(p).partition("/")[0] != "params"
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
        ]
    return [whole_tree_is_state] * n_leaves


def state_spec_per_task(tree: PyTree, spec: PyTree | None = None) -> PyTree:
    """A spec that copies every running statistic of ``tree`` per task (:data:`COPIED`).

    The semantics of a normalisation layer inside the task streams (see the module docstring):
    each stream is trained with its own batch statistics, so it keeps its own running
    statistics. State leaves are: for Linen variables (``{"params": ..., "batch_stats": ...}``)
    every leaf outside ``params``; for an NNX state every ``nnx.BatchStat`` (BatchNorm ``mean``
    / ``var``); any other tree (``variables["batch_stats"]``, a state alone) is all state.
    Every other leaf takes its marker from ``spec`` (or a prefix of it), :data:`SHARED` without.

    Example::

      sspec = state_spec_per_task(variables["batch_stats"])   # every leaf COPIED
      spec = state_spec_per_task(variables, layer_spec(variables, ["Dense_1"]))
    """
    flags = _state_flags(tree, whole_tree_is_state=True)
    leaves, treedef = jax.tree.flatten(tree)
    base = _expand(spec, tree) if spec is not None else [SHARED] * len(leaves)
    return treedef.unflatten([COPIED if f else m for f, m in zip(flags, base, strict=True)])


def copy_state_per_task(tree: PyTree, num_tasks: int) -> PyTree:
    """``tree`` with every state leaf (see :func:`state_spec_per_task`) repeated to ``[K, ...]``;
    the other leaves as they are. Pairs with ``state_spec_per_task(tree)``."""
    return copy_per_task(tree, state_spec_per_task(tree), num_tasks)


def reduce_task_state(
    state: PyTree,
    spec: PyTree,
    *,
    state_spec: PyTree | None = None,
    state_reduction: StateReduction = None,
) -> PyTree:
    """Reduces a state with a task axis (leaves ``[K, ...]``) as :func:`per_task` does.

    Copied state leaves keep their K rows. Shared ones: with ``state_reduction`` ``"mean"`` or a
    callable, reduced with it; with ``None`` (default) their rows must be identical (a layer
    before the branch) and row 0 is returned -- checked on concrete arrays; rows that differ, or
    traced arrays (the check needs values; pass ``state_reduction`` explicitly under ``jit``),
    are a ``ValueError`` naming the leaves. A layer whose parameters are copied but whose
    statistics are not is an error.
    """
    reduce = _reducer(state_reduction)
    markers = _state_markers(state, spec, state_spec)
    leaves, treedef = jax.tree.flatten(state)
    if reduce is None:
        shared = [
            (p, x)
            for p, m, x in zip(_paths(state), markers, leaves, strict=True)
            if m is not COPIED
        ]
        traced = [p for p, x in shared if isinstance(x, jax.core.Tracer)]
        if traced:
            raise ValueError(
                f"reduce_task_state: the shared state leaves [{_listing(traced)}] are traced, so "
                "whether their task rows agree cannot be checked; pass state_reduction='mean' "
                "(or a callable) explicitly, or copy the state per task."
            )
        differ = [p for p, x in shared if not np.all(np.asarray(x) == np.asarray(x)[0])]
        if differ:
            raise _stream_dependent_error("reduce_task_state", differ)
        reduce = lambda x: x[0]
    out = [x if m is COPIED else reduce(x) for m, x in zip(markers, leaves, strict=True)]
    return treedef.unflatten(out)
