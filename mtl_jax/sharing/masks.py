"""Masked leaves (LaSS): masks held by the spec, or ordinary arrays given at call time.

A spec's masks are Python constants of the functions built from it: under ``jit`` they are baked
into the program (one constant of ``K x |theta|`` per masked leaf) and cannot be sharded.
:func:`split_masks` splits a spec into its structure (mask slots ``Masked()``) and a pytree of
mask arrays, given as ``masks=`` when the functions of :func:`~mtl_jax.sharing.per_task` and
:func:`~mtl_jax.sharing.per_task_grads` are called (arguments of the program: no constant, no
recompilation when their values change); :func:`with_masks` is its inverse, and
:func:`spec_from_masks` builds a spec from stacked masks (:mod:`mtl_jax.lass`).

See ``docs/custom_loop.md``, section "Masks as arrays".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import _tree

from .markers import SHARED, Marker, Masked, _is_marker
from .paths import _listing
from .specs import _expand

PyTree = Any

__all__ = ["spec_from_masks", "split_masks", "with_masks"]


def spec_from_masks(masks: PyTree) -> PyTree:
    """A spec from stacked per-task masks (leaves ``[K, *param.shape]``).

    A leaf whose mask keeps everything for every task is :data:`SHARED` (so it stays outside the
    task streams and a shared prefix is still computed once); any other leaf is
    :class:`Masked`. The masks must be concrete (computed once, outside ``jit``).
    """

    def one(p: Any, m: Any) -> Marker:
        path = _tree.path_str(p)
        arr = np.asarray(m)
        if arr.ndim == 0:
            raise ValueError(
                f"Stacked masks need a leading task axis; mask leaf {path!r} is a scalar "
                "(expected [K, *param.shape])."
            )
        problems = _tree.mask_problems(path, m)
        if problems:
            raise TypeError("spec_from_masks: " + "; ".join(problems) + ".")
        return SHARED if bool(np.all(arr != 0)) else Masked(arr.astype(bool))

    return jax.tree_util.tree_map_with_path(one, masks)


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

      spec = mtl.lass.lass_spec(finetuned, prune_fraction=0.5, include="^encoder/")
      structure, masks = mtl.sharing.split_masks(spec)
      grad_fn = jax.jit(mtl.value_and_grads(mtl.PerTaskLosses(task_loss, structure, K)))
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
            "mtl.sharing.split_masks(spec) (None at unmasked leaves) or as a pytree with the masked "
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
        problems.extend(_tree.mask_problems(path, m.mask))
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
                "mtl.sharing.split_masks(spec)."
            )
        return spec
    filled = with_masks(spec, masks)
    _check_mask_arrays(filled, params, num_tasks)
    return filled
