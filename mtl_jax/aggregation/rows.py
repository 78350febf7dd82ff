"""``shared_rows``: the one adapter from a gradient tree to an update.

The gradient tree of :func:`mtl_jax.value_and_grads` holds Jacobian rows ``[K, *shape]`` for the
shared leaves and each task's own ordinary gradient for the task-specific ones (heads, per-task
copies). ``shared_rows(aggregator, task_specific)`` runs the aggregator on the shared leaves only
(``optax.masked``) and passes the task-specific gradients through, so one
``optax.chain(shared_rows(aggregator, spec), optimizer)`` updates every parameter. A head's
gradient is never aggregated (MGDA would rescale a head's only gradient). See ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree

__all__ = ["shared_rows"]

PyTree = Any
Transform = optax.GradientTransformationExtraArgs


def shared_rows(
    aggregator: optax.GradientTransformation,
    task_specific: PyTree | Callable[[PyTree], PyTree],
) -> Transform:
    """Aggregates the shared leaves' rows; task-specific leaves' gradients pass through unchanged.

    The companion of :func:`mtl_jax.value_and_grads`, whose gradient tree has Jacobian rows
    ``[K, *shape]`` for shared leaves and ordinary gradients ``[*shape]`` for task-specific ones
    (heads, per-task copies ``[K, ...]``: each copy already holds its own task's gradient). The
    aggregator sees only the shared leaves (the others are ``optax.MaskedNode``), so one
    ``optax.chain(shared_rows(aggregator, ...), optimizer)`` updates every parameter; nothing
    task-specific ever has a task axis of rows.

    Args:
      aggregator: any aggregator (applied to the shared leaves only).
      task_specific: as in :func:`mtl_jax.value_and_grads`: a bool pytree or a sharing spec
        (structure of the parameters or a prefix), or a callable ``params -> either``.

    Returns:
      A transform whose ``update(grads, state, params=None, *, task_losses=None)`` returns a
      gradient pytree shaped like the parameters; its state is ``optax.MaskedState`` of the
      aggregator's state, with the structure ``init`` gave it.

    Raises:
      ValueError: (at trace time) if a task-specific gradient is not shaped like its parameter
        (e.g. a full task Jacobian from a loss vector's :func:`mtl_jax.value_and_grads` without ``task_specific`` was given: compute
        the gradients with :func:`mtl_jax.value_and_grads` and the same ``task_specific``).

    Example::

      spec = ...  # e.g. from mtl.recon.branch
      tx = optax.chain(mtl.shared_rows(mtl.aggregation.pcgrad(), spec), optax.adam(1e-3))
      opt_state = tx.init(params)
      losses, grads = mtl.value_and_grads(loss_fn, spec)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
    """
    from mtl_jax.sharing import task_specific_leaves

    def is_shared(tree: PyTree) -> PyTree:
        return jax.tree.map(lambda s: not s, task_specific_leaves(task_specific, tree))

    inner = optax.masked(aggregator, is_shared)

    def init(params: PyTree) -> PyTree:
        _tree.check_not_variables(params, "shared_rows.init")
        return inner.init(params)

    def update(grads, state, params=None, **extra_args):
        _tree.check_not_variables(grads, "shared_rows.update (grads)")
        if params is not None:
            grad_pairs, par_pairs = _tree.leaves_with_paths(grads), _tree.leaves_with_paths(params)
            if [p for p, _ in grad_pairs] != [p for p, _ in par_pairs]:
                missing, extra = _tree.path_difference(
                    [p for p, _ in par_pairs], [p for p, _ in grad_pairs]
                )
                raise ValueError(
                    "shared_rows: the gradients do not have the structure of the parameters; "
                    f"only in the parameters: [{_tree._listing(missing)}], only in the "
                    f"gradients: [{_tree._listing(extra)}]."
                )
            specific = jax.tree.leaves(task_specific_leaves(task_specific, params))
            bad = [
                f"{path}: grad {tuple(jnp.shape(g))} vs param {tuple(jnp.shape(p))}"
                for s, (path, g), (_, p) in zip(specific, grad_pairs, par_pairs, strict=True)
                if s and tuple(jnp.shape(g)) != tuple(jnp.shape(p))
            ]
            if bad:
                raise ValueError(
                    "shared_rows: task-specific gradients must be shaped like their parameters "
                    "(the ordinary gradient from mtl.value_and_grads); a full task Jacobian is "
                    "not accepted: compute the gradients with mtl.value_and_grads(loss_fn, "
                    "task_specific). Mismatching leaves: " + _tree._listing(bad)
                )
        return inner.update(grads, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init, update)
