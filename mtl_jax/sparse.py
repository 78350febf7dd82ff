"""Sparse training: fixed masks of trainable parameters and the mask transform.

Sparse training (ST; Zhang et al., "Proactive Gradient Conflict Mitigation in Multi-Task
Learning: A Sparse Training Perspective", arXiv 2411.18615; docs/design/METHODS.md section 4)
updates only a fixed subset of the shared encoder, ``theta <- theta - lr * M * d``, with the mask
computed once, before training, from the parameter magnitudes. :func:`psn_mask` is the paper's
rule (every output unit keeps its ``k`` largest-|w| incoming weights); :func:`random_mask`,
:func:`global_magnitude_mask` and :func:`reverse_mask` are its controls at the same count;
:func:`mask_stats` and :func:`psn_k` count and size masks. :func:`apply_mask` zeroes masked
coordinates of updates: put it after the optimizer, so frozen weights stay bit-identical.
Departure (UNVERIFIED in the paper): biases and other ``ndim <= 1`` leaves train densely unless
``other="freeze"``. Which leaves are masked, and an example: ``docs/recipes/sparse.md``.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import _tree
from mtl_jax.sharing import PathFilter, path_filter

PyTree = Any
Other = Literal["train", "freeze"]

__all__ = [
    "MaskState",
    "apply_mask",
    "global_magnitude_mask",
    "mask_stats",
    "psn_k",
    "psn_mask",
    "random_mask",
    "reverse_mask",
]


# --------------------------------------------------------------------------------------------
# Leaf selection and per-neuron views


def _leaves(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [_tree.path_str(p) for p, _ in flat], [x for _, x in flat], treedef


def _selected(paths: list[str], leaves: list[Any], include: PathFilter) -> list[bool]:
    """Weight tensors (``ndim >= 2``) inside the subtree."""
    inside = path_filter(include)
    return [bool(inside(p)) and jnp.ndim(x) >= 2 for p, x in zip(paths, leaves, strict=True)]


def _check_other(other: str) -> None:
    if other not in ("train", "freeze"):
        raise ValueError(f"other must be 'train' or 'freeze'; got {other!r}.")


def _dense_or_other(path: str, leaf: Any, include: PathFilter, other: Other) -> jax.Array:
    """The mask of a leaf that is not a selected weight tensor."""
    frozen = other == "freeze" and path_filter(include)(path)
    return jnp.full(jnp.shape(leaf), not frozen, dtype=bool)


def _to_neurons(w: jax.Array, out_axis: int) -> jax.Array:
    """``[..., out, ...] -> [fan_in, out]``: one column per output unit / output channel."""
    w = jnp.moveaxis(jnp.asarray(w), out_axis, -1)
    return jnp.reshape(w, (-1, w.shape[-1]))


def _fan_in_out(shape: tuple[int, ...], out_axis: int) -> tuple[int, int]:
    out = shape[out_axis]
    return int(np.prod(shape)) // max(out, 1), out


def _from_neurons(m: jax.Array, shape: tuple[int, ...], out_axis: int) -> jax.Array:
    moved = list(shape)
    out = moved.pop(out_axis)
    return jnp.moveaxis(jnp.reshape(m, (*moved, out)), -1, out_axis)


def _ranks(scores: jax.Array, axis: int = 0) -> jax.Array:
    """Rank of every entry along ``axis`` in *descending* order (0 = largest); ties by index."""
    order = jnp.argsort(-scores, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True)


def _check_like(like: PyTree, params: PyTree, what: str) -> list[Any]:
    """The leaves of the reference mask, checked against the parameters' structure and shapes."""
    like_paths, like_leaves, _ = _leaves(like)
    paths, leaves, _ = _leaves(params)
    if like_paths != paths:
        missing, extra = _tree.path_difference(paths, like_paths)
        raise ValueError(
            f"{what}: the reference mask does not have the structure of the parameters; leaves "
            f"only in the parameters: [{_tree._listing(missing)}]; only in the mask: "
            f"[{_tree._listing(extra)}]."
        )
    bad = [
        f"{p}: mask {tuple(jnp.shape(m))} vs param {tuple(jnp.shape(x))}"
        for p, m, x in zip(paths, like_leaves, leaves, strict=True)
        if jnp.shape(m) != jnp.shape(x)
    ]
    if bad:
        raise ValueError(f"{what}: reference mask leaves of the wrong shape: {_tree._listing(bad)}")
    _check_mask_dtypes(like_paths, like_leaves, what)
    return [jnp.asarray(m) != 0 for m in like_leaves]


