"""LaSS: language-specific sub-networks, mapped from language pairs to tasks.

Lin et al., "Learning Language Specific Sub-network for Multilingual Machine Translation"
(ACL 2021), as used for image tasks by Alison, Jonathan & Suhartono (CommIT 18(1), 2024;
docs/design/METHODS.md section 3); checked against the official code (NLP-Playground/LaSS,
``toolbox/generate_mask.py``). Train the multi-task model, fine-tune a copy per task, prune each
copy's weight tensors to their largest-|w| fraction (:func:`magnitude_mask`, :func:`lass_masks`),
then continue training the original parameters with task t's forward on ``theta * M_t``
(:func:`lass_spec` builds the sharing spec; :func:`subnetwork_sizes` reports). Departures: an
embedding table is pruned as one tensor (LaSS prunes each row); exactly
``n - floor(prune_fraction * n)`` entries are kept, ties broken by position (the official
``kthvalue`` drops every tie). The procedure, which tensors are pruned and masks as arrays:
``docs/recipes/lass.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import _tree
from mtl_jax.sharing import Masked, PathFilter, path_filter, spec_from_masks

PyTree = Any

__all__ = ["lass_masks", "lass_spec", "magnitude_mask", "subnetwork_sizes"]


def _num_kept(size: int, keep_fraction: float) -> int:
    """``n - floor((1 - keep) * n)``: LaSS's ``kth = int(prob * n)`` pruned, guarded against FP."""
    pruned = math.floor((1.0 - keep_fraction) * size + 1e-9)
    return size - min(max(pruned, 0), size)


def _prunable(
    path: str, leaf: Any, inside: Any, weights_only: bool, include_embedding: bool
) -> bool:
    if not inside(path):
        return False
    if weights_only and jnp.ndim(leaf) < 2:
        return False
    return include_embedding or "embed" not in path.lower()


def _top_fraction(leaf: jax.Array, keep_fraction: float) -> jax.Array:
    """The largest-|w| ``keep_fraction`` of one tensor (exact count, ties by position)."""
    flat = jnp.abs(jnp.ravel(leaf))
    kept = _num_kept(flat.size, keep_fraction)
    order = jnp.argsort(-flat, stable=True)
    ranks = jnp.argsort(order, stable=True)
    return jnp.reshape(ranks < kept, jnp.shape(leaf))


