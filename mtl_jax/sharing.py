"""Per-task parameter views: shared, copied and masked parameters (docs/design/DESIGN.md section 5).

A model is written once, as a pure ``apply(params, *args)``. A *sharing spec* is a pytree shaped
like the parameters (or a prefix of them) whose leaves say, per parameter leaf:

* :data:`SHARED` -- one array used by every task;
* :data:`COPIED` -- per-task copies: the parameter leaf has a leading task axis ``[K, *shape]``
  and task t uses row t (Recon's branched layers, :class:`mtl_jax.modules.TaskModulation`);
* :class:`Masked` ``(mask)`` -- one shared array ``theta`` and a mask ``M: [K, *shape]``
  (bool or 0/1); task t uses ``theta * M_t`` (LaSS, :mod:`mtl_jax.lass`).

Masks as arrays. A spec's masks are Python constants of the functions built from it, so under
``jit`` they are baked into the compiled program (one constant of ``K x |theta|`` per masked
leaf) and cannot be sharded. :func:`split_masks` splits a spec into its *structure* (the masked
leaves become mask slots, ``Masked()``) and a pytree of mask arrays, given at call time as the
``masks=`` keyword of the functions of :func:`per_task` and :func:`per_task_grads`: ordinary
arguments of the program (no constant, no recompilation when their values change; keep them in
the train state or pass them to the step, sharded like the parameters)::

  structure, masks = mtl.split_masks(spec)          # masks: {path: [K, *shape]} as a pytree
  forward = jax.jit(mtl.per_task(model.apply, structure, num_tasks=K))
  outs = forward(params, x, masks=masks)            # == per_task(model.apply, spec, K)(params, x)

With a spec that holds its masks, ``masks=`` is optional and, when given, replaces them. The
masks pytree has the structure of the spec with ``None`` at every unmasked leaf (or any pytree
with the same paths to the masked leaves, e.g. a nested dict holding only them); a missing,
extra or wrongly shaped mask is a ``ValueError`` naming its path.

:func:`per_task` turns ``apply`` into the forward of all K tasks at once, by ``jax.vmap`` over the
task axis with ``in_axes=None`` for shared leaves and ``0`` for copied leaves and masks::

  spec = mtl.make_spec(params, copied=mtl.match_paths("Dense_1"))  # branch at Dense_1
  params = mtl.copy_per_task(params, spec, num_tasks=2)             # Dense_1 leaves: [2, ...]
  forward = mtl.per_task(model.apply, spec, num_tasks=2)
  outs = forward(params, x)                                        # leaves [2, ...]

JAX batches only what depends on batched values, so everything computed before the first
task-specific leaf (the *shared prefix*) runs once, unbatched, and the K task streams begin at
that leaf: Recon's semantics for any model, without rewriting it (tests/test_sharing.py checks
the jaxpr and the FLOP count).

Gradients: differentiating a per-task loss vector through :func:`per_task` with
:func:`mtl_jax.value_and_jacobian` gives, for a copied leaf, Jacobian rows that are zero except at
the task's own copy (row t of ``jac[leaf]`` is non-zero only at ``[t, t]``), and for a masked leaf
row t is zero outside ``M_t``. :func:`spec_task_specific` gives the labels for
``mtl.multitask(aggregator, task_specific=...)``, which sums the copied leaves' rows (each copy gets
its own task's gradient) and aggregates the shared and masked ones.

Mutable state (BatchNorm statistics). Inside the task streams each task normalises with the
batch statistics of its own stream, exactly as K separate forwards would; the running averages
that ``apply`` returns come out of the ``vmap`` with a task axis and are reduced by
:func:`per_task` (``has_state=True``):

* state leaves whose spec is :data:`COPIED` (per-task BatchNorm copies, made with
  :func:`copy_per_task` like any other copied leaf) keep their K rows: each task updates its own;
* every other state leaf belongs to a shared layer and is reduced over the task axis with
  ``state_reduction`` (default ``"mean"``, as docs/design/DESIGN.md section 5 suggests). A shared layer
  *before* the branch sees identical rows and keeps its value exactly (no rounding from the
  mean); a shared BatchNorm *after* the branch gets the mean of the per-task running averages.
  Since each stream uses the same batch size, the mean of the per-task running means equals the
  running mean over the union of the streams; for the variance it is the mean of the per-task
  variances (the within-task part of the pooled variance).
* Alternatively a BatchNorm built with ``axis_name`` equal to :func:`per_task`'s ``axis_name``
  pools its batch statistics over the task streams during the forward itself.
* A layer whose parameters are copied but whose statistics are not (a spec built from parameter
  paths only) is an error, not a silent average: build the spec over the whole variables with
  :func:`layer_spec` (layers named as :func:`layer_key` gives them; :func:`mtl_jax.recon.branch`
  does this), or pass ``state_spec`` explicitly.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import _tree
from mtl_jax.gramian import by_module

PyTree = Any
PathFilter = Callable[[str], bool] | str | None

__all__ = [
    "COLLECTIONS",
    "COPIED",
    "SHARED",
    "Masked",
    "Sharing",
    "check_spec",
    "copy_per_task",
    "layer_key",
    "layer_names",
    "layer_spec",
    "make_spec",
    "match_paths",
    "merge_specs",
    "path_filter",
    "per_task",
    "per_task_grads",
    "reduce_task_state",
    "shared_view",
    "spec_from_masks",
    "spec_task_specific",
    "split_masks",
    "task_params",
    "task_specific_leaves",
    "with_masks",
]


class Sharing(enum.StrEnum):
    """How a parameter leaf is shared across tasks (the leaves of a sharing spec)."""

    SHARED = "shared"
    COPIED = "copied"


SHARED = Sharing.SHARED
"""One array used by every task."""

COPIED = Sharing.COPIED
"""Per-task copies: the parameter leaf has a leading task axis of size K."""


@dataclasses.dataclass(frozen=True, eq=False)
class Masked:
    """A shared parameter ``theta`` that task t sees as ``theta * M_t``.

    Attributes:
      mask: ``[K, *param.shape]``, bool or 0/1, a constant of the spec (computed once, e.g. by
        :func:`mtl_jax.lass.lass_masks`); or ``None`` (``Masked()``): a *mask slot*, whose mask
        is an array given at call time (``masks=`` of :func:`per_task` and
        :func:`per_task_grads`; see :func:`split_masks`).
    """

    mask: Any = None

    def __repr__(self) -> str:
        if self.mask is None:
            return "Masked(<mask given at call time>)"
        return f"Masked(mask={tuple(np.shape(self.mask))})"


Marker = Sharing | Masked


def _is_marker(x: Any) -> bool:
    return isinstance(x, Masked | Sharing) or (isinstance(x, str) and x in ("shared", "copied"))


def _normalize(marker: Any, path: str) -> Marker:
    if isinstance(marker, Masked):
        return marker
    if isinstance(marker, str) and marker in ("shared", "copied"):
        return Sharing(marker)
    raise ValueError(
        f"Spec leaf {path!r} is {marker!r}; expected mtl.SHARED, mtl.COPIED or mtl.Masked(mask)."
    )


# --------------------------------------------------------------------------------------------
# Path filters


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


# --------------------------------------------------------------------------------------------
# Specs


def _listing(items: Sequence[str]) -> str:
    return _tree._listing(list(items))


def _paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [_tree.path_str(p) for p, _ in flat]


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
        extra = [s for s in spec_paths if not any(_prefix_of(s, p) for p in par_paths)]
        raise ValueError(
            "The sharing spec does not match the parameters (it must have their structure, or be "
            f"a prefix of it). Parameter leaves without a spec: [{_listing(unmatched)}]; spec "
            f"entries without parameters: [{_listing(sorted(extra))}]."
        ) from err
    if len(flat) != len(par_flat):
        raise ValueError(
            f"The sharing spec has {len(flat)} leaves for {len(par_flat)} parameter leaves; "
            "every parameter leaf needs exactly one marker."
        )
    return [_normalize(m, _tree.path_str(p)) for (p, m), _ in zip(flat, par_flat, strict=True)]


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
            dtype = jnp.result_type(m.mask)
            if not (np.issubdtype(dtype, np.bool_) or np.issubdtype(dtype, np.number)):
                problems.append(f"{path}: mask dtype {dtype} is neither bool nor numeric")
    if problems:
        raise ValueError("Invalid sharing spec: " + "; ".join(problems[:8]))
    sizes = _infer_k(markers, shapes, paths)
    if num_tasks is not None:
        bad = {k: v for k, v in sizes.items() if k != num_tasks}
        if bad:
            detail = "; ".join(f"K={k}: {_listing(v)}" for k, v in sorted(bad.items()))
            raise ValueError(
                f"num_tasks={num_tasks}, but these task-specific leaves have another leading "
                f"(task) axis: {detail}. Copied leaves come from mtl.copy_per_task(params, spec, "
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


#: Top-level keys dropped by :func:`layer_key`: Flax Linen's collections, so that a layer's
#: parameters (``params/BatchNorm_0/scale``) and statistics (``batch_stats/BatchNorm_0/mean``)
#: have one key. NNX states have no collection level (``bn/scale/value``, ``bn/mean/value``).
COLLECTIONS: tuple[str, ...] = ("params", "batch_stats")


def layer_key(path: str, collections: Sequence[str] = COLLECTIONS) -> str:
    """The layer (module) a leaf belongs to, without its collection.

    :func:`mtl_jax.by_module` of the path (a module's kernel and bias, or a BatchNorm's scale,
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
    :class:`mtl_jax.ConflictTracker` built with ``granularity=mtl.by_module``.

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
            f"Layers not found: {unknown}. Layers of the tree: [{_listing(present)}] "
            "(names as mtl.sharing.layer_key gives them)."
        )
    return jax.tree_util.tree_map_with_path(
        lambda p, _: COPIED if layer_key(_tree.path_str(p), collections) in wanted else SHARED,
        tree,
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


def spec_from_masks(masks: PyTree) -> PyTree:
    """A spec from stacked per-task masks (leaves ``[K, *param.shape]``).

    A leaf whose mask keeps everything for every task is :data:`SHARED` (so it stays outside the
    task streams and a shared prefix is still computed once); any other leaf is
    :class:`Masked`. The masks must be concrete (computed once, outside ``jit``).
    """

    def one(m: Any) -> Marker:
        arr = np.asarray(m)
        if arr.ndim == 0:
            raise ValueError("Stacked masks need a leading task axis; got a scalar mask leaf.")
        return SHARED if bool(np.all(arr != 0)) else Masked(arr.astype(bool))

    return jax.tree.map(one, masks)


def _is_masked_marker(x: Any) -> bool:
    return isinstance(x, Masked)


def _masked_entries(spec: PyTree) -> list[tuple[str, Masked]]:
    """``(path, marker)`` of every :class:`Masked` leaf of ``spec`` (flattening order)."""
    flat = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_marker)[0]
    return [(_tree.path_str(p), m) for p, m in flat if isinstance(m, Masked)]


