"""Sharing specs: check, build and combine them; read task-specific labels off them.

:func:`check_spec` validates a spec against task-stacked parameters and returns K;
:func:`make_spec` and :func:`merge_specs` build specs; :func:`copy_per_task` adds the task axis
to the copied leaves (every copy starts from the shared value, as Recon's paper initialises
them). :func:`spec_task_specific`, :func:`task_specific_leaves` and :func:`shared_view` turn a
spec (or a bool tree) into the task-specific labels of the gradient adapters and the shared part
the conflict metrics are measured on (Recon: "the remaining shared parameters").

See ``docs/custom_loop.md``, section "Sharing specs".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import _tree

from .markers import COPIED, SHARED, Marker, Masked, Sharing, _is_marker, _normalize
from .paths import PathFilter, _listing, _paths, path_filter

PyTree = Any

__all__ = [
    "check_spec",
    "copy_per_task",
    "make_spec",
    "merge_specs",
    "shared_view",
    "spec_task_specific",
    "task_specific_leaves",
]


def _expand(spec: PyTree, params: PyTree) -> list[Marker]:
    """The marker of every leaf of ``params`` (flattening order); ``spec`` may be a prefix."""
    par_flat, _ = jax.tree_util.tree_flatten_with_path(params)
    try:
        full = jax.tree.map(
            lambda s, sub: jax.tree.map(lambda _: s, sub), spec, params, is_leaf=_is_marker
        )
        flat, _ = jax.tree_util.tree_flatten_with_path(full, is_leaf=_is_marker)
    except (ValueError, TypeError) as err:
        spec_paths = set(_paths(spec, _is_marker))
        par_paths = _paths(params)
        unmatched = [p for p in par_paths if not any(_prefix_of(s, p) for s in spec_paths)]
        extra = sorted(s for s in spec_paths if not any(_prefix_of(s, p) for p in par_paths))
        raise ValueError(
            "The sharing spec does not match the parameters (it must have their structure, or be "
            f"a prefix of it). Parameter leaves without a spec: [{_listing(unmatched)}]; spec "
            f"entries without parameters: [{_listing(extra)}]"
            f"{_tree.suggestions(extra, _all_prefixes(par_paths))}. Build specs from the "
            "parameters themselves: mtl.sharing.make_spec(params, ...) or layer_spec."
        ) from err
    if len(flat) != len(par_flat):
        raise ValueError(
            f"The sharing spec has {len(flat)} leaves for {len(par_flat)} parameter leaves; "
            "every parameter leaf needs exactly one marker."
        )
    return [_normalize(m, _tree.path_str(p)) for (p, m), _ in zip(flat, par_flat, strict=True)]


def _all_prefixes(paths: list[str]) -> list[str]:
    """Every leaf path and every subtree path above it (``'a/b/c'`` -> ``'a'``, ``'a/b'``, ...)."""
    out = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 2)}
    return sorted(out)


def _prefix_of(prefix: str, path: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + "/")


def _infer_k(markers: list[Marker], shapes: list[tuple], paths: list[str]) -> dict[int, list[str]]:
    sizes: dict[int, list[str]] = {}
    for m, shape, path in zip(markers, shapes, paths, strict=True):
        if isinstance(m, Masked) and m.mask is not None:
            mshape = np.shape(m.mask)
            if len(mshape) >= 1:
                sizes.setdefault(mshape[0], []).append(path)
        elif m is COPIED and len(shape) >= 1:
            sizes.setdefault(shape[0], []).append(path)
    return sizes


def check_spec(spec: PyTree, params: PyTree, num_tasks: int | None = None) -> int | None:
    """Validates a sharing spec against (task-stacked) parameters and returns K.

    Checks that ``spec`` has the structure of ``params`` (or of a prefix), that every
    :data:`COPIED` leaf is ``[K, ...]`` and every :class:`Masked` mask is ``[K, *param.shape]``,
    and that all of them agree on K (and with ``num_tasks`` when given). Mask slots
    (``Masked()``, see :func:`split_masks`) have no mask to check.

    Returns:
      K, or ``num_tasks`` (``None`` if the spec is all :data:`SHARED` and ``num_tasks`` is None).

    Raises:
      ValueError: naming the offending leaves.
    """
    markers = _expand(spec, params)
    pairs = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [_tree.path_str(p) for p, _ in pairs]
    shapes = [tuple(np.shape(x)) for _, x in pairs]
    problems = []
    for m, shape, path in zip(markers, shapes, paths, strict=True):
        if m is COPIED and len(shape) == 0:
            problems.append(f"{path}: COPIED but a scalar (needs a leading task axis)")
        if isinstance(m, Masked) and m.mask is not None:
            mshape = tuple(np.shape(m.mask))
            wrong_k = num_tasks is not None and len(mshape) >= 1 and mshape[0] != num_tasks
            if mshape[1:] != shape or len(mshape) != len(shape) + 1 or wrong_k:
                expected = f"(K, *{shape})" if num_tasks is None else str((num_tasks, *shape))
                problems.append(
                    f"{path}: mask has shape {mshape}, expected {expected} (K, *param.shape) "
                    f"for the parameter {shape}"
                )
            problems.extend(_tree.mask_problems(path, m.mask))
    if problems:
        raise ValueError("Invalid sharing spec: " + "; ".join(problems[:8]))
    sizes = _infer_k(markers, shapes, paths)
    if num_tasks is not None:
        bad = {k: v for k, v in sizes.items() if k != num_tasks}
        if bad:
            detail = "; ".join(f"K={k}: {_listing(v)}" for k, v in sorted(bad.items()))
            raise ValueError(
                f"num_tasks={num_tasks}, but these task-specific leaves have another leading "
                f"(task) axis: {detail}. Copied leaves come from mtl.sharing.copy_per_task(params, spec, "
                "K); masks must be (K, *param.shape)."
            )
        return num_tasks
    if len(sizes) > 1:
        detail = "; ".join(f"K={k}: {_listing(v)}" for k, v in sorted(sizes.items()))
        raise ValueError(f"Task-specific leaves disagree on the task axis K: {detail}.")
    return next(iter(sizes)) if sizes else None


def make_spec(params: PyTree, copied: PathFilter | bool = False) -> PyTree:
    """A spec shaped like ``params``: :data:`COPIED` where ``copied(path)``, else :data:`SHARED`.

    Args:
      params: the (un-stacked) parameters, e.g. ``model.init(...)`` (or its variables with
        ``batch_stats``, to give copied BatchNorm layers per-task statistics too).
      copied: a path predicate, a regex string (see :func:`match_paths`), or a bool for all leaves.

    Example::

      spec = make_spec(variables, copied=match_paths("Conv_1/", "BatchNorm_1/"))
    """
    if isinstance(copied, bool):
        pred = lambda path: copied
    else:
        pred = path_filter(copied)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: COPIED if pred(_tree.path_str(p)) else SHARED, params
    )


def merge_specs(*specs: PyTree) -> PyTree:
    """Combines specs of the same structure leaf by leaf: a non-shared marker wins over SHARED.

    E.g. LaSS masks on the convolutions and per-task modulation scales:
    ``merge_specs(lass_spec, modulation_spec(params))``.

    Raises:
      ValueError: if two specs give one leaf two different task-specific markers.
    """
    if not specs:
        raise ValueError("merge_specs needs at least one spec.")
    flats = [jax.tree_util.tree_flatten_with_path(s, is_leaf=_is_marker) for s in specs]
    treedef = flats[0][1]
    for i, (_, td) in enumerate(flats[1:], start=1):
        if td != treedef:
            a, b = set(_paths(specs[0], _is_marker)), set(_paths(specs[i], _is_marker))
            raise ValueError(
                f"merge_specs: spec {i} has another structure than spec 0; only in spec 0: "
                f"[{_listing(sorted(a - b))}], only in spec {i}: [{_listing(sorted(b - a))}]."
            )
    out = []
    for j, (path, first) in enumerate(flats[0][0]):
        name = _tree.path_str(path)
        chosen = _normalize(first, name)
        for flat, _ in flats[1:]:
            other = _normalize(flat[j][1], name)
            if other is SHARED:
                continue
            if chosen is not SHARED and chosen is not other:
                raise ValueError(
                    f"merge_specs: leaf {name!r} is {chosen!r} in one spec and {other!r} in "
                    "another; a leaf can be copied or masked, not both."
                )
            chosen = other
        out.append(chosen)
    return treedef.unflatten(out)


def spec_task_specific(spec: PyTree) -> PyTree:
    """The ``task_specific`` labels of a spec for :func:`mtl_jax.shared_rows`: ``True`` for
    COPIED leaves.

    A copied leaf holds each copy's own task's gradient (never rows); shared and masked leaves
    (one ``theta`` for all tasks) get Jacobian rows, which the aggregator combines.
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, m: _normalize(m, _tree.path_str(p)) is COPIED, spec, is_leaf=_is_marker
    )