def magnitude_mask(
    params: PyTree,
    keep_fraction: float,
    *,
    include: PathFilter = None,
    weights_only: bool = True,
    include_embedding: bool = False,
) -> PyTree:
    """Per-tensor magnitude pruning: every prunable tensor keeps its largest-|w| ``keep_fraction``.

    Args:
      params: one task's (fine-tuned) parameters.
      keep_fraction: in ``[0, 1]``; LaSS's ``prob`` (the pruned fraction) is ``1 - keep_fraction``.
      include: the subtree to prune (path predicate or regex; ``None`` = all).
      weights_only: prune weight tensors (``ndim >= 2``) only, as LaSS does (default).
      include_embedding: also prune tables whose path contains ``embed``.

    Returns:
      A bool pytree shaped like ``params``; unpruned leaves are all ``True``.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1]; got {keep_fraction}.")
    inside = path_filter(include)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for p, leaf in flat:
        if _prunable(_tree.path_str(p), leaf, inside, weights_only, include_embedding):
            out.append(_top_fraction(leaf, keep_fraction))
        else:
            out.append(jnp.ones(jnp.shape(leaf), bool))
    return treedef.unflatten(out)


def lass_masks(
    finetuned: Sequence[PyTree],
    prune_fraction: float,
    *,
    include: PathFilter = None,
    weights_only: bool = True,
    include_embedding: bool = False,
) -> PyTree:
    """The pruning step: per-task masks from K fine-tuned copies, stacked on a task axis.

    Args:
      finetuned: K parameter trees of the same structure, task t's fine-tuned copy at index t
        (step 2 of the procedure).
      prune_fraction: the fraction of every prunable tensor to drop (LaSS's ``prob``; a config
        value; UNVERIFIED for the CommIT CNN).
      include, weights_only, include_embedding: see :func:`magnitude_mask`.

    Returns:
      A bool pytree with leaves ``[K, *param.shape]``.
    """
    if not finetuned:
        raise ValueError("lass_masks needs one fine-tuned parameter tree per task (K >= 1).")
    if not 0.0 <= prune_fraction <= 1.0:
        raise ValueError(f"prune_fraction must be in [0, 1]; got {prune_fraction}.")
    structures = {jax.tree.structure(p) for p in finetuned}
    if len(structures) != 1:
        raise ValueError("lass_masks: the fine-tuned parameter trees differ in structure.")
    masks = [
        magnitude_mask(
            p,
            1.0 - prune_fraction,
            include=include,
            weights_only=weights_only,
            include_embedding=include_embedding,
        )
        for p in finetuned
    ]
    return jax.tree.map(lambda *ms: jnp.stack(ms), *masks)


def lass_spec(
    finetuned: Sequence[PyTree],
    prune_fraction: float,
    *,
    include: PathFilter = None,
    weights_only: bool = True,
    include_embedding: bool = False,
) -> PyTree:
    """The sharing spec of step 4: :class:`~mtl_jax.sharing.Masked` ``(M)`` on pruned tensors.

    Unpruned leaves are :data:`~mtl_jax.sharing.SHARED`, so the layers before the first pruned
    tensor stay outside the task streams. Use it with :func:`mtl_jax.sharing.per_task` on the
    original multi-task parameters (not the fine-tuned copies).
    """
    masks = lass_masks(
        finetuned,
        prune_fraction,
        include=include,
        weights_only=weights_only,
        include_embedding=include_embedding,
    )
    return spec_from_masks(masks)


def _stacked_masks(masks_or_spec: PyTree) -> list[tuple[str, np.ndarray]]:
    is_masked = lambda x: isinstance(x, Masked)
    flat, _ = jax.tree_util.tree_flatten_with_path(masks_or_spec, is_leaf=is_masked)
    slots = [_tree.path_str(p) for p, x in flat if is_masked(x) and x.mask is None]
    if slots:
        raise ValueError(
            f"subnetwork_sizes: the spec's Masked leaves [{_tree._listing(slots)}] are mask "
            "slots (their masks were split off by mtl.sharing.split_masks); pass the masks instead."
        )
    if any(is_masked(x) for _, x in flat):
        pairs = [(_tree.path_str(p), x.mask) for p, x in flat if is_masked(x)]
    else:
        pairs = [(_tree.path_str(p), x) for p, x in flat if isinstance(x, np.ndarray | jax.Array)]
    problems = [q for path, m in pairs for q in _tree.mask_problems(path, m)]
    if problems:
        raise TypeError("subnetwork_sizes: invalid masks: " + "; ".join(problems[:8]) + ".")
    return [(path, np.asarray(m) != 0) for path, m in pairs]


def subnetwork_sizes(masks_or_spec: PyTree) -> dict[str, Any]:
    """Per-task sub-network sizes and overlaps (host-side numbers, for the experiment's report).

    Args:
      masks_or_spec: stacked masks (leaves ``[K, *shape]``, e.g. :func:`lass_masks` or the masks
        of :func:`~mtl_jax.sharing.split_masks`) -- every array leaf counts -- or a sharing spec,
        whose :class:`~mtl_jax.sharing.Masked` leaves count.

    Returns:
      ``{"kept": int[K], "total": n, "fraction": float[K], "overlap": int[K, K]
      (|M_i and M_j|), "shared_by_all": |and_t M_t|, "union": |or_t M_t|, "leaves": {path:
      {"kept": int[K], "total": n}}}`` as numpy arrays and ints.
    """
    leaves = _stacked_masks(masks_or_spec)
    if not leaves:
        raise ValueError("subnetwork_sizes: no masks found (a spec without Masked leaves?).")
    ks = {m.shape[0] for _, m in leaves}
    if len(ks) != 1:
        raise ValueError(f"subnetwork_sizes: the masks disagree on the task axis K: {sorted(ks)}.")
    k = ks.pop()
    rows = np.concatenate([m.reshape(k, -1) for _, m in leaves], axis=1)  # [K, n]
    counts = rows.astype(np.int64)
    kept = counts.sum(axis=1)
    total = rows.shape[1]
    return {
        "kept": kept,
        "total": int(total),
        "fraction": kept / max(total, 1),
        "overlap": counts @ counts.T,
        "shared_by_all": int(np.all(rows, axis=0).sum()),
        "union": int(np.any(rows, axis=0).sum()),
        "leaves": {
            path: {"kept": m.reshape(k, -1).sum(axis=1), "total": int(m[0].size)}
            for path, m in leaves
        },
    }
