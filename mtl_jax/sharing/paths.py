"""Leaf paths and layers: path filters, and specs that copy whole layers by name.

Paths are ``/``-joined key paths (``'params/encoder/Conv_0/kernel'`` in Linen,
``'encoder/conv0/kernel/value'`` in NNX). :func:`match_paths` and :func:`path_filter` make path
predicates; :func:`layer_key` names the layer (module) of a leaf without its Flax collection, so
that a layer's parameters and its BatchNorm statistics have one key; :func:`layer_spec` copies
the named layers, parameters *and* statistics.

See ``docs/custom_loop.md``, section "Sharing specs".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from mtl_jax import _tree
from mtl_jax.gramian import by_module

from .markers import COPIED, SHARED

PyTree = Any
PathFilter = Callable[[str], bool] | str | None

__all__ = [
    "COLLECTIONS",
    "PathFilter",
    "layer_key",
    "layer_names",
    "layer_spec",
    "match_paths",
    "path_filter",
]


def match_paths(*patterns: str) -> Callable[[str], bool]:
    """A path predicate: ``True`` when any regex in ``patterns`` is found in the leaf path.

    Paths are ``/``-joined, e.g. ``'params/encoder/Conv_0/kernel'`` (Linen) or
    ``'encoder/conv0/kernel/value'`` (NNX). Example: ``match_paths('^params/encoder/')``.
    """
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(c.search(path) for c in compiled)


def path_filter(include: PathFilter) -> Callable[[str], bool]:
    """Normalises a path filter: ``None`` (every leaf), a regex string, or a predicate."""
    if include is None:
        return lambda path: True
    if isinstance(include, str):
        return match_paths(include)
    if callable(include):
        return include
    raise TypeError(f"A path filter must be None, a regex string or a callable; got {include!r}.")


def _listing(items: Sequence[str]) -> str:
    return _tree._listing(list(items))


def _paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [_tree.path_str(p) for p, _ in flat]


#: Top-level keys dropped by :func:`layer_key`: Flax Linen's collections, so that a layer's
#: parameters (``params/BatchNorm_0/scale``) and statistics (``batch_stats/BatchNorm_0/mean``)
#: have one key. NNX states have no collection level (``bn/scale/value``, ``bn/mean/value``).
COLLECTIONS: tuple[str, ...] = ("params", "batch_stats")


def layer_key(path: str, collections: Sequence[str] = COLLECTIONS) -> str:
    """The layer (module) a leaf belongs to, without its collection.

    :func:`mtl_jax.gramian.by_module` of the path (a module's kernel and bias, or a BatchNorm's scale,
    bias, mean and var, form one layer), with a leading Flax collection name dropped:
    ``'params/Conv_0/kernel' -> 'Conv_0'``, ``'batch_stats/bn1/mean' -> 'bn1'``,
    ``'bn1/scale' -> 'bn1'``, ``'encoder/conv0/kernel/value' -> 'encoder/conv0'`` (NNX).
    """
    key = by_module(path)
    head, sep, rest = key.partition("/")
    return rest if sep and head in collections else key


def layer_names(tree: PyTree, collections: Sequence[str] = COLLECTIONS) -> list[str]:
    """The layers of ``tree`` (see :func:`layer_key`), in order of first appearance."""
    return list(dict.fromkeys(layer_key(p, collections) for p in _paths(tree)))


def layer_spec(
    tree: PyTree, layers: Sequence[str], collections: Sequence[str] = COLLECTIONS
) -> PyTree:
    """A spec shaped like ``tree``: :data:`COPIED` for every leaf of the named layers, else SHARED.

    Built over the whole variables (parameters *and* BatchNorm statistics), so a copied
    BatchNorm layer keeps per-task statistics in :func:`per_task` (``has_state=True``); built over
    a state tree alone it is the ``state_spec`` of :func:`per_task`. Layer names are those of
    :func:`layer_key` (with or without the collection: ``'BatchNorm_0'`` and
    ``'params/BatchNorm_0'`` name the same layer), e.g. the groups of a
    :class:`mtl_jax.ConflictTracker` built with ``granularity=mtl.gramian.by_module``.

    Example::

      variables = model.init(key, x)              # {"params": ..., "batch_stats": ...}
      spec = layer_spec(variables, ["Conv_1", "BatchNorm_1"])
      variables = copy_per_task(variables, spec, num_tasks=2)
      forward = per_task(apply, spec, 2, has_state=True)   # per-task BatchNorm_1 statistics

    Raises:
      ValueError: for a layer name that matches no leaf (listing the layers there are).
    """
    wanted = {layer_key(name + "/_", collections) for name in layers}
    present = layer_names(tree, collections)
    unknown = [name for name in layers if layer_key(name + "/_", collections) not in present]
    if unknown:
        raise ValueError(
            f"Layers not found: {unknown}"
            f"{_tree.suggestions(unknown, present).replace('paths', 'layers')}. Layers of the "
            f"tree: [{_listing(present)}] (names as mtl.sharing.layer_key gives them)."
        )
    return jax.tree_util.tree_map_with_path(
        lambda p, _: COPIED if layer_key(_tree.path_str(p), collections) in wanted else SHARED,
        tree,
    )