def _mask_slots(spec: PyTree) -> list[str]:
    return [path for path, m in _masked_entries(spec) if m.mask is None]


def split_masks(spec: PyTree) -> tuple[PyTree, PyTree]:
    """Splits a spec into its structure and its masks, so the masks can be ordinary arrays.

    The structure is ``spec`` with every :class:`Masked` ``(M)`` leaf replaced by a mask slot
    ``Masked()``; it is a static description (no arrays, tiny) to build
    :func:`per_task` / :func:`per_task_grads` from. The masks are a pytree with the structure of
    ``spec`` holding ``M`` (as a ``jax.Array``, dtype kept) at the masked leaves and ``None``
    elsewhere; give them at call time (``fn(params, x, masks=masks)``), e.g. from the train
    state or as a step argument, so that under ``jit`` they are arguments of the program -- not
    constants baked into it -- and can be sharded; new mask values do not recompile.

    Example::

      spec = mtl.lass_spec(finetuned, prune_fraction=0.5, include="^encoder/")
      structure, masks = mtl.split_masks(spec)
      grad_fn = jax.jit(mtl.per_task_grads(task_loss, structure, K))
      losses, grads = grad_fn(params, x, y, masks=masks)

    Args:
      spec: a sharing spec whose :class:`Masked` leaves hold their masks.

    Returns:
      ``(structure, masks)``; ``with_masks(structure, masks)`` gives ``spec`` back.

    Raises:
      ValueError: if a :class:`Masked` leaf of ``spec`` is already a mask slot.
    """
    slots = _mask_slots(spec)
    if slots:
        raise ValueError(
            f"split_masks: the spec's leaves [{_listing(slots)}] are already mask slots "
            "(Masked() without a mask); split the spec that holds the masks."
        )
    structure = jax.tree.map(
        lambda m: Masked() if isinstance(m, Masked) else m, spec, is_leaf=_is_marker
    )
    masks = jax.tree.map(
        lambda m: jnp.asarray(m.mask) if isinstance(m, Masked) else None, spec, is_leaf=_is_marker
    )
    return structure, masks


