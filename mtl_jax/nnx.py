"""Flax NNX helpers: which leaves of an NNX state are task-specific, by path or variable type.

:func:`mtl_jax.value_and_grads` and :func:`mtl_jax.shared_rows` take ``task_specific`` as a bool
pytree or a callable ``tree -> bool tree``. With NNX the same parameters appear as two trees:
the ``nnx.State`` a loss differentiates (leaf paths end in ``/value``) and the pure arrays that
``nnx.Optimizer`` hands to optax. :func:`task_specific_paths` (by path regex) and
:func:`task_specific_types` (by ``nnx.Variable`` subclass) build callables that label any tree
by its paths, so one object serves both (and Linen variable dicts and plain pytrees too). The
full recipe, with BatchNorm statistics through ``nnx.BatchStat``: ``docs/custom_loop.md``
(section "Flax NNX with BatchNorm"; it runs as a test).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from mtl_jax import _tree
from mtl_jax.sharing import match_paths

PyTree = Any

__all__ = ["leaf_path", "task_specific_paths", "task_specific_types"]

#: The attribute under which an ``nnx.Variable`` holds its array in a flattened ``nnx.State``.
VALUE_SUFFIX = "/value"


def leaf_path(path: Sequence[Any]) -> str:
    """A key path as a ``/``-joined string without NNX's trailing ``/value``.

    ``heads/0/kernel/value`` (a leaf of an ``nnx.State``) and ``heads/0/kernel`` (the same leaf
    in ``nnx.as_pure(state)`` or ``nnx.to_pure_dict``) both give ``'heads/0/kernel'``.
    """
    text = _tree.path_str(path)
    return text[: -len(VALUE_SUFFIX)] if text.endswith(VALUE_SUFFIX) else text


def _labeller(is_specific: Callable[[str], bool], what: str) -> Callable[[PyTree], PyTree]:
    def labels(tree: PyTree) -> PyTree:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        paths = [leaf_path(p) for p, _ in flat]
        marks = [bool(is_specific(p)) for p in paths]
        if paths and not any(marks):
            raise ValueError(
                f"task-specific labels: no leaf matches {what}; every leaf would be shared. "
                f"Leaf paths: [{_tree._listing(paths)}]. Pass False to value_and_grads / "
                "shared_rows for a model without task-specific leaves."
            )
        return jax.tree_util.tree_unflatten(treedef, marks)

    return labels


def task_specific_paths(*patterns: str) -> Callable[[PyTree], PyTree]:
    """``task_specific`` labels: ``True`` for leaves whose path matches any regex in ``patterns``.

    Paths are ``/``-joined with NNX's ``/value`` removed (see :func:`leaf_path`), so the same
    callable labels an ``nnx.State`` (what a loss differentiates) and its pure arrays (what
    ``nnx.Optimizer`` passes to optax). Examples: ``"^heads/"`` (an ``nnx.List`` of heads),
    ``"^head_"`` (Linen heads ``head_0``, ``head_1`` in ``variables["params"]``).

    Args:
      *patterns: regular expressions searched in each leaf path (``re.search``).

    Returns:
      ``labels(tree) -> bool tree`` shaped like ``tree``, for :func:`mtl_jax.value_and_grads`,
      :func:`mtl_jax.shared_rows`, :func:`mtl_jax.sharing.shared_view`.

    Raises:
      ValueError: if no pattern is given, or (when called) if no leaf of the tree matches: a
        typo would otherwise make every head a shared leaf. The error lists the paths.
    """
    if not patterns:
        raise ValueError("task_specific_paths needs at least one path pattern, e.g. '^heads/'.")
    return _labeller(match_paths(*patterns), f"the path patterns {list(patterns)}")


def task_specific_types(state: PyTree, *types: type[nnx.Variable]) -> Callable[[PyTree], PyTree]:
    """``task_specific`` labels: ``True`` for leaves held by an NNX variable of one of ``types``.

    For models that mark their task-specific parameters with their own variable type, e.g.
    ``class HeadParam(nnx.Param): pass`` (still an ``nnx.Param``, so ``nnx.Optimizer(...,
    wrt=nnx.Param)`` trains it). The types are read once from ``state`` (a module or an
    ``nnx.State``); the returned callable labels by path, so it also works on the pure arrays
    ``nnx.Optimizer`` passes to optax, where the variable types are gone.

    Args:
      state: an ``nnx.Module`` or an ``nnx.State`` holding the variables.
      *types: ``nnx.Variable`` subclasses whose leaves are task-specific (subclasses included).

    Returns:
      ``labels(tree) -> bool tree`` as :func:`task_specific_paths`.

    Raises:
      ValueError: if no type is given, a type is not an ``nnx.Variable`` subclass, or no
        variable of ``state`` has one of the types.
    """
    if not types:
        raise ValueError("task_specific_types needs at least one nnx.Variable type.")
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nnx.Variable))]
    if bad:
        raise ValueError(f"task_specific_types: {bad!r} are not nnx.Variable subclasses.")
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    is_var = lambda x: isinstance(x, nnx.Variable)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]
    specific = {_tree.path_str(p) for p, v in flat if is_var(v) and isinstance(v, types)}
    if not specific:
        found = sorted({type(v).__name__ for _, v in flat if is_var(v)})
        raise ValueError(
            f"task_specific_types: no variable has type {[t.__name__ for t in types]}; the "
            f"state holds {found}."
        )
    return _labeller(lambda path: path in specific, f"the variable types {types}")
