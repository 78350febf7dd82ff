"""The multi-task training step the benchmark scripts share (not part of the library).

Scripts run as ``python benchmarks/<name>.py`` import it as ``from _steps import ...``.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

import mtl_jax as mtl

#: ``params = {"trunk": ..., "heads": ...}``: the heads are the task-specific leaves.
HEADS = {"trunk": False, "heads": True}


def trunk_jacobian_step(
    grads_fn: Callable,
    aggregator: optax.GradientTransformation,
    optimizer: optax.GradientTransformation,
) -> tuple[Callable, Callable]:
    """``(init(params) -> state, step(params, state, x, y) -> (params, state, losses))`` of one
    Jacobian step on ``params = {"trunk": ..., "heads": ...}``.

    ``grads_fn``: ``mtl.value_and_grads(mtl.TrunkAndHeads(...))`` (``(losses[K], grads)``: trunk
    rows ``[K, ...]``, the heads' own gradients); the aggregator sees the trunk's rows
    (``mtl.shared_rows``), the optimizer updates every parameter.
    """
    tx = optax.chain(mtl.shared_rows(aggregator, HEADS), optimizer)

    def step(params, state, x, y):
        losses, grads = grads_fn(params, x, y)
        updates, state = tx.update(grads, state, params, task_losses=losses)
        return optax.apply_updates(params, updates), state, losses

    return tx.init, step


def representation_step(
    fn: Callable, num_tasks: int, tx: optax.GradientTransformation
) -> tuple[Callable, Callable]:
    """``(init, step(params, state, x, y) -> (params, state, losses))`` of one step of the
    one-backward representation path: ``fn`` is ``mtl.value_and_grads(mtl.TrunkAndHeads(...),
    representation=mtl.RepresentationWeighting(...))`` (its weighting's state is threaded),
    ``tx`` updates all parameters."""

    def init(params):
        return tx.init(params), fn.weighting.init(num_tasks)

    def step(params, state, x, y):
        tx_state, weighting_state = state
        (losses, aux), grads = fn(params, x, y, weighting_state=weighting_state)
        updates, tx_state = tx.update(grads, tx_state, params)
        return optax.apply_updates(params, updates), (tx_state, aux["weighting_state"]), losses

    return init, step
