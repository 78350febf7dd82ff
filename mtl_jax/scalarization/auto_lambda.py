"""Auto-Lambda (Liu, Johns & Davison, "Auto-Lambda: Disentangling Dynamic Task Relationships",
TMLR 2022): task weights learned by a one-step look-ahead on a validation batch.

The weights ``lambda [K]`` minimise the validation loss of the primary tasks after one virtual
SGD step of the weighted training loss (eq. 3),
``theta' = theta - alpha sum_k lambda_k grad L_k(theta; train)``, and the model then trains on
``sum_k lambda_k L_k``. Since ``d theta' / d lambda_k = -alpha grad L_k(theta; train)``, the
hypergradient is exactly (no Hessian of the model)

    ``d L_val(theta') / d lambda_k = -alpha grad L_k(theta; train) . grad L_val(theta')``,

which :func:`auto_lambda_grad` computes with one linearisation of the training losses (a forward
pass whose VJP gives the virtual step and whose JVP along ``grad L_val(theta')`` gives all K dot
products) and one forward/backward pass on the validation batch. The weights then take one Adam
step (:func:`auto_lambda_step`, ``meta_lr = 1e-4``), starting at ``weight_init = 0.1`` (the
official code's defaults). Order as the official training loop: the meta step first, then the
model's step with the new weights.

Two ways to use it. **A custom loop** with a scalarized backward calls
:func:`auto_lambda_update` (hypergradient + meta step, pure) and trains on
``sum_k state.weights[k] L_k``. **The catalogue** (``mtl.get_method("auto_lambda", ...)``, cost
``loss``): the optax transform :func:`auto_lambda` keeps ``lambda`` and Adam's state in its
state and takes the hypergradient as the ``update`` input ``lambda_grad=``; the loop computes it
with :func:`auto_lambda_grad` at the current weights (:func:`auto_lambda_weights` reads them from
the optimizer state) and its own learning rate as ``alpha``.

Departures from the official code (``lorenmt/auto-lambda``, ``auto_lambda.py``): the mixed
derivative is exact (a JVP), where the official code takes a central finite difference with
``eps = 0.01 / |grad L_val(theta')|`` (two more forward/backward passes); the virtual step is
plain SGD with ``lookahead_lr`` (the official one adds the SGD optimiser's momentum buffer and
weight decay when the model trains with SGD); ``lambda`` is not constrained. ``primary`` lists
the primary tasks (default: all, the multi-task setting). Non-finite hypergradients leave the
state unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.aggregation import from_weights_fn
from mtl_jax.aggregation.gramspace import WeighFirst, weigh_first

from .base import check_num_tasks, float_dtype

__all__ = [
    "LAMBDA_GRAD",
    "AutoLambdaState",
    "auto_lambda",
    "auto_lambda_grad",
    "auto_lambda_init",
    "auto_lambda_step",
    "auto_lambda_update",
    "auto_lambda_weigh",
    "auto_lambda_weights",
]

PyTree = Any
#: ``loss_fn(params, *batch) -> losses [K]``.
LossFn = Callable[..., jax.Array]
#: The keyword input of the catalogue transform's ``update``: the hypergradient ``[K]``.
LAMBDA_GRAD = "lambda_grad"


class AutoLambdaState(NamedTuple):
    """State of Auto-Lambda.

    Attributes:
      weights: ``[K]`` the task weights ``lambda``.
      meta_state: the state of the meta optimiser (Adam) of ``lambda``.
    """

    weights: jax.Array
    meta_state: PyTree


def _meta_optimizer(meta_lr: float) -> optax.GradientTransformation:
    return optax.adam(meta_lr)


def auto_lambda_init(num_tasks: int, weight_init: float = 0.1) -> AutoLambdaState:
    """``lambda = weight_init`` for every task and a fresh Adam state."""
    k = check_num_tasks(num_tasks, "auto_lambda")
    weights = jnp.full((k,), weight_init, float_dtype())
    return AutoLambdaState(weights, _meta_optimizer(1.0).init(weights))


def _primary_mask(primary: Sequence[int] | None, k: int, dtype: Any) -> jax.Array:
    if primary is None:
        return jnp.ones((k,), dtype)
    index = np.asarray(list(primary), dtype=int)
    if index.size == 0 or index.min() < 0 or index.max() >= k or len(set(index)) != index.size:
        raise ValueError(
            f"auto_lambda: primary must list distinct task indices in [0, {k}); got "
            f"{list(primary)}."
        )
    return jnp.zeros((k,), dtype).at[index].set(1.0)


def _check_losses(losses: jax.Array, k: int, where: str) -> None:
    if jnp.shape(losses) != (k,):
        raise ValueError(
            f"auto_lambda: loss_fn must return the K = {k} task losses (one per weight) on the "
            f"{where} batch; got shape {jnp.shape(losses)}."
        )


def auto_lambda_grad(
    loss_fn: LossFn,
    params: PyTree,
    weights: jax.Array,
    train_batch: Sequence[Any],
    val_batch: Sequence[Any],
    *,
    lookahead_lr: float,
    primary: Sequence[int] | None = None,
) -> jax.Array:
    """``d L_val(theta') / d lambda [K]``, ``theta' = theta - lookahead_lr sum_k lambda_k grad
    L_k(theta; train)``, exact (module docstring).

    Args:
      loss_fn: ``loss_fn(params, *batch) -> losses [K]`` (the shared and task-specific
        parameters together).
      params: ``theta``.
      weights: ``lambda [K]``.
      train_batch, val_batch: the arguments after ``params`` (tuples).
      lookahead_lr: ``alpha``, the virtual step's learning rate (the model's learning rate).
      primary: the task indices whose validation losses are summed (default: all).
    """
    weights = jnp.asarray(weights)
    k = weights.shape[0]
    if lookahead_lr < 0:
        raise ValueError(f"auto_lambda: lookahead_lr must be >= 0; got {lookahead_lr}.")
    train = lambda p: loss_fn(p, *train_batch)
    losses, jvp = jax.linearize(train, params)  # one forward; jvp: tangent -> [K]
    _check_losses(losses, k, "training")
    (virtual_grad,) = jax.linear_transpose(jvp, params)(weights.astype(losses.dtype))
    lookahead = jax.tree.map(lambda p, g: p - lookahead_lr * g, params, virtual_grad)
    mask = _primary_mask(primary, k, losses.dtype)

    def val_objective(p: PyTree) -> jax.Array:
        val_losses = loss_fn(p, *val_batch)
        _check_losses(val_losses, k, "validation")
        return jnp.sum(mask * val_losses)

    direction = jax.grad(val_objective)(lookahead)
    return (-lookahead_lr * jvp(direction)).astype(weights.dtype)


def auto_lambda_step(
    state: AutoLambdaState, lambda_grad: jax.Array, meta_lr: float = 1e-4
) -> AutoLambdaState:
    """One Adam step of ``lambda`` on the hypergradient; a non-finite one keeps the state."""
    lambda_grad = jnp.asarray(lambda_grad)
    if jnp.shape(lambda_grad) != jnp.shape(state.weights):
        raise ValueError(
            f"auto_lambda: lambda_grad has shape {jnp.shape(lambda_grad)}; expected "
            f"{jnp.shape(state.weights)} (one entry per task weight)."
        )
    grad = lambda_grad.astype(state.weights.dtype)
    updates, meta_state = _meta_optimizer(meta_lr).update(grad, state.meta_state, state.weights)
    new = AutoLambdaState(optax.apply_updates(state.weights, updates), meta_state)
    finite = jnp.all(jnp.isfinite(grad))
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype), new, state)


def auto_lambda_update(
    loss_fn: LossFn,
    params: PyTree,
    state: AutoLambdaState,
    train_batch: Sequence[Any],
    val_batch: Sequence[Any],
    *,
    lookahead_lr: float,
    meta_lr: float = 1e-4,
    primary: Sequence[int] | None = None,
) -> AutoLambdaState:
    """The bilevel step, pure: the hypergradient at ``state.weights``, then one Adam step.
    The loop then trains on ``sum_k state.weights[k] L_k``."""
    grad = auto_lambda_grad(
        loss_fn,
        params,
        state.weights,
        train_batch,
        val_batch,
        lookahead_lr=lookahead_lr,
        primary=primary,
    )
    return auto_lambda_step(state, grad, meta_lr)


def auto_lambda(
    meta_lr: float = 1e-4, weight_init: float = 0.1, *, num_tasks: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """Auto-Lambda as the catalogue's optax transform: ``update(jac, state, params,
    task_losses=..., lambda_grad=h)`` takes the meta step on ``lambda`` with ``h`` (from
    :func:`auto_lambda_grad`), then returns ``sum_k lambda_k g_k`` with the new weights (the
    gradient of the weighted loss; heads scale by ``lambda_k``). Needs ``num_tasks``.
    """
    if meta_lr < 0:
        raise ValueError(f"auto_lambda's meta_lr must be >= 0; got {meta_lr}.")
    if num_tasks is None:
        raise ValueError(
            "auto_lambda keeps per-task state (the weights and their Adam state), so it needs "
            "the number of tasks at init: pass num_tasks=K."
        )

    return from_weights_fn(
        _weights_fn(meta_lr),
        lambda: auto_lambda_init(num_tasks, weight_init),
        num_tasks=num_tasks,
        name="auto_lambda",
    )


def _weights_fn(meta_lr: float) -> Callable:
    """The transform's step (``from_weights_fn``'s ``weights_fn``): the meta step on the
    ``lambda_grad`` input, the new weights. It never reads the Jacobian."""

    def weights_fn(jac, gram, inner, key, task_losses, extra_args):
        del jac, gram, key, task_losses
        unknown = sorted(set(extra_args) - {LAMBDA_GRAD})
        if unknown:
            raise ValueError(
                f"auto_lambda.update got unknown keyword input(s) {unknown}; it takes "
                f"task_losses= and {LAMBDA_GRAD}=."
            )
        if extra_args.get(LAMBDA_GRAD) is None:
            raise ValueError(
                "auto_lambda reads the hypergradient: pass lambda_grad="
                "mtl.scalarization.auto_lambda_grad(loss_fn, params, weights, train_batch, "
                "val_batch, lookahead_lr=lr) to its update, with weights = "
                "mtl.scalarization.auto_lambda_weights(opt_state)."
            )
        new = auto_lambda_step(inner, extra_args[LAMBDA_GRAD], meta_lr)
        return new.weights, new

    return weights_fn


def auto_lambda_weigh(meta_lr: float = 1e-4) -> WeighFirst:
    """``weigh(state, task_losses, lambda_grad=h) -> (w, state)``: :func:`auto_lambda`'s
    weights before the backward pass (its ``state`` is the transform's), for a loop that then
    runs ONE backward of ``sum_k w_k L_k`` (:func:`mtl_jax.aggregation.weigh_first`)."""
    return weigh_first(_weights_fn(meta_lr), name="auto_lambda")


def auto_lambda_weights(opt_state: PyTree) -> jax.Array:
    """The current ``lambda [K]`` held by the :func:`auto_lambda` transform inside an optax
    state (the weights the next hypergradient is taken at)."""
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AutoLambdaState))
        if isinstance(x, AutoLambdaState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"auto_lambda_weights: the optimizer state holds {len(found)} Auto-Lambda states; "
            "expected one (the state of an optax chain with mtl.get_method('auto_lambda')'s "
            "transform)."
        )
    return found[0].weights
