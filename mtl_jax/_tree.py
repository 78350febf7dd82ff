"""Pytree helpers shared by the library: leaf paths, task-axis checks.

A *task Jacobian* (docs/design/DESIGN.md, "Data model") is a pytree shaped like the parameters whose every
leaf has a leading task axis of size K: ``jac[leaf].shape == (K, *param[leaf].shape)``. The
helpers here validate that contract and raise errors that name the offending leaves.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


# ---------------------------------------------------------------------------------------------
# Checks of the inputs a user gets wrong (issue 26): trace time, shapes and dtypes only.

#: Flax collections that hold model *state*, never parameters: a tree with one of these keys at
#: its top is the whole ``variables`` dict, not ``variables["params"]``.
STATE_COLLECTIONS: tuple[str, ...] = ("batch_stats",)


def close_matches(name: str, candidates: Sequence[str]) -> str:
    """``" (did you mean 'x', 'y'?)"`` for the nearest ``candidates`` (difflib), or ``""``."""
    near = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in near)}?)" if near else ""


def suggestions(unknown: Sequence[str], candidates: Sequence[str]) -> str:
    """``"; nearest valid paths: a -> b, ..."`` for the unknown paths that have a close match."""
    pairs = [
        f"{u!r} -> {', '.join(repr(c) for c in near)}"
        for u in unknown
        if (near := difflib.get_close_matches(u, list(candidates), n=3, cutoff=0.6))
    ]
    return f"; nearest valid paths: {'; '.join(pairs[:_MAX_LISTED])}" if pairs else ""


def check_not_variables(tree: PyTree, where: str) -> None:
    """Refuses a Flax ``variables`` dict (``{"params": ..., "batch_stats": ...}``) given as
    parameters: its BatchNorm statistics would be differentiated and updated like weights.

    Raises:
      ValueError: naming the collection and the fix.
    """
    if not isinstance(tree, Mapping):
        return
    found = [c for c in STATE_COLLECTIONS if c in tree]
    if found:
        raise ValueError(
            f"{where}: the tree has the Flax state collection {found[0]!r} at its top: this is "
            "the whole `variables` dict, and its statistics would be differentiated and updated "
            "as parameters. Pass variables['params'] as the parameters; pass the state "
            "separately: mtl.PerTaskLosses(..., has_state=True) takes fn(params, state, ...), "
            "or close over it in the loss function and return the new state as aux "
            "(has_aux=True)."
        )


def non_float_leaves(tree: PyTree, kind: Any = jnp.inexact) -> list[str]:
    """``"path: dtype(shape)"`` of every leaf of ``tree`` whose dtype is not a ``kind``."""
    return [
        f"{path}: {jnp.result_type(leaf)}{tuple(jnp.shape(leaf))}"
        for path, leaf in leaves_with_paths(tree)
        if not jnp.issubdtype(jnp.result_type(leaf), kind)
    ]


def check_float_leaves(tree: PyTree, where: str) -> None:
    """Every leaf of ``tree`` has a floating dtype (what is differentiated or updated).

    Raises:
      TypeError: naming the integer/bool leaves, their dtypes and the cast that fixes them.
    """
    bad = non_float_leaves(tree)
    if bad:
        raise TypeError(
            f"{where}: parameters must be floating-point (their gradients are); non-float "
            f"leaves: {_listing(bad)}. Cast them: jax.tree.map(lambda x: x.astype(jnp.float32), "
            "params), or keep integer state out of the parameters."
        )


def check_loss_vector(losses: Any, where: str, num_tasks: int | None = None) -> None:
    """``losses`` is a floating loss vector ``[K]`` (``[num_tasks]`` when given).

    Raises:
      ValueError: for another shape (a scalar: the summed loss; ``[K, B]``: per-example losses).
      TypeError: for a non-float dtype.
    """
    shape = tuple(jnp.shape(losses))
    expected = "[K]" if num_tasks is None else f"[{num_tasks}]"
    if len(shape) == 0:
        fix = "return the K task losses, jnp.stack([loss_1, ..., loss_K]), not their sum"
    elif len(shape) > 1:
        fix = f"reduce the batch: jnp.mean(losses, axis={tuple(range(1, len(shape)))})"
    elif num_tasks is not None and shape[0] != num_tasks:
        fix = f"return one loss per task ({num_tasks} tasks)"
    else:
        fix = ""
    if fix:
        raise ValueError(
            f"{where} must return a loss vector f32{expected} (one loss per task); got shape "
            f"{shape}: {fix}."
        )
    if not jnp.issubdtype(jnp.result_type(losses), jnp.floating):
        raise TypeError(
            f"{where} must return floating-point losses; got {jnp.result_type(losses)}{shape}."
        )


def check_scalar_loss(loss: Any, where: str) -> None:
    """``loss`` is one task's floating scalar loss.

    Raises:
      ValueError: for a non-scalar (e.g. per-example losses ``[B]``), naming the reduction.
      TypeError: for a non-float dtype.
    """
    shape = tuple(jnp.shape(loss))
    if shape:
        raise ValueError(
            f"{where} must return one task's loss, a scalar f32[]; got shape {shape}: reduce "
            f"it, e.g. jnp.mean(loss)."
        )
    if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise TypeError(f"{where} must return a floating-point loss; got {jnp.result_type(loss)}.")


def mask_problems(path: str, mask: Any) -> list[str]:
    """The dtype problems of one mask leaf (``[]`` if none): bool, or a concrete numeric array
    holding only 0 and 1 (values are read on concrete masks only; a traced mask, whose values
    trace time cannot see, must be bool). A float mask of scores (``|w|``, probabilities) would
    otherwise be read as ``!= 0``: all True, a silent dense run.
    """
    dtype = np.dtype(mask.dtype) if hasattr(mask, "dtype") else np.asarray(mask).dtype
    if np.issubdtype(dtype, np.bool_):
        return []
    if not np.issubdtype(dtype, np.number):
        return [f"{path}: dtype {dtype} is neither bool nor numeric; a mask is a bool array"]
    if isinstance(mask, jax.core.Tracer):
        return [
            f"{path}: a traced mask (a jit argument) of dtype {dtype}; its values cannot be "
            "checked at trace time, so a traced mask must be bool: cast it before the step "
            "(jax.tree.map(lambda m: m.astype(bool), masks))"
        ]
    values = np.asarray(mask)
    other = values[(values != 0) & (values != 1)]
    if other.size:
        return [
            f"{path}: {dtype} mask holds values other than 0 and 1 (e.g. {other.flat[0]!r}); a "
            "mask is bool: threshold scores (scores > t) or cast a 0/1 mask (.astype(bool))"
        ]
    return []
