"""Task losses against hand-computed values, masks, empty batches (finite, zero gradient), jit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.losses import task_loss
from experiments.tasks import TaskSpec

CLS = TaskSpec("digit", "classification", 3)
SEG = TaskSpec("seg", "segmentation", 3)
DEPTH = TaskSpec("depth", "depth")
NORMALS = TaskSpec("normals", "normals")


def _ce(logits, label):
    logits = np.asarray(logits, np.float64)
    return np.log(np.sum(np.exp(logits))) - logits[label]


def test_classification_is_mean_softmax_cross_entropy():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
    labels = np.array([0, 1])
    expected = (_ce(logits[0], 0) + _ce(logits[1], 1)) / 2
    np.testing.assert_allclose(task_loss(CLS, logits, labels), expected, rtol=1e-6)
    # equal logits: log(3)
    np.testing.assert_allclose(
        task_loss(CLS, np.zeros((4, 3)), np.arange(4) % 3), np.log(3.0), rtol=1e-6
    )


def test_segmentation_ignores_minus_one():
    logits = np.random.default_rng(0).normal(size=(1, 2, 2, 3)).astype(np.float32)
    labels = np.array([[[0, -1], [2, -1]]])
    expected = (_ce(logits[0, 0, 0], 0) + _ce(logits[0, 1, 0], 2)) / 2  # two valid pixels
    np.testing.assert_allclose(task_loss(SEG, logits, labels), expected, rtol=1e-5)


def test_depth_is_l1_over_pixels_with_depth():
    pred = np.array([1.0, 2.0, 5.0, 7.0], np.float32).reshape(1, 2, 2, 1)
    target = np.array([1.5, 0.0, 3.0, 0.0], np.float32).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(task_loss(DEPTH, pred, target), (0.5 + 2.0) / 2, rtol=1e-6)


def test_normals_is_one_minus_cosine_over_valid_pixels():
    s = np.sqrt(0.5)
    pred = np.array([[1, 0, 0], [1, 0, 0], [s, s, 0], [0, 0, 1]], np.float32).reshape(1, 2, 2, 3)
    target = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32).reshape(1, 2, 2, 3)
    # pixels: cos 1, 0, sqrt(1/2); the last has no normal
    expected = ((1 - 1) + (1 - 0) + (1 - s)) / 3
    np.testing.assert_allclose(task_loss(NORMALS, pred, target), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("task", "pred_shape", "target"),
    [
        (SEG, (2, 2, 2, 3), -np.ones((2, 2, 2), np.int32)),
        (DEPTH, (2, 2, 2, 1), np.zeros((2, 2, 2, 1), np.float32)),
        (NORMALS, (2, 2, 2, 3), np.zeros((2, 2, 2, 3), np.float32)),
    ],
)
def test_no_valid_pixel_gives_zero_loss_and_zero_gradient(task, pred_shape, target):
    pred = jnp.ones(pred_shape, jnp.float32) / np.sqrt(pred_shape[-1])
    value, grad = jax.value_and_grad(lambda p: task_loss(task, p, target))(pred)
    assert float(value) == 0.0
    assert bool(jnp.all(grad == 0))


@pytest.mark.parametrize(
    ("task", "pred", "target"),
    [
        (CLS, np.zeros((2, 3), np.float32), np.array([0, 2])),
        (SEG, np.zeros((1, 2, 2, 3), np.float32), np.array([[[0, 1], [-1, 2]]])),
        (DEPTH, np.ones((1, 2, 2, 1), np.float32), np.full((1, 2, 2, 1), 2.0, np.float32)),
        (NORMALS, np.ones((1, 2, 2, 3), np.float32), np.ones((1, 2, 2, 3), np.float32)),
    ],
)
def test_jit_matches_eager(task, pred, target):
    jitted = jax.jit(functools.partial(task_loss, task))
    np.testing.assert_allclose(jitted(pred, target), task_loss(task, pred, target), rtol=1e-6)


@pytest.mark.parametrize(
    ("task", "pred_shape", "target_shape"),
    [
        (CLS, (2, 3), (3,)),
        (CLS, (2, 2, 3), (2, 2)),
        (SEG, (1, 2, 2, 3), (1, 2, 3)),
        (DEPTH, (1, 2, 2, 1), (1, 2, 2)),
        (NORMALS, (1, 2, 2, 3), (1, 2, 2, 1)),
    ],
)
def test_shape_mismatch_is_a_clear_error(task, pred_shape, target_shape):
    with pytest.raises(ValueError, match=f"Task '{task.name}' \\({task.kind}\\)"):
        task_loss(task, np.zeros(pred_shape, np.float32), np.zeros(target_shape, np.int32))
