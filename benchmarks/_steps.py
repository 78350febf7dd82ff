"""The multi-task training step the benchmark scripts share (not part of the library).

Scripts run as ``python benchmarks/<name>.py`` import it as ``from _steps import ...``.
"""

from __future__ import annotations

from collections.abc import Callable

import optax


def trunk_jacobian_step(
    grads_fn: Callable,
    trunk_tx: optax.GradientTransformation,
    head_tx: optax.GradientTransformation,
) -> tuple[Callable, Callable]:
    """``(init(params) -> state, step(params, state, x, y) -> (params, state, losses))`` of one
    Jacobian step on ``params = {"trunk": ..., "heads": ...}``.

    ``grads_fn``: :func:`mtl_jax.mtl_value_and_grad` of the trunk and the heads
    (``(losses[K], jac: trunk leaves [K, ...], head_grads, aux)``); ``trunk_tx`` takes the Jacobian
    (an aggregator chained with an optimizer, ``task_losses=`` passed), ``head_tx`` the heads'
    own gradients.
    """

    def init(params):
        return trunk_tx.init(params["trunk"]), head_tx.init(params["heads"])

    def step(params, state, x, y):
        trunk_state, head_state = state
        losses, jac, head_grads, _ = grads_fn(params["trunk"], params["heads"], x, y)
        trunk_updates, trunk_state = trunk_tx.update(
            jac, trunk_state, params["trunk"], task_losses=losses
        )
        head_updates, head_state = head_tx.update(head_grads, head_state, params["heads"])
        new = {
            "trunk": optax.apply_updates(params["trunk"], trunk_updates),
            "heads": optax.apply_updates(params["heads"], head_updates),
        }
        return new, (trunk_state, head_state), losses

    return init, step


def representation_step(
    fn: Callable, num_tasks: int, tx: optax.GradientTransformation
) -> tuple[Callable, Callable]:
    """``(init, step(params, state, x, y) -> (params, state, losses))`` of one step of the
    representation-gradient path: ``fn`` is :func:`mtl_jax.representation_value_and_grad` of the
    trunk and the heads (its weighting's state is threaded), ``tx`` updates all parameters."""

    def init(params):
        return tx.init(params), fn.weighting.init(num_tasks)

    def step(params, state, x, y):
        tx_state, weighting_state = state
        res = fn(params["trunk"], params["heads"], x, y, weighting_state)
        grads = {"trunk": res.encoder_grads, "heads": res.head_grads}
        updates, tx_state = tx.update(grads, tx_state, params)
        return optax.apply_updates(params, updates), (tx_state, res.state), res.losses

    return init, step
