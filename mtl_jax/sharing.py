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

Mutable state (BatchNorm statistics). The semantics: *a normalisation layer inside the task
streams keeps per-task running statistics; its scale and bias stay shared unless the layer itself
is branched.* Inside the task streams each task normalises with the batch statistics of its own
stream, exactly as K separate forwards would, so it must be evaluated with its own running
statistics too. :func:`per_task` (``has_state=True``) returns the new state as follows:

* state leaves whose spec is :data:`COPIED` keep their K rows: each task updates its own.
  :func:`mtl_jax.recon.branch` copies *every* state leaf (:func:`state_spec_per_task`,
  :func:`copy_state_per_task` do it for any spec): the layers before the first branched layer
  then hold K identical rows (the same computation in every stream, bit for bit), and in
  evaluation mode the streams start at the first normalisation layer (K x its cost and the
  rest of the prefix).
* a :data:`SHARED` state leaf computed *before* the branch (identical in every stream) comes
  out of the ``vmap`` unbatched (``out_axes=None``): kept exactly, no reduction.
* a :data:`SHARED` state leaf computed *inside* the streams (a shared BatchNorm after a copied
  or masked layer) is refused at trace time: ``vmap`` reports the batched output and a
  data-flow pass over one stream's traced program (only on this error path) names the leaves.
  Averaging it (the former default) evaluates every stream with the mean of the streams'
  statistics, which costs accuracy when the streams differ. ``state_reduction="mean"`` (or a
  callable ``x[K, ...] -> x[...]``) averages on purpose: the mean of the per-task running
  averages (the within-task part of the pooled variance).
* a BatchNorm built with ``axis_name`` equal to :func:`per_task`'s ``axis_name`` pools its
  batch statistics over the task streams during the forward itself; its statistics are the same
  in every stream and stay shared.
* a layer whose parameters are copied but whose statistics are not (a spec built from parameter
  paths only) is an error: build the spec over the whole variables with :func:`layer_spec`
  (layers named as :func:`layer_key` gives them, matched on exact paths: ``'bn1'`` is not
  ``'layer1_0/bn1'``) or :func:`mtl_jax.recon.branch`, or pass ``state_spec`` explicitly.

Running statistics lag the weights; :func:`mtl_jax.batchnorm.recompute_statistics` recomputes
them after training (precise BN), per task stream through a :func:`per_task` forward.
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
from jax.extend.core import Literal

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
    "copy_state_per_task",
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
    "state_spec_per_task",
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


# Collectives over the task axis whose result is the same in every stream.
_POOLING_COLLECTIVES = ("psum", "pmax", "pmin", "all_gather")


def _sub_jaxpr(eqn: Any) -> Any:
    """The jaxpr of a call-like equation (jit, remat, custom_jvp/vjp) whose inputs and outputs
    are the equation's own, or ``None``."""
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(name)
        sub = getattr(sub, "jaxpr", sub)
        if (
            hasattr(sub, "eqns")
            and len(sub.invars) == len(eqn.invars)
            and len(sub.outvars) == len(eqn.outvars)
        ):
            return sub
    return None


def _dependent_outputs(jaxpr: Any, dependent_in: Sequence[bool], axis_name: Any) -> list[bool]:
    """Forward dependence: which outputs of ``jaxpr`` depend on the inputs marked ``True``.

    Call-like equations are followed inside; any other equation with a dependent input makes
    all its outputs dependent (conservative), except pooling collectives over ``axis_name``.
    """
    dep = {v for v, d in zip(jaxpr.invars, dependent_in, strict=True) if d}
    is_var = lambda v: not isinstance(v, Literal)
    for eqn in jaxpr.eqns:
        ins = [is_var(v) and v in dep for v in eqn.invars]
        if not any(ins):
            continue
        axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
        axes = axes if isinstance(axes, tuple | list) else (axes,)
        if eqn.primitive.name in _POOLING_COLLECTIVES and axis_name in axes:
            continue
        sub = _sub_jaxpr(eqn)
        outs = _dependent_outputs(sub, ins, axis_name) if sub is not None else None
        dep.update(v for i, v in enumerate(eqn.outvars) if outs is None or outs[i])
    return [is_var(v) and v in dep for v in jaxpr.outvars]