def _check_mask_dtypes(paths: list[str], masks: list[Any], what: str) -> None:
    """Every mask leaf is bool (or numeric 0/1; see :func:`mtl_jax._tree.mask_problems`)."""
    problems = [q for p, m in zip(paths, masks, strict=True) for q in _tree.mask_problems(p, m)]
    if problems:
        raise TypeError(f"{what}: invalid mask leaves: " + "; ".join(problems[:8]) + ".")


# --------------------------------------------------------------------------------------------
# Mask constructors


def psn_mask(
    params: PyTree,
    k: int,
    *,
    include: PathFilter = None,
    other: Other = "train",
    out_axis: int = -1,
) -> PyTree:
    """PSN mask (ST paper, Sec. 3.2): each output unit keeps its ``k`` largest-|w| incoming weights.

    For a Dense kernel ``[in, out]`` the selection runs down every column (PyTorch's output
    *row* of ``weight[out, in]``); for a Conv kernel ``[h, w, in, out]`` over the ``h*w*in`` fan-in
    of every output channel (the paper does not spell out the conv case; this is the natural
    reading, UNVERIFIED). A unit with fan-in ``<= k`` keeps all its weights, so every neuron keeps
    trainable inputs. Ties are broken by position, so the count is exactly ``min(k, fan_in)`` per
    unit.

    Args:
      params: the parameters at initialisation (for a randomly initialised model the paper uses
        the initial magnitudes).
      k: weights kept per output unit (``>= 1``); the paper uses 300 and tunes it by grid search
        with joint training, then reuses it for every method. See :func:`psn_k`.
      include: the subtree to sparsify (the encoder): a path predicate or regex; ``None`` = all.
      other: ``"train"`` or ``"freeze"`` for biases and norm parameters inside the subtree (module
        docstring).
      out_axis: axis of the output units in weight tensors (``-1`` for Flax kernels).

    Returns:
      A bool pytree shaped like ``params`` (``True`` = trainable).
    """
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"psn_mask: k must be a positive integer; got {k!r}.")
    _check_other(other)
    paths, leaves, treedef = _leaves(params)
    out = []
    for path, leaf, sel in zip(paths, leaves, _selected(paths, leaves, include), strict=True):
        if not sel:
            out.append(_dense_or_other(path, leaf, include, other))
            continue
        cols = jnp.abs(_to_neurons(leaf, out_axis))
        keep = _ranks(cols, axis=0) < k
        out.append(_from_neurons(keep, jnp.shape(leaf), out_axis))
    return treedef.unflatten(out)


def reverse_mask(
    params: PyTree, like: PyTree, *, include: PathFilter = None, out_axis: int = -1
) -> PyTree:
    """The "reverse" control (ST paper, Table 5): the *lowest*-|w| incoming weights per unit.

    Every output unit keeps as many weights as it has in ``like`` (a :func:`psn_mask`), so the
    count matches per unit and in total. Leaves that are not selected weight tensors copy ``like``
    (same treatment of biases, norms and the dense heads).
    """
    like_leaves = _check_like(like, params, "reverse_mask")
    paths, leaves, treedef = _leaves(params)
    out = []
    for leaf, ref, sel in zip(leaves, like_leaves, _selected(paths, leaves, include), strict=True):
        if not sel:
            out.append(ref)
            continue
        counts = jnp.sum(_to_neurons(ref, out_axis), axis=0)  # [out]
        ascending = _ranks(-jnp.abs(_to_neurons(leaf, out_axis)), axis=0)
        out.append(_from_neurons(ascending < counts[None, :], jnp.shape(leaf), out_axis))
    return treedef.unflatten(out)


def random_mask(
    params: PyTree, like: PyTree, key: jax.Array, *, include: PathFilter = None
) -> PyTree:
    """The "random" control (ST paper, Table 5): uniformly random trainable weights.

    Each selected weight tensor keeps, at random positions, exactly as many weights as it has in
    ``like`` (so per-tensor and total counts match the reference mask). Leaves that are not
    selected weight tensors copy ``like``.
    """
    like_leaves = _check_like(like, params, "random_mask")
    paths, leaves, treedef = _leaves(params)
    out = []
    for i, (leaf, ref, sel) in enumerate(
        zip(leaves, like_leaves, _selected(paths, leaves, include), strict=True)
    ):
        if not sel:
            out.append(ref)
            continue
        size = int(np.prod(jnp.shape(leaf)))
        perm = jax.random.permutation(jax.random.fold_in(key, i), size)
        out.append(jnp.reshape(perm < jnp.sum(ref), jnp.shape(leaf)))
    return treedef.unflatten(out)