def _is_label(x: Any) -> bool:
    return isinstance(x, bool | np.bool_ | Sharing | Masked) or (
        isinstance(x, str) and x in ("shared", "copied")
    )


def _label_value(label: Any, path: str) -> bool:
    if isinstance(label, bool | np.bool_):
        return bool(label)
    if isinstance(label, Masked):
        return False  # one theta for every task: it gets Jacobian rows
    if isinstance(label, str) and label in ("shared", "copied"):
        return Sharing(label) is COPIED
    raise ValueError(
        f"task_specific entry {path!r} is {label!r} ({type(label).__name__}); expected a bool "
        "(True: task-specific, False: shared; not 0/1) or a sharing-spec marker (mtl.SHARED, "
        "mtl.COPIED, mtl.sharing.Masked(mask))."
    )


def task_specific_leaves(
    task_specific: PyTree | Callable[[PyTree], PyTree], params: PyTree
) -> PyTree:
    """Expands ``task_specific`` to a bool pytree with the full structure of ``params``.

    Args:
      task_specific: a pytree of bools (``True``: task-specific) or a sharing spec
        (:data:`COPIED` -> task-specific; :data:`SHARED` and
        :class:`Masked` -> shared, since a masked leaf is one array for all tasks), with
        the structure of ``params`` or a prefix of it; or a callable ``params -> such a tree``.
      params: the parameters.

    Returns:
      A bool pytree shaped like ``params``.

    Raises:
      ValueError: if the structure does not match (naming the leaves) or an entry is neither a
        bool nor a marker.

    Example::

      task_specific_leaves({"encoder": False, "heads": True}, params)
    """
    labels = task_specific(params) if callable(task_specific) else task_specific
    try:
        full = jax.tree.map(
            lambda lab, sub: jax.tree.map(lambda _: lab, sub), labels, params, is_leaf=_is_label
        )
    except (ValueError, TypeError) as err:
        lab_paths = [
            _tree.path_str(p)
            for p, _ in jax.tree_util.tree_flatten_with_path(labels, is_leaf=_is_label)[0]
        ]
        par_paths = [_tree.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

        def covered(path: str, prefixes: list[str]) -> bool:
            return any(q == "" or path == q or path.startswith(q + "/") for q in prefixes)

        unmatched = [p for p in par_paths if not covered(p, lab_paths)]
        extra = [q for q in lab_paths if not any(covered(p, [q]) for p in par_paths)]
        raise ValueError(
            "task_specific does not match the parameters (it must have their structure or a "
            f"prefix of it). Parameter leaves without a label: [{_listing(unmatched)}]; "
            f"labels without parameters: [{_listing(extra)}]"
            f"{_tree.suggestions(extra, _all_prefixes(par_paths))}. A label per top-level "
            "key works: e.g. {'encoder': False, 'heads': True}."
        ) from err
    return jax.tree_util.tree_map_with_path(
        lambda p, lab: _label_value(lab, _tree.path_str(p)), full, is_leaf=_is_label
    )


def shared_view(tree: PyTree, task_specific: PyTree | Callable[[PyTree], PyTree]) -> PyTree:
    """``tree`` with its task-specific leaves replaced by ``optax.MaskedNode``: the shared part.

    What conflict metrics are measured on (Recon: "the remaining shared parameters"):
    ``tracker.init(shared_view(params, spec))``, ``tracker.update(cstate, shared_view(grads,
    spec))``. ``task_specific`` as in :func:`task_specific_leaves` (a spec or a bool tree).
    """
    labels = task_specific_leaves(task_specific, tree)
    return jax.tree.map(lambda s, x: optax.MaskedNode() if s else x, labels, tree)


def copy_per_task(params: PyTree, spec: PyTree, num_tasks: int) -> PyTree:
    """Adds a leading task axis to the :data:`COPIED` leaves by repetition.

    Every copy starts from the shared value (Recon's paper initialises the task-specific copies
    from the shared layer; docs/design/METHODS.md section 1). Shared and masked leaves are returned as they
    are. The result passes :func:`check_spec` with ``num_tasks``.

    Args:
      params: un-stacked parameters (copied leaves ``[*shape]``).
      spec: the sharing spec (or a prefix of it).
      num_tasks: K.

    Returns:
      Parameters whose copied leaves are ``[K, *shape]``.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}.")
    markers = _expand(spec, params)
    leaves, treedef = jax.tree.flatten(params)
    out = [
        jnp.repeat(jnp.asarray(x)[None], num_tasks, axis=0) if m is COPIED else x
        for m, x in zip(markers, leaves, strict=True)
    ]
    stacked = treedef.unflatten(out)
    check_spec(spec, stacked, num_tasks)
    return stacked