def with_masks(spec: PyTree, masks: PyTree) -> PyTree:
    """``spec`` with its :class:`Masked` leaves holding the arrays of ``masks`` (jit-able).

    The inverse of :func:`split_masks`. ``masks`` is matched to the masked leaves by path: the
    second output of :func:`split_masks` (``None`` at unmasked leaves), or any pytree with the
    same paths to the masked leaves (e.g. a nested dict holding only them). The arrays may be
    traced; a spec leaf that holds a mask already gets the given one instead.

    Raises:
      ValueError: naming the masked leaves without a mask, the masks without a masked leaf, and
        mask leaves that are not arrays.
    """
    entries = _masked_entries(spec)
    flat = jax.tree_util.tree_flatten_with_path(masks)[0]
    given = {_tree.path_str(p): x for p, x in flat}
    not_arrays = [
        f"{path} ({type(x).__name__})"
        for path, x in given.items()
        if not hasattr(x, "shape") or not hasattr(x, "dtype")
    ]
    wanted = [path for path, _ in entries]
    wanted_set = set(wanted)
    missing = [path for path in wanted if path not in given]
    extra = [path for path in given if path not in wanted_set]
    if missing or extra or not_arrays:
        raise ValueError(
            "The masks do not match the spec's Masked leaves: masked leaves without a mask: "
            f"[{_listing(missing)}]; masks without a masked leaf: [{_listing(extra)}]; mask "
            f"leaves that are not arrays: [{_listing(not_arrays)}]. Build them with "
            "mtl.split_masks(spec) (None at unmasked leaves) or as a pytree with the masked "
            "leaves' paths."
        )
    return jax.tree_util.tree_map_with_path(
        lambda p, m: Masked(given[_tree.path_str(p)]) if isinstance(m, Masked) else m,
        spec,
        is_leaf=_is_marker,
    )


