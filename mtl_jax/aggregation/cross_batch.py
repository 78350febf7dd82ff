"""Cross-batch aggregators (SDMGrad, MoDo): weights from two independent row sets, one forward.

SDMGrad and MoDo solve for their weights with the cross-batch matrix ``C = J_a J_b^T`` of the
task Jacobians on two independent mini-batches ``a`` and ``b``: ``E[C] = E[J] E[J]^T``, while
one batch's ``J J^T`` is biased by the gradient noise. Their ``update`` takes the rows to
combine as usual and the two row sets as the keyword input ``paired_rows`` (:data:`PAIRED_ROWS`,
one of :data:`mtl_jax.methods.INPUTS`): per shared leaf ``[2, K, *param.shape]``, index 0 the
rows on batch ``a``, index 1 on batch ``b``.

**One forward, no extra backward.** :func:`value_and_paired_grads` splits the batch in two
halves and ``vmap``\\ s the gradient function over them: one forward over the whole batch and the
same K backward passes as :func:`mtl_jax.value_and_grads` on it (the work is linear in the
batch size), two row sets instead of one (twice the rows' memory). It returns the mean of the
two halves too, the full batch's losses and gradient tree (heads included), which is what the
update combines. Cost class: ``jacobian``; ``Method.batches == 2``.
``docs/recipes/cross_batch.md`` has the loop.

``paired_rows`` may be the whole gradient tree (task-specific leaves, which
:func:`mtl_jax.aggregation.shared_rows` masks, are skipped) or only the shared leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree

from ._checks import check_num_tasks
from .gramspace import from_weights_fn
from .moco import project_to_simplex

__all__ = [
    "CROSS_BATCH_AGGREGATORS",
    "PAIRED_ROWS",
    "cross_batch_transform",
    "cross_gram",
    "paired_leaves",
    "simplex_projection",
    "split_in_halves",
    "value_and_paired_grads",
]

PyTree = Any
Transform = optax.GradientTransformationExtraArgs

#: The keyword input of a cross-batch aggregator's ``update``: the rows on two batches.
PAIRED_ROWS = "paired_rows"
#: The registered aggregators that read :data:`PAIRED_ROWS` (the catalogue sets their
#: ``inputs`` and ``batches = 2`` from this).
CROSS_BATCH_AGGREGATORS = ("sdmgrad", "modo")

#: ``weigh(cross [K, K], inner) -> (weights [K], new_inner)``: a cross-batch method's step.
CrossWeigh = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def _flat_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    return [(_tree.path_str(p), leaf) for p, leaf in flat]


def _missing_error(name: str) -> ValueError:
    return ValueError(
        f"{name} reads two independent row sets: pass paired_rows=... to its update (leaves "
        "[2, K, ...]: the task Jacobian's rows on two halves of the batch; "
        "mtl.aggregation.value_and_paired_grads(grad_fn) returns them, see "
        "docs/recipes/cross_batch.md)."
    )


def paired_leaves(jac: PyTree, paired_rows: PyTree, name: str) -> list[jax.Array]:
    """The ``[2, K, ...]`` leaves of ``paired_rows`` that go with ``jac``'s (unmasked) leaves.

    ``paired_rows`` has either every leaf of ``jac``'s structure (masked positions, e.g. heads,
    are skipped whatever they hold) or only its unmasked leaves.

    Raises:
      ValueError: when ``paired_rows`` is missing, has another number of leaves, or a leaf is
        not shaped ``[2, *jac_leaf.shape]``.
    """
    if paired_rows is None:
        raise _missing_error(name)
    jac_flat = _flat_with_paths(jac)
    pair_flat = _flat_with_paths(paired_rows)
    unmasked = [(p, x) for p, x in jac_flat if not isinstance(x, optax.MaskedNode)]
    pair_unmasked = [(p, x) for p, x in pair_flat if not isinstance(x, optax.MaskedNode)]
    if len(pair_flat) == len(jac_flat):
        pairs = [
            (path, leaf, pair)
            for (path, leaf), (_, pair) in zip(jac_flat, pair_flat, strict=True)
            if not isinstance(leaf, optax.MaskedNode)
        ]
    elif len(pair_unmasked) == len(unmasked):
        pairs = [(p, x, y) for (p, x), (_, y) in zip(unmasked, pair_unmasked, strict=True)]
    else:
        raise ValueError(
            f"{name}: paired_rows has {len(pair_flat)} leaves; expected the gradient tree's "
            f"{len(jac_flat)} or its {len(unmasked)} shared leaves (each [2, K, ...])."
        )
    out = []
    for path, leaf, pair in pairs:
        if isinstance(pair, optax.MaskedNode) or jnp.shape(pair) != (2, *jnp.shape(leaf)):
            got = "a masked node" if isinstance(pair, optax.MaskedNode) else jnp.shape(pair)
            raise ValueError(
                f"{name}: paired_rows leaf {path!r} must be [2, *rows.shape] = "
                f"{(2, *jnp.shape(leaf))} (the rows on two batches); got {got}."
            )
        if not jnp.issubdtype(jnp.result_type(pair), jnp.floating):
            raise TypeError(
                f"{name}: paired_rows leaf {path!r} must be floating-point; got "
                f"{jnp.result_type(pair)}."
            )
        out.append(jnp.asarray(pair))
    return out


def simplex_projection(v: jax.Array) -> jax.Array:
    """The Euclidean projection of ``v [K]`` onto the simplex, computed on ``v - max(v)`` (the
    projection is unchanged by a shift of every entry): with entries near 1e27 the unshifted
    threshold loses the 1 to rounding and every weight became 0 (MoDo at gradients of 1e15)."""
    return project_to_simplex(v - jnp.max(v))


def cross_gram(pairs: Sequence[jax.Array]) -> jax.Array:
    """``C = J_a J_b^T`` ``[K, K]`` summed over the leaves ``[2, K, ...]`` (16-bit floats in
    float32). Not symmetric: ``C[i, j] = g_i(a) . g_j(b)``."""
    total = None
    for pair in pairs:
        k = pair.shape[1]
        dtype = jnp.float32 if jnp.finfo(pair.dtype).bits < 32 else pair.dtype
        a = jnp.reshape(pair[0], (k, -1)).astype(dtype)
        b = jnp.reshape(pair[1], (k, -1)).astype(dtype)
        block = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
        total = block if total is None else total + block
    if total is None:
        raise ValueError("cross_gram: no leaves.")
    return total


def cross_batch_transform(
    name: str, num_tasks: int | None, init_inner: Callable[[int], Any], weigh: CrossWeigh
) -> Transform:
    """The optax transform of a cross-batch method: ``d = sum_k w_k g_k`` over the rows given
    (leaves ``[K, ...]``), ``w`` from ``weigh(J_a J_b^T, inner)`` with the ``paired_rows`` input.

    The state is an :class:`~mtl_jax.aggregation.gramspace.AggregatorState` (``weights`` reads
    the last ``w``; the logged Gram matrix is that of the rows given). Non-finite rows, paired
    rows or losses give an all-NaN update and keep the method's state. Needs ``num_tasks``.
    """
    check_num_tasks(num_tasks, name)
    if num_tasks is None:
        raise ValueError(
            f"{name} keeps per-task state (its weights, warm-started across steps), so it needs "
            "the number of tasks at init: pass num_tasks=K to the aggregator."
        )
    k = int(num_tasks)

    def weights_fn(jac, gram, inner, key, task_losses, extra_args):
        del gram, key, task_losses
        unknown = sorted(set(extra_args) - {PAIRED_ROWS})
        if unknown:
            raise ValueError(
                f"{name}.update got unknown keyword input(s) {unknown}; it takes task_losses= "
                f"and {PAIRED_ROWS}=."
            )
        pairs = paired_leaves(jac, extra_args.get(PAIRED_ROWS), name)
        if pairs[0].shape[1] != k:
            raise ValueError(
                f"{name} was built for {k} tasks, but paired_rows has K={pairs[0].shape[1]}."
            )
        cross = cross_gram(pairs)
        w, new_inner = weigh(cross, inner)
        return jnp.where(jnp.all(jnp.isfinite(cross)), w, jnp.nan), new_inner

    return from_weights_fn(weights_fn, lambda: init_inner(k), num_tasks=k, name=name)


def _split(x: jax.Array, axis: int) -> jax.Array:
    """``x`` with its ``axis`` of size B cut into two halves stacked on a new leading axis."""
    x = jnp.asarray(x)
    size = x.shape[axis]
    if size % 2:
        raise ValueError(
            f"value_and_paired_grads: a batch axis of size {size} cannot be split into two equal "
            "halves; use an even batch size (or drop one example)."
        )
    x = jnp.moveaxis(x, axis, 0)
    x = jnp.reshape(x, (2, size // 2, *x.shape[1:]))
    return jnp.moveaxis(x, 1, axis + 1)


def split_in_halves(tree: PyTree, axis: int | None) -> PyTree:
    """Every leaf's ``axis`` cut in two halves, stacked on a new leading axis of size 2
    (``None``: the tree is not split and is shared by both halves)."""
    if axis is None:
        return tree
    return jax.tree.map(lambda x: _split(x, axis), tree)


def value_and_paired_grads(
    grad_fn: Callable[..., tuple[jax.Array, PyTree]],
    batch_axes: int | Sequence[int | None] | None = 0,
) -> Callable[..., tuple[jax.Array, PyTree, PyTree]]:
    """``fn(params, *batch) -> (losses [K], grads, paired_rows)`` for a cross-batch method.

    Splits each batch argument in two halves along its batch axis and ``vmap``\\ s
    ``grad_fn(params, *batch) -> (losses, grads)`` (e.g. ``mtl.value_and_grads(loss_fn,
    is_head)``) over them: one forward over the whole batch, the same backward work as one call
    on it. ``paired_rows`` is the gradient tree with a leading axis of 2 (the halves);
    ``losses`` and ``grads`` are the mean over the halves, i.e. the whole batch's when the
    losses are means over equal halves.

    Args:
      grad_fn: returns ``(losses [K], gradient tree)``.
      batch_axes: the batch axis of every batch argument (one int for all), ``None`` for an
        argument that is not split.

    Raises:
      ValueError: (at trace time) for an odd batch size, or ``batch_axes`` of another length
        than the batch arguments.
    """

    def fn(params: PyTree, *batch: Any) -> tuple[jax.Array, PyTree, PyTree]:
        axes = (
            [batch_axes] * len(batch)
            if batch_axes is None or isinstance(batch_axes, int)
            else list(batch_axes)
        )
        if len(axes) != len(batch):
            raise ValueError(
                f"value_and_paired_grads: batch_axes has {len(axes)} entries for "
                f"{len(batch)} batch arguments; give one per argument (None: not split)."
            )
        halves = [split_in_halves(arg, axis) for arg, axis in zip(batch, axes, strict=True)]
        in_axes = (None, *[None if axis is None else 0 for axis in axes])
        losses2, grads2 = jax.vmap(grad_fn, in_axes=in_axes)(params, *halves)
        mean = lambda x: jnp.mean(x, axis=0).astype(x.dtype)
        return mean(losses2), jax.tree.map(mean, grads2), grads2

    return fn
