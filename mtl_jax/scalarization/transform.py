"""A loss-only method as an aggregator of a task Jacobian (an optax transform).

:func:`from_scalarizer` computes ``sum_k w_k g_k`` with the weights of ``scalarize(task_losses)``:
the gradient of the scalarized loss, from a Jacobian a train loop has anyway (e.g. to measure
conflicts). Its state is an ``AggregatorState`` whose ``inner`` is ``{SCALARIZER_STATE_KEY:
scalarizer state}``; :func:`post_step_in_state` finds that state inside an optax chain's state
with ``optax.tree_utils`` (FAMO's post-step). See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from optax.tree_utils import NamedTupleKey

from mtl_jax.aggregation import AggregatorState, from_weights_fn
from mtl_jax.aggregation.gramspace import WeighFirst, weigh_first

from .base import PyTree, Scalarizer
from .gradnorm import layer_grad_norms

__all__ = ["SCALARIZER_STATE_KEY", "from_scalarizer", "post_step_in_state", "scalarizer_weigh"]

SCALARIZER_STATE_KEY = "scalarizer"


def from_scalarizer(
    scalarizer: Scalarizer,
    *,
    num_tasks: int,
    grad_norm_layer: str | Callable[[str], bool] | None = None,
    name: str = "scalarizer",
) -> Any:
    """A loss-only method as an aggregator of a task Jacobian: ``sum_k w_k g_k`` with the weights
    of ``scalarizer.scalarize(task_losses, ...)``.

    Since ``d loss / d theta = sum_k w_k d L_k / d theta`` (the weights are constants of the
    backward pass), this is the gradient of the scalarized loss, computed from a Jacobian that a
    train loop has anyway (e.g. to measure conflicts with the same Gram matrices). Without that
    need, one backward pass of the scalarized loss is cheaper (``docs/methods.md``'s train step).

    Args:
      scalarizer: e.g. ``get_scalarizer("uw")``.
      num_tasks: K (every scalarizer's state needs it).
      grad_norm_layer: for GradNorm, the shared layer whose task-gradient norms it balances
        (:func:`~mtl_jax.scalarization.layer_grad_norms` of the Jacobian).
      name: the method's name in error messages.

    ``update(jac, state, params, task_losses=...)`` requires ``task_losses``. Heads: scale each
    head's own gradient by its task's weight (``mtl.aggregation.weights(state)``) to match the gradient of
    the scalarized loss. FAMO: call :func:`post_step_in_state` after the optimizer step.
    """

    return from_weights_fn(
        _weights_fn(scalarizer, grad_norm_layer, name),
        lambda: scalarizer.init(num_tasks),
        num_tasks=num_tasks,
        inner_key=SCALARIZER_STATE_KEY,
        name=name,
    )


def _weights_fn(
    scalarizer: Scalarizer, grad_norm_layer: str | Callable[[str], bool] | None, name: str
) -> Callable:
    def weights_fn(jac, gram, inner, key, task_losses, extra_args):
        del gram, key, extra_args
        if task_losses is None:
            raise ValueError(f"{name} (a loss-only method) needs task_losses=... in update.")
        norms = None if grad_norm_layer is None else layer_grad_norms(jac, grad_norm_layer)
        _, weights, inner = scalarizer.scalarize(task_losses, inner, grad_norms=norms)
        return weights, inner

    return weights_fn


def scalarizer_weigh(scalarizer: Scalarizer, *, name: str = "scalarizer") -> WeighFirst:
    """``weigh(state, task_losses) -> (w, state)``: the weights of :func:`from_scalarizer`'s
    aggregator (``state`` is its state) before the backward pass, for a loop that then runs ONE
    backward of ``sum_k w_k L_k`` (:func:`mtl_jax.aggregation.weigh_first`). Not for GradNorm,
    whose weights need the task-gradient norms of a layer."""
    return weigh_first(
        _weights_fn(scalarizer, None, name), inner_key=SCALARIZER_STATE_KEY, name=name
    )


_INNER = NamedTupleKey(AggregatorState.__name__, "inner")


def _is_scalarizer_state(path: tuple, value: Any) -> bool:
    """``optax.tree_utils`` filter: the entry sits in the ``inner`` field of an AggregatorState."""
    del value
    return len(path) >= 2 and path[-2] == _INNER


def post_step_in_state(opt_state: PyTree, scalarizer: Scalarizer, new_losses: jax.Array) -> PyTree:
    """Applies ``scalarizer.post_step`` to the state of every :func:`from_scalarizer` aggregator
    inside an optax state (FAMO: the losses recomputed after the step).

    Each such state is ``AggregatorState.inner[SCALARIZER_STATE_KEY]``, found and replaced with
    ``optax.tree_utils.tree_get_all_with_path`` / ``tree_set``; an optax state without one is
    returned unchanged.
    """
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, SCALARIZER_STATE_KEY, _is_scalarizer_state
    )
    for path, inner in found:
        opt_state = optax.tree_utils.tree_set(
            opt_state,
            lambda p, _, path=path: p == path,
            **{SCALARIZER_STATE_KEY: scalarizer.post_step(inner, new_losses)},
        )
    return opt_state