def _check_mask_arrays(spec: PyTree, params: PyTree, num_tasks: int) -> None:
    """Every mask given at call time is ``[K, *param.shape]`` of a bool or numeric dtype."""
    markers = _expand(spec, params)
    problems = []
    for (p, x), m in zip(jax.tree_util.tree_flatten_with_path(params)[0], markers, strict=True):
        if not isinstance(m, Masked):
            continue
        path, given, expected = (
            _tree.path_str(p),
            tuple(np.shape(m.mask)),
            (num_tasks, *np.shape(x)),
        )
        if given != expected:
            problems.append(f"{path}: got shape {given}, expected {expected} (K, *param.shape)")
        dtype = np.dtype(m.mask.dtype)
        if not (np.issubdtype(dtype, np.bool_) or np.issubdtype(dtype, np.number)):
            problems.append(f"{path}: dtype {dtype} is neither bool nor numeric")
    if problems:
        raise ValueError("Invalid masks: " + "; ".join(problems[:8]))


def _spec_at_call(
    spec: PyTree, masks: PyTree | None, params: PyTree, num_tasks: int, caller: str
) -> PyTree:
    """The spec a call uses: ``spec`` itself, or with the call's ``masks`` in its Masked leaves."""
    if masks is None:
        slots = _mask_slots(spec)
        if slots:
            raise ValueError(
                f"{caller}: the spec's Masked leaves [{_listing(slots)}] are mask slots; pass "
                "their masks at call time: fn(params, ..., masks=masks), masks from "
                "mtl.split_masks(spec)."
            )
        return spec
    filled = with_masks(spec, masks)
    _check_mask_arrays(filled, params, num_tasks)
    return filled


def _task_axis_inputs(
    spec: PyTree, masks: PyTree | None, params: PyTree, num_tasks: int, caller: str
) -> tuple[list[Marker], list[Any], Any, list[Any]]:
    """What :func:`per_task` and :func:`per_task_grads` map over the tasks: the checked spec's
    markers, the parameter leaves and treedef, and per leaf its task-axis input -- a copied
    leaf's ``[K, ...]`` rows, a masked leaf's boolean masks ``[K, ...]``, ``None`` for a shared
    leaf (broadcast to every task)."""
    spec_now = _spec_at_call(spec, masks, params, num_tasks, caller)
    check_spec(spec_now, params, num_tasks)
    markers = _expand(spec_now, params)
    leaves, treedef = jax.tree.flatten(params)
    batched = [
        x if m is COPIED else _mask_bool(m.mask) if isinstance(m, Masked) else None
        for m, x in zip(markers, leaves, strict=True)
    ]
    return markers, leaves, treedef, batched