def global_magnitude_mask(params: PyTree, like: PyTree, *, include: PathFilter = None) -> PyTree:
    """The "global" control (ST paper, Table 5): the top-|w| weights over the whole subtree.

    Keeps the ``N`` largest-|w| entries over all selected weight tensors together, ``N`` being the
    number of trainable selected weights in ``like``; some neurons may keep none. Leaves that are
    not selected weight tensors copy ``like``.
    """
    like_leaves = _check_like(like, params, "global_magnitude_mask")
    paths, leaves, treedef = _leaves(params)
    selected = _selected(paths, leaves, include)
    picked = [i for i, s in enumerate(selected) if s]
    out = list(like_leaves)
    if not picked:
        return treedef.unflatten(out)
    flat = jnp.concatenate([jnp.abs(jnp.ravel(leaves[i])) for i in picked])
    budget = sum(jnp.sum(like_leaves[i]) for i in picked)
    keep = _ranks(flat) < budget
    start = 0
    for i in picked:
        size = int(np.prod(jnp.shape(leaves[i])))
        out[i] = jnp.reshape(keep[start : start + size], jnp.shape(leaves[i]))
        start += size
    return treedef.unflatten(out)


# --------------------------------------------------------------------------------------------
# Statistics


def mask_stats(mask: PyTree, *, include: PathFilter = None) -> dict[str, Any]:
    """Trainable counts and fractions per leaf and in total (host-side Python numbers).

    Args:
      mask: a bool (or 0/1) pytree; leaves may be task-stacked.
      include: count only these leaves (e.g. the encoder, to report the encoder's trainable
        fraction as the ST paper does); ``None`` = all.

    Returns:
      ``{"leaves": {path: {"trainable", "total", "fraction"}}, "trainable", "total",
      "fraction"}``.
    """
    inside = path_filter(include)
    per_leaf: dict[str, dict[str, Any]] = {}
    _check_mask_dtypes(*_leaves(mask)[:2], "mask_stats")
    for path, m in zip(*_leaves(mask)[:2], strict=True):
        if not inside(path):
            continue
        arr = np.asarray(m) != 0
        per_leaf[path] = {
            "trainable": int(arr.sum()),
            "total": int(arr.size),
            "fraction": float(arr.mean()) if arr.size else 1.0,
        }
    trainable = sum(v["trainable"] for v in per_leaf.values())
    total = sum(v["total"] for v in per_leaf.values())
    return {
        "leaves": per_leaf,
        "trainable": trainable,
        "total": total,
        "fraction": trainable / total if total else 1.0,
    }