def _depends_on_stream(
    fn: Callable[[Any], list[Any]], row: Any, axis_name: Any, num_tasks: int
) -> list[bool]:
    """For each output of ``fn(row)`` (a list of arrays): does it depend on ``row``, the task
    stream's own inputs (one row of the copied leaves, masks, copied state, task index)?

    Traces ``fn`` once (``jax.make_jaxpr``) and follows the data flow; no computation."""
    env = {"axis_env": [(axis_name, num_tasks)]} if axis_name is not None else {}
    closed = jax.make_jaxpr(fn, **env)(row)
    return _dependent_outputs(closed.jaxpr, [True] * len(closed.jaxpr.invars), axis_name)


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


def per_task(
    apply_fn: Callable[..., Any],
    spec: PyTree,
    num_tasks: int,
    *,
    has_state: bool = False,
    state_spec: PyTree | None = None,
    state_reduction: StateReduction = None,
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
      has_state: whether ``apply_fn`` returns ``(out, state)``; the state is then handled as
        described in the module docstring: copied leaves keep their K rows, shared leaves come
        out of the ``vmap`` unbatched (``out_axes=None``), exactly.
      state_spec: spec of the returned state; by default each state leaf takes the marker of the
        spec leaf at the same path (a leading Flax collection ignored on both sides; or the
        unique spec leaf whose path ends with it on whole components), :data:`SHARED` when
        there is none.
      state_reduction: ``None`` (default): a shared state leaf computed inside the task streams
        (after the branch) is an error at trace time, naming the leaves; ``"mean"`` or a
        callable ``x[K, ...] -> x[...]`` reduces every shared state leaf over the task axis on
        purpose (today's averaging; ``"mean"`` is exact when the rows agree).
      axis_name: name of the task axis inside ``apply_fn`` (for collectives, e.g. a BatchNorm
        with ``axis_name`` pooling statistics over the task streams: its statistics are the same
        in every stream, so they stay shared without an error).

    Returns:
      ``fn(params, *args, **kwargs) -> outs`` (every leaf ``[K, ...]``), or ``(outs, state)``.
      When ``spec`` has :class:`Masked` leaves, the keyword ``masks`` is ``fn``'s own (the masks
      as arrays, see :func:`split_masks`; required for mask slots) and is not passed to
      ``apply_fn``.

    Raises:
      ValueError: (at trace time) if ``spec`` does not match ``params`` or K disagrees, the
        masks do not match the spec, or (``state_reduction=None``) a shared state leaf depends on
        the task stream, naming the leaves.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}.")
    _reducer(state_reduction)  # validate early
    takes_masks = bool(_masked_entries(spec))

    def fn(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        masks = kwargs.pop("masks", None) if takes_masks else None
        markers, leaves, treedef, batched = _task_axis_inputs(
            spec, masks, params, num_tasks, "per_task"
        )
        info: dict[str, Any] = {}

        def one(batched_t: list[Any]) -> Any:
            view = []
            for m, x, b in zip(markers, leaves, batched_t, strict=True):
                if m is COPIED:
                    view.append(b)
                elif isinstance(m, Masked):
                    view.append(_masked_value(x, b))
                else:
                    view.append(x)
            out = apply_fn(treedef.unflatten(view), *args, **kwargs)
            if not has_state:
                return out
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(
                    "per_task(..., has_state=True) needs apply_fn to return (out, state); got "
                    f"{type(out).__name__}."
                )
            rows, shared, split = _split_state(out[1], spec, state_spec, state_reduction)
            info.update(split)
            return out[0], rows, shared

        if not has_state:
            return jax.vmap(one, axis_size=num_tasks, axis_name=axis_name)(batched)
        try:
            outs, rows, shared = jax.vmap(
                one, axis_size=num_tasks, axis_name=axis_name, out_axes=(0, 0, None)
            )(batched)
        except ValueError as err:
            if not _is_out_axes_error(err):
                raise
            row = jax.tree.map(lambda x: x[0], batched)
            dependent = _depends_on_stream(lambda b: one(b)[2], row, axis_name, num_tasks)
            raise _stream_dependent_error("per_task", _shared_paths(info, dependent)) from err
        return outs, _join_state(rows, shared, info, state_reduction)

    return fn


def _shared_paths(info: dict[str, Any], dependent: Sequence[bool]) -> list[str]:
    """Paths of the shared (un-kept) state leaves flagged ``dependent`` (all of them if none is:
    the data-flow analysis is conservative, vmap's verdict is the reference)."""
    paths = [p for p, k in zip(info["paths"], info["keep"], strict=True) if not k]
    flagged = [p for p, d in zip(paths, dependent, strict=True) if d]
    return flagged or paths


def per_task_grads(
    task_loss_fn: Callable[..., Any],
    spec: PyTree,
    num_tasks: int,
    *,
    has_state: bool = False,
    state_spec: PyTree | None = None,
    state_reduction: StateReduction = None,
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
    statistics) and the K new states are handled as in :func:`per_task` (copied leaves keep
    their K rows, shared ones must not depend on the task stream unless ``state_reduction``
    is given). The state is not differentiated.

    Args:
      task_loss_fn: ``(view_t, t, *args, **kwargs) -> loss_t`` (a scalar), or with
        ``has_state`` ``(view_t, state_t, t, *args, **kwargs) -> (loss_t, new_state_t)``.
      spec: the sharing spec of the parameters (or a prefix of it), as in :func:`per_task`.
      num_tasks: K.
      has_state: see above.
      state_spec: spec of the state (e.g. ``spec["batch_stats"]`` of
        :func:`mtl_jax.recon.branch` for a state ``variables["batch_stats"]``); by default
        matched by path with ``spec`` as in :func:`per_task`.
      state_reduction, axis_name: as in :func:`per_task`. With ``unroll`` the check that a
        shared state leaf does not depend on the task stream is a data-flow analysis of task
        0's traced program (one more trace; conservative inside loops and control flow).
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
    _reducer(state_reduction)  # validate early
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
        info: dict[str, Any] = {}

        def one(batched_t: list[Any], s_batched_t: list[Any] | None, t: Any) -> Any:
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
            if not has_state:
                return value, grads
            loss, new_state = value
            rows, shared_state, split = _split_state(new_state, spec, state_spec, state_reduction)
            info.update(split)
            return (loss, rows, shared_state), grads

        row = lambda xs, t: None if xs is None else [None if x is None else x[t] for x in xs]
        if unroll:
            results = [one(row(batched, t), row(s_batched, t), t) for t in range(num_tasks)]
            if has_state:
                shared_state = results[0][0][2]  # stream-independent: every task's is the same
                results = [((v[0], v[1]), g) for v, g in results]
                if shared_state:
                    dependent = _depends_on_stream(
                        lambda r: one(r[0], r[1], 0)[0][2],
                        (row(batched, 0), row(s_batched, 0)),
                        None,
                        num_tasks,
                    )
                    if any(dependent):
                        raise _stream_dependent_error(
                            "per_task_grads", _shared_paths(info, dependent)
                        )
            value, grads = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
            if has_state:
                value = (*value, shared_state)
        else:
            out_axes = ((0, 0, None), 0) if has_state else 0
            try:
                value, grads = jax.vmap(
                    one, axis_size=num_tasks, axis_name=axis_name, out_axes=out_axes
                )(batched, s_batched, jnp.arange(num_tasks))
            except ValueError as err:
                if not (has_state and _is_out_axes_error(err)):
                    raise
                dependent = _depends_on_stream(
                    lambda r: one(r[0], r[1], r[2])[0][2],
                    (row(batched, 0), row(s_batched, 0), jnp.zeros((), jnp.int32)),
                    axis_name,
                    num_tasks,
                )
                raise _stream_dependent_error(
                    "per_task_grads", _shared_paths(info, dependent)
                ) from err
        if task_specific is not None:
            labels = jax.tree.leaves(task_specific_leaves(task_specific, params))
            grads = [
                jnp.sum(g, axis=0) if lab and m is not COPIED else g
                for g, lab, m in zip(grads, labels, markers, strict=True)
            ]
        grads = treedef.unflatten(grads)
        if not has_state:
            return value, grads
        losses, rows, shared_state = value
        return (losses, _join_state(rows, shared_state, info, state_reduction)), grads

    return fn


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
