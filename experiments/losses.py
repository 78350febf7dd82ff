"""Task losses: one scalar per task, jit-able, finite on batches without a valid pixel.

Definitions (MTAN ``im2im_pred/utils.py::model_fit``, which Nash-MTL, CAGrad and LibMTL copy):

* classification: mean softmax cross-entropy over the batch (``logits [B, C]``, ``target [B]``);
* segmentation: cross-entropy averaged over the pixels whose label is not ignored
  (``target [B, H, W]``; ``-1`` = ignore, MTAN's ``ignore_index=-1``; any negative label is
  ignored here);
* depth: L1 averaged over the pixels with ``depth != 0`` (MTAN's mask; ``[B, H, W, 1]``);
* normals: ``1 - cos(pred, target)`` averaged over the pixels whose target is not all-zero
  (``[B, H, W, 3]``; the prediction is the head's unit normal, the target a unit normal).

Departures: with no valid pixel in the batch the dense losses are 0 with a zero gradient (PyTorch's
``nll_loss`` and MTAN's ``sum / count`` give NaN); MTAN masks normals with ``sum(target) != 0``,
here a pixel is valid when any component is non-zero (the same except for a unit normal whose
components sum to exactly 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from experiments.models.base import MultiTaskModel
from experiments.tasks import TaskSpec

__all__ = ["depth_l1", "head_loss_fns", "masked_cross_entropy", "normal_cosine", "task_loss"]

PyTree = Any


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(values * mask) / max(sum(mask), 1)``: 0 (and a zero gradient) when nothing is valid."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check(
    task: TaskSpec, prediction: jax.Array, target: jax.Array, pred_nd: int, tgt_shape: tuple
) -> None:
    if prediction.ndim != pred_nd or tuple(target.shape) != tgt_shape:
        raise ValueError(
            f"Task {task.name!r} ({task.kind}): prediction {tuple(prediction.shape)} and target "
            f"{tuple(target.shape)} do not match; expected a {pred_nd}-d prediction and a target of "
            f"shape {tgt_shape}."
        )


def masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the entries with ``labels >= 0``.

    ``logits: [..., C]``, ``labels: [...]`` int (negative = ignore). 0 when every label is ignored.
    """
    valid = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(valid, labels, 0)
    )
    return _masked_mean(ce, valid)


def depth_l1(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean ``|prediction - target|`` over the pixels with ``target != 0``; ``[B, H, W, 1]`` each."""
    valid = target != 0
    return _masked_mean(jnp.abs(prediction.astype(jnp.float32) - target), valid)


def normal_cosine(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean ``1 - <prediction, target>`` over the pixels whose target is not all-zero; ``[B, H, W, 3]``.

    ``prediction`` is expected unit-norm per pixel (the normals head normalises, as MTAN's does),
    so the dot product is the cosine similarity.
    """
    valid = jnp.any(target != 0, axis=-1)
    dot = jnp.sum(prediction.astype(jnp.float32) * target, axis=-1)
    return _masked_mean(1.0 - dot, valid)


def task_loss(task: TaskSpec, prediction: jax.Array, target: jax.Array) -> jax.Array:
    """The scalar loss of ``task`` (see the module docstring for the definitions and shapes).

    Raises:
      ValueError: prediction and target shapes that do not fit the task kind (checked at trace
        time, so it is jit-safe).
    """
    prediction, target = jnp.asarray(prediction), jnp.asarray(target)
    if task.kind == "classification":
        _check(task, prediction, target, 2, prediction.shape[:1])
        return masked_cross_entropy(prediction, target)
    if task.kind == "segmentation":
        _check(task, prediction, target, 4, prediction.shape[:3])
        return masked_cross_entropy(prediction, target)
    if task.kind == "depth":
        _check(task, prediction, target, 4, (*prediction.shape[:3], 1))
        return depth_l1(prediction, target)
    if task.kind == "normals":
        _check(task, prediction, target, 4, (*prediction.shape[:3], 3))
        return normal_cosine(prediction, target)
    raise ValueError(f"Unknown task kind {task.kind!r} for task {task.name!r}.")


def head_loss_fns(
    model: MultiTaskModel, head_state: Mapping[str, PyTree], train: bool
) -> dict[str, Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree]]]:
    """``{task: (head_params, z, target) -> (loss, new_head_state)}`` in task order.

    With :meth:`MultiTaskModel.encoder_fn` this is the heads of a ``mtl.TrunkAndHeads``
    (``has_aux=True``)::

        params, state = model.split(variables)
        fn = mtl.value_and_grads(
            mtl.TrunkAndHeads(
                model.encoder_fn(state["encoder"], train=True),
                head_loss_fns(model, state["heads"], train=True),
            ),
            has_aux=True,
        )
        (losses, aux), grads = fn(
            {"trunk": params["encoder"], "heads": params["heads"]}, x, targets)
        # grads["trunk"]: rows [K, ...]; aux["trunk"], aux["heads"]: the new states
    """
    tasks: Sequence[TaskSpec] = model.tasks
    fns = {}
    for task in tasks:
        head = model.head_fn(task.name, head_state[task.name], train)

        def loss_fn(params: PyTree, z: PyTree, target: jax.Array, task=task, head=head):
            prediction, new_state = head(params, z)
            return task_loss(task, prediction, target), new_state

        fns[task.name] = loss_fn
    return fns