def spec_task_specific(spec: PyTree) -> PyTree:
    """The ``task_specific`` labels for :func:`mtl_jax.multitask`: ``True`` for COPIED leaves.

    Copied leaves get Jacobian rows that are zero except at the task's own copy, so their rows are
    summed; shared and masked leaves (one ``theta`` for all tasks) are aggregated.
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, m: _normalize(m, _tree.path_str(p)) is COPIED, spec, is_leaf=_is_marker
    )


def _is_label(x: Any) -> bool:
    return isinstance(x, bool | Sharing | Masked) or (
        isinstance(x, str) and x in ("shared", "copied")
    )


def _label_value(label: Any, path: str) -> bool:
    if isinstance(label, bool):
        return label
    if isinstance(label, Masked):
        return False  # one theta for every task: it gets Jacobian rows
    if isinstance(label, str) and label in ("shared", "copied"):
        return Sharing(label) is COPIED
    raise ValueError(
        f"task_specific entry {path!r} is {label!r}; expected a bool (True: task-specific) or a "
        "sharing-spec marker (mtl.SHARED, mtl.COPIED, mtl.Masked(mask))."
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
            f"labels without parameters: [{_listing(extra)}]."
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


def _mask_bool(mask: Any) -> jax.Array:
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _masked_value(theta: jax.Array, mask_t: jax.Array) -> jax.Array:
    """``theta * M_t`` as a select: exact zeros, and a gradient that is exactly zero outside M_t."""
    return jnp.where(mask_t, theta, jnp.zeros((), theta.dtype))


def task_params(params: PyTree, spec: PyTree, task: int, masks: PyTree | None = None) -> PyTree:
    """Task ``task``'s view of the parameters, usable with the plain ``apply``.

    Copied leaves give their row ``task``, masked leaves ``theta * M_task``, shared leaves
    themselves. ``per_task(apply, spec, K)(params, x)[t] == apply(task_params(params, spec, t), x)``.
    ``masks``: the masks of a spec with mask slots (see :func:`split_masks`).
    """
    if masks is not None or _mask_slots(spec):
        k = check_spec(spec, params)
        if k is None:
            k = int(np.shape(jax.tree.leaves(masks)[0])[0]) if jax.tree.leaves(masks) else 1
        spec = _spec_at_call(spec, masks, params, k, "task_params")
    check_spec(spec, params)
    markers = _expand(spec, params)
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for m, x in zip(markers, leaves, strict=True):
        if m is COPIED:
            out.append(x[task])
        elif isinstance(m, Masked):
            out.append(_masked_value(x, _mask_bool(m.mask)[task]))
        else:
            out.append(x)
    return treedef.unflatten(out)


# --------------------------------------------------------------------------------------------
# The per-task forward


StateReduction = str | Callable[[jax.Array], jax.Array]


def _reduce_mean(x: jax.Array) -> jax.Array:
    """Mean over the task axis; exactly ``x[0]`` when all rows agree (layers before the branch)."""
    x = jnp.asarray(x)
    same = jnp.all(x == x[0])
    mean = jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.inexact) else x[0]
    return jnp.where(same, x[0], mean).astype(x.dtype)


def _state_markers(state: PyTree, spec: PyTree, state_spec: PyTree | None) -> list[Marker]:
    if state_spec is not None:
        return _expand(state_spec, state)
    spec_flat = jax.tree_util.tree_flatten_with_path(spec, is_leaf=_is_marker)[0]
    by_path = {_tree.path_str(p): m for p, m in spec_flat}
    markers = []
    for path in _paths(state):
        if path in by_path:
            found = by_path[path]
        else:  # e.g. the spec covers (params, batch_stats) and apply returns batch_stats only
            hits = [m for p, m in by_path.items() if p.endswith("/" + path)]
            found = hits[0] if len(hits) == 1 else SHARED
        markers.append(_normalize(found, path))
    _check_copied_layers_keep_state(state, markers, by_path)
    return markers


def _check_copied_layers_keep_state(
    state: PyTree, markers: list[Marker], spec_by_path: dict[str, Any]
) -> None:
    """No silent averaging: a state leaf of a layer whose parameters are copied must be copied."""
    copied_layers = {layer_key(p) for p, m in spec_by_path.items() if _normalize(m, p) is COPIED}
    bad = []
    for path, marker in zip(_paths(state), markers, strict=True):
        layer = layer_key(path)
        if marker is not COPIED and any(
            c == layer or c.endswith("/" + layer) for c in copied_layers
        ):
            bad.append(path)
    if bad:
        raise ValueError(
            f"State leaves [{_listing(bad)}] belong to layers whose parameters are copied per "
            "task, but the spec does not copy them, so per_task would average their per-task "
            "values. Build the spec over the whole variables (mtl.sharing.layer_spec(variables, "
            "layers) or mtl.recon.branch) and copy_per_task them too, or pass state_spec "
            "explicitly (SHARED there averages them on purpose)."
        )


def _reduce_state(
    state: PyTree, spec: PyTree, state_spec: PyTree | None, reduction: StateReduction
) -> PyTree:
    if reduction == "mean":
        reduce = _reduce_mean
    elif callable(reduction):
        reduce = reduction
    else:
        raise ValueError(f"state_reduction must be 'mean' or a callable; got {reduction!r}.")
    markers = _state_markers(state, spec, state_spec)
    leaves, treedef = jax.tree.flatten(state)
    out = [x if m is COPIED else reduce(x) for m, x in zip(markers, leaves, strict=True)]
    return treedef.unflatten(out)


def per_task(
    apply_fn: Callable[..., Any],
    spec: PyTree,
    num_tasks: int,
    *,
    has_state: bool = False,
    state_spec: PyTree | None = None,
    state_reduction: StateReduction = "mean",
    axis_name: str | None = None,
) -> Callable[..., Any]:
    """The forward of all K tasks at once: ``vmap`` of ``apply_fn`` over the task axis.

    ``fn(params, *args, **kwargs)`` calls ``apply_fn(view_t, *args, **kwargs)`` for every task t
    under one ``jax.vmap`` (``axis_size=K``), where ``view_t`` takes shared leaves as they are
    (``in_axes=None``: not batched), copied leaves' row t (``in_axes=0``) and masked leaves as
    ``theta * M_t`` (the mask is batched, theta is not). ``args``/``kwargs`` (the input batch,
    flags such as ``train=True``) are the same for every task.

    Because ``vmap`` batches only values that depend on batched inputs, the layers before the
    first task-specific leaf run once and the task streams start there.

    Works with any pure apply: Flax Linen (``model.apply`` on variables), Flax NNX
    (``lambda state, x: nnx.merge(graphdef, state)(x)``), Equinox or plain JAX. ``fn`` is
    jit-able; ``spec`` is a constant of the trace, and so are the masks it holds. Give a spec
    with mask slots (:func:`split_masks`) and the masks at call time, ``fn(params, *args,
    masks=masks, **kwargs)``, to make them arguments of the program instead.

    Args:
      apply_fn: ``(params, *args, **kwargs) -> out`` or, with ``has_state``, ``-> (out, state)``
        (Linen's ``mutable=["batch_stats"]`` convention).
      spec: the sharing spec (or a prefix) for ``params``; see the module docstring.
      num_tasks: K.
      has_state: whether ``apply_fn`` returns ``(out, state)``; the state is then reduced over the
        task axis as described in the module docstring.
      state_spec: spec of the returned state; by default each state leaf takes the marker of the
        spec leaf at the same path (or the unique spec leaf whose path ends with it), and
        :data:`SHARED` when there is none.
      state_reduction: ``"mean"`` (exact when all task rows agree) or a callable
        ``x[K, ...] -> x[...]`` applied to shared state leaves.
      axis_name: name of the task axis inside ``apply_fn`` (for collectives, e.g. a BatchNorm
        with ``axis_name`` pooling statistics over the task streams).

    Returns:
      ``fn(params, *args, **kwargs) -> outs`` (every leaf ``[K, ...]``), or ``(outs, state)``.
      When ``spec`` has :class:`Masked` leaves, the keyword ``masks`` is ``fn``'s own (the masks
      as arrays, see :func:`split_masks`; required for mask slots) and is not passed to
      ``apply_fn``.

    Raises:
      ValueError: (at trace time) if ``spec`` does not match ``params`` or K disagrees, or the
        masks do not match the spec, naming the leaves.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}.")
    takes_masks = bool(_masked_entries(spec))

    def fn(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        masks = kwargs.pop("masks", None) if takes_masks else None
        markers, leaves, treedef, batched = _task_axis_inputs(
            spec, masks, params, num_tasks, "per_task"
        )

        def one(batched_t: list[Any]) -> Any:
            view = []
            for m, x, b in zip(markers, leaves, batched_t, strict=True):
                if m is COPIED:
                    view.append(b)
                elif isinstance(m, Masked):
                    view.append(_masked_value(x, b))
                else:
                    view.append(x)
            return apply_fn(treedef.unflatten(view), *args, **kwargs)

        out = jax.vmap(one, axis_size=num_tasks, axis_name=axis_name)(batched)
        if not has_state:
            return out
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                "per_task(..., has_state=True) needs apply_fn to return (out, state); got "
                f"{type(out).__name__}."
            )
        outs, state = out
        return outs, _reduce_state(state, spec, state_spec, state_reduction)

    return fn


