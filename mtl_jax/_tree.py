"""Pytree helpers shared by the library: leaf paths, task-axis checks.

A *task Jacobian* (docs/design/DESIGN.md, "Data model") is a pytree shaped like the parameters whose every
leaf has a leading task axis of size K: ``jac[leaf].shape == (K, *param[leaf].shape)``. The
helpers here validate that contract and raise errors that name the offending leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any

_MAX_LISTED = 8


def key_str(key: Any) -> str:
    """One path entry as text: ``DictKey('a') -> 'a'``, ``SequenceKey(0) -> '0'``."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """A key path as a ``/``-joined string, e.g. ``'params/Dense_0/kernel'``."""
    return "/".join(key_str(k) for k in path)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``(path string, leaf)`` pairs in flattening order; optax ``MaskedNode`` leaves are skipped."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
    return [(path_str(p), leaf) for p, leaf in flat if not _is_masked(leaf)]


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def path_difference(paths: Sequence[str], others: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(in paths only, in others only)``: the leaves two pytrees' structures disagree on."""
    path_set, other_set = set(paths), set(others)
    return [p for p in paths if p not in other_set], [p for p in others if p not in path_set]


def task_axis_size(jac: PyTree, what: str = "task Jacobian") -> int:
    """The K shared by every leaf's leading axis; a clear error if the leaves disagree.

    Raises:
      ValueError: if the tree has no leaves, a leaf is a scalar, or leaves disagree on K.
    """
    pairs = leaves_with_paths(jac)
    if not pairs:
        raise ValueError(f"The {what} has no array leaves.")
    sizes: dict[int, list[str]] = {}
    for path, leaf in pairs:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"Leaf {path!r} of the {what} is a scalar; every leaf needs a leading task axis "
                "of size K (shape (K, *param.shape))."
            )
        sizes.setdefault(shape[0], []).append(path)
    if len(sizes) > 1:
        detail = "; ".join(f"K={k}: {_listing(v)}" for k, v in sorted(sizes.items()))
        raise ValueError(
            f"The leaves of the {what} disagree on the task axis (leading dimension): {detail}."
        )
    return next(iter(sizes))


def check_jacobian_matches(jac: PyTree, params: PyTree) -> None:
    """Checks that ``jac`` has the structure of ``params`` and leaves shaped ``(K, *param.shape)``.

    Raises:
      ValueError: naming the first mismatching leaves.
    """
    jac_pairs = leaves_with_paths(jac)
    par_pairs = leaves_with_paths(params)
    jac_paths = [p for p, _ in jac_pairs]
    par_paths = [p for p, _ in par_pairs]
    if jac_paths != par_paths:
        missing, extra = path_difference(par_paths, jac_paths)
        raise ValueError(
            "The task Jacobian does not have the structure of the parameters. "
            f"Leaves only in the parameters: [{_listing(missing)}]; "
            f"leaves only in the Jacobian: [{_listing(extra)}]."
        )
    bad = [
        f"{path}: jac {tuple(jnp.shape(j))} vs param {tuple(jnp.shape(p))}"
        for (path, j), (_, p) in zip(jac_pairs, par_pairs, strict=True)
        if tuple(jnp.shape(j)[1:]) != tuple(jnp.shape(p))
    ]
    if bad:
        raise ValueError(
            "Task-Jacobian leaves must be shaped (K, *param.shape); mismatching leaves: "
            + _listing(bad)
        )


def check_task_losses(task_losses: Any, num_tasks: int) -> None:
    """Checks that ``task_losses`` is a vector of length K."""
    if task_losses is None:
        return
    shape = jnp.shape(task_losses)
    if shape != (num_tasks,):
        raise ValueError(
            f"task_losses has shape {shape}, but the task Jacobian has K={num_tasks} tasks; "
            f"expected shape ({num_tasks},)."
        )