def psn_k(
    params: PyTree, fraction: float, *, include: PathFilter = None, out_axis: int = -1
) -> int:
    """The smallest ``k`` whose :func:`psn_mask` trains at least ``fraction`` of the selected weights.

    The count of a PSN mask is ``sum over units of min(k, fan_in)``, so no mask is built. The
    paper's rule of thumb: about 30% trainable for pre-trained backbones, about 60% for randomly
    initialised ones (docs/design/METHODS.md section 4).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"psn_k: fraction must be in (0, 1]; got {fraction}.")
    paths, leaves, _ = _leaves(params)
    shapes = [
        _fan_in_out(jnp.shape(x), out_axis)
        for x, s in zip(leaves, _selected(paths, leaves, include), strict=True)
        if s
    ]
    if not shapes:
        raise ValueError("psn_k: no weight tensor (ndim >= 2) inside the subtree.")
    total = sum(f * o for f, o in shapes)
    count = lambda k: sum(min(k, f) * o for f, o in shapes)
    lo, hi = 1, max(f for f, _ in shapes)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) >= fraction * total:
            hi = mid
        else:
            lo = mid + 1
    return lo


# --------------------------------------------------------------------------------------------
# The mask transform


class MaskState(NamedTuple):
    """State of :func:`apply_mask`: the mask as bool arrays (a jit argument, not a constant)."""

    mask: PyTree


def _is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _mask_leaf(path: str, update: Any, mask: jax.Array) -> Any:
    if _is_masked_node(update):
        return update
    ushape, mshape = jnp.shape(update), jnp.shape(mask)
    if mshape == () or ushape == mshape:
        keep = mask
    elif len(ushape) == len(mshape) + 1 and ushape[1:] == mshape:
        keep = mask[None]  # task-stacked update [K, *shape]: the same mask for every task
    else:
        raise ValueError(
            f"apply_mask: update leaf {path!r} has shape {ushape}, which is neither the mask's "
            f"{mshape} nor task-stacked (K, *{mshape})."
        )
    return jnp.where(keep, update, jnp.zeros((), jnp.result_type(update)))


def apply_mask(mask: PyTree) -> optax.GradientTransformation:
    """Zeroes the masked coordinates (``mask == False``) of the updates.

    The mask transform of sparse training (``theta <- theta - lr * M * d``). Unlike
    :func:`optax.masked`, which routes whole leaves, this masks coordinates inside leaves.

    * Ordinary updates (leaves shaped like the parameters) are masked elementwise.
    * Task-stacked updates (a task Jacobian, leaves ``[K, *param.shape]``) get the same mask on
      every task row, so ``apply_mask`` can sit in front of an aggregator; a mask that is itself
      stacked ``[K, *shape]`` (per-task masks, e.g. LaSS's) masks row t with ``M_t``.
    * A scalar mask leaf masks the whole leaf. Leaves hidden by :func:`optax.masked`
      (``MaskedNode``) pass through.

    Placed **after** the optimizer, masked parameters stay bit-identical through training: their
    update is exactly ``+0.0`` whatever the optimizer does (Adam moments, AdamW weight decay), and
    ``x + 0.0 == x`` bit for bit (the only exception is ``-0.0``, which becomes ``+0.0``; equal in
    value). Placed only before the optimizer, weight decay would still move them. Non-finite
    values at masked coordinates are zeroed too.

    The mask lives in the transform's state (``MaskState``), so under ``jit`` it is an argument
    shared and sharded like the optimizer state, not a constant baked into the program.

    Example::

      mask = mtl.sparse.psn_mask(params, k=8, include="encoder")
      tx = optax.chain(mtl.aggregation.pcgrad(), optax.adamw(1e-3), mtl.sparse.apply_mask(mask))

    Args:
      mask: a pytree with the structure of the parameters whose leaves are bool or 0/1 arrays of
        the parameter's shape (or scalars); ``True``/1 = trainable.

    Returns:
      An ``optax.GradientTransformation``.

    .. seealso:: :func:`psn_mask`, :func:`optax.masked`, :func:`optax.transforms.freeze`.
    """
    mask_paths, mask_leaves, mask_def = _leaves(mask)
    _check_mask_dtypes(mask_paths, mask_leaves, "apply_mask")

    def init(params: PyTree) -> MaskState:
        flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked_node)
        paths = [_tree.path_str(p) for p, x in flat]
        if paths != mask_paths:
            missing, extra = _tree.path_difference(paths, mask_paths)
            raise ValueError(
                "apply_mask: the mask does not have the structure of the parameters; leaves only "
                f"in the parameters: [{_tree._listing(missing)}]; only in the mask: "
                f"[{_tree._listing(extra)}]."
            )
        bad = [
            f"{p}: mask {tuple(jnp.shape(m))} vs param {tuple(jnp.shape(x))}"
            for p, (_, x), m in zip(paths, flat, mask_leaves, strict=True)
            if not _is_masked_node(x) and jnp.shape(m) not in ((), jnp.shape(x))
        ]
        if bad:
            raise ValueError(f"apply_mask: mask leaves of the wrong shape: {_tree._listing(bad)}")
        return MaskState(mask_def.unflatten([jnp.asarray(m) != 0 for m in mask_leaves]))

    def update(
        updates: PyTree, state: MaskState, params: PyTree | None = None
    ) -> tuple[PyTree, MaskState]:
        del params
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_masked_node)
        masks, mask_treedef = jax.tree.flatten(state.mask)
        if treedef != mask_treedef:
            paths = [_tree.path_str(p) for p, _ in flat]
            missing, extra = _tree.path_difference(paths, mask_paths)
            raise ValueError(
                "apply_mask: the updates do not have the structure of the mask (the parameters'); "
                f"leaves only in the updates: [{_tree._listing(missing)}]; only in the mask: "
                f"[{_tree._listing(extra)}]."
            )
        out = [_mask_leaf(_tree.path_str(p), u, m) for (p, u), m in zip(flat, masks, strict=True)]
        return treedef.unflatten(out), state

    return optax.GradientTransformation(init, update)