def per_task_grads(
    task_loss_fn: Callable[..., Any],
    spec: PyTree,
    num_tasks: int,
    *,
    has_state: bool = False,
    state_spec: PyTree | None = None,
    state_reduction: StateReduction = "mean",
    axis_name: str | None = None,
    unroll: bool = False,
    task_specific: PyTree | None = None,
) -> Callable[..., Any]:
    """Task losses and the gradient tree of a per-task model, with no task-by-task term at all.

    ``task_loss_fn(view_t, t, *args, **kwargs)`` is task t's loss on its view of the parameters
    (the view of :func:`per_task`: shared leaves as they are, copied leaves' row t, masked leaves
    ``theta * M_t``); ``t`` is the task index (a traced int: index stacked heads or targets with
    it). The returned function runs ``jax.value_and_grad`` of it for every task under ONE
    ``jax.vmap`` over the tasks, with ``in_axes=None`` for shared leaves. The gradient is taken
    inside the ``vmap``, so

    * everything before the first task-specific leaf runs forward once (it does not depend on
      the task), its backward once per task: the K Jacobian rows of the shared prefix;
    * each task's stream after the branch is differentiated with its own loss only: O(K x
      activation) and O(K x leaf) everywhere. Differentiating the joint loss vector instead
      (:func:`mtl_jax.value_and_grads`, :func:`mtl_jax.value_and_jacobian`) pulls every task's
      cotangent back through every task's stream: ``[K, K, batch, ...]`` activation
      cotangents after the branch (``benchmarks/grads_tree.py`` measures both).

    The gradient tree has the format of :func:`mtl_jax.value_and_grads` with ``task_specific=
    spec``: shared and masked leaves get their Jacobian rows ``[K, *shape]``, copied leaves
    ``[K, *shape]`` where copy t holds ``d loss_t / d copy_t``. Give it to
    ``optax.chain(mtl.shared_rows(aggregator, spec), optimizer)``.

    Mutable state (``has_state``): the function takes ``(params, state, *args)`` and
    ``task_loss_fn(view_t, state_t, t, *args)`` returns ``(loss_t, new_state_t)``; ``state_t``
    is task t's view of the state (copied leaves' row t, e.g. a branched BatchNorm's
    statistics) and the K new states are reduced as in :func:`per_task` (copied leaves keep
    their K rows, shared ones are averaged). The state is not differentiated.

    Args:
      task_loss_fn: ``(view_t, t, *args, **kwargs) -> loss_t`` (a scalar), or with
        ``has_state`` ``(view_t, state_t, t, *args, **kwargs) -> (loss_t, new_state_t)``.
      spec: the sharing spec of the parameters (or a prefix of it), as in :func:`per_task`.
      num_tasks: K.
      has_state: see above.
      state_spec: spec of the state (e.g. ``spec["batch_stats"]`` of
        :func:`mtl_jax.recon.branch` for a state ``variables["batch_stats"]``); by default
        matched by path with ``spec`` as in :func:`per_task`.
      state_reduction, axis_name: as in :func:`per_task`.
      unroll: call ``task_loss_fn`` once per task with ``t`` a Python int (K traced copies of
        the loss instead of one ``vmap``), for tasks whose losses differ in structure
        (heterogeneous heads, picked by ``heads[names[t]]``). XLA's common-subexpression
        elimination merges the K identical shared-prefix forwards; compile time grows with K.
        Not with ``axis_name``.
      task_specific: more task-specific leaves that are not copies, e.g. one head per task
        (each used by one task's loss only), :data:`SHARED` in ``spec``: a bool pytree (or a
        spec, or a prefix) as in :func:`task_specific_leaves`. Their K rows are summed, so each
        gets its own task's gradient ``[*shape]``, the format of :func:`mtl_jax.value_and_grads`;
        give the same labels to :func:`mtl_jax.shared_rows`.

    Returns:
      ``fn(params, *args, **kwargs) -> (losses[K], grads)``, or with ``has_state``
      ``fn(params, state, *args, **kwargs) -> ((losses[K], new_state), grads)``. When ``spec``
      has :class:`Masked` leaves, the keyword ``masks`` is ``fn``'s own (the masks as arrays,
      see :func:`split_masks`; required for mask slots), not passed to ``task_loss_fn``.

    Example::

      branched, spec = mtl.recon.branch(variables, layers, K)   # Linen, with BatchNorm
      def task_loss(params, stats, t, x, ys):
          out, new = model.apply({"params": params, "batch_stats": stats}, x,
                                 mutable=["batch_stats"])
          return jnp.mean((out - ys[t]) ** 2), new["batch_stats"]
      fn = per_task_grads(task_loss, spec["params"], K, has_state=True,
                          state_spec=spec["batch_stats"])
      (losses, stats), grads = jax.jit(fn)(branched["params"], branched["batch_stats"], x, ys)
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}.")
    if unroll and axis_name is not None:
        raise ValueError("per_task_grads: axis_name needs the task vmap; use unroll=False.")
    takes_masks = bool(_masked_entries(spec))

    def fn(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        masks = kwargs.pop("masks", None) if takes_masks else None
        markers, leaves, treedef, batched = _task_axis_inputs(
            spec, masks, params, num_tasks, "per_task_grads"
        )
        if has_state:
            if not args:
                raise ValueError(
                    "per_task_grads(has_state=True) is called as fn(params, state, ...)."
                )
            state, args = args[0], args[1:]
            s_markers = _state_markers(state, spec, state_spec)
            s_leaves, s_treedef = jax.tree.flatten(state)
            s_batched = [
                x if m is COPIED else None for m, x in zip(s_markers, s_leaves, strict=True)
            ]
        else:
            s_batched = None

        def one(batched_t: list[Any], s_batched_t: list[Any] | None, t: jax.Array) -> Any:
            def loss_of_view(own: list[Any], shared: list[Any]) -> Any:
                view = []
                for m, x, b, o in zip(markers, shared, batched_t, own, strict=True):
                    if m is COPIED:
                        view.append(o)
                    elif isinstance(m, Masked):
                        view.append(_masked_value(x, b))
                    else:
                        view.append(x)
                view = treedef.unflatten(view)
                if not has_state:
                    return task_loss_fn(view, t, *args, **kwargs)
                state_t = s_treedef.unflatten(
                    [
                        b if m is COPIED else x
                        for m, x, b in zip(s_markers, s_leaves, s_batched_t, strict=True)
                    ]
                )
                return task_loss_fn(view, state_t, t, *args, **kwargs)

            own = [b if m is COPIED else None for m, b in zip(markers, batched_t, strict=True)]
            shared = [None if m is COPIED else x for m, x in zip(markers, leaves, strict=True)]
            value, (g_own, g_shared) = jax.value_and_grad(
                loss_of_view, argnums=(0, 1), has_aux=has_state
            )(own, shared)
            grads = [
                go if m is COPIED else gs
                for m, go, gs in zip(markers, g_own, g_shared, strict=True)
            ]
            return value, grads

        if unroll:
            row = lambda xs, t: None if xs is None else [None if x is None else x[t] for x in xs]
            results = [one(row(batched, t), row(s_batched, t), t) for t in range(num_tasks)]
            value, grads = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
        else:
            value, grads = jax.vmap(one, axis_size=num_tasks, axis_name=axis_name)(
                batched, s_batched, jnp.arange(num_tasks)
            )
        if task_specific is not None:
            labels = jax.tree.leaves(task_specific_leaves(task_specific, params))
            grads = [
                jnp.sum(g, axis=0) if lab and m is not COPIED else g
                for g, lab, m in zip(grads, labels, markers, strict=True)
            ]
        grads = treedef.unflatten(grads)
        if not has_state:
            return value, grads
        losses, new_state = value
        return (losses, _reduce_state(new_state, spec, state_spec, state_reduction)), grads

    return fn


def reduce_task_state(
    state: PyTree,
    spec: PyTree,
    *,
    state_spec: PyTree | None = None,
    state_reduction: StateReduction = "mean",
) -> PyTree:
    """Reduces a state with a task axis (leaves ``[K, ...]``) as :func:`per_task` does.

    Copied state leaves keep their K rows; shared ones are reduced with ``state_reduction``;
    a layer whose parameters are copied but whose statistics are not is an error.
    """
    return _reduce_state(state, spec, state_spec, state_reduction)
