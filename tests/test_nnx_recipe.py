"""mtl_jax.nnx: task-specific labels for NNX states, and one NNX step checked against NumPy.

The step is the documented recipe (docs/custom_loop.md): ``mtl.value_and_grads`` on the
``nnx.Param`` state, ``nnx.Optimizer(model, optax.chain(mtl.shared_rows(...), tx), wrt=nnx.Param)``
with ``task_losses`` passed through ``optimizer.update``, and the ``nnx.BatchStat`` state from
the forward pass. The references below are hand-written NumPy gradients and BatchNorm averages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_jax as mtl
from mtl_jax.nnx import leaf_path, task_specific_paths, task_specific_types

K = 2


class HeadParam(nnx.Param):
    """A task-specific parameter type (still an nnx.Param: the optimizer trains it)."""


class Head(nnx.Module):
    def __init__(self, din: int, rngs: nnx.Rngs):
        key = rngs.params()
        self.w = HeadParam(0.5 * jax.random.normal(key, (din, 1)))
        self.c = HeadParam(jnp.zeros((1,)))

    def __call__(self, z):
        return z @ self.w[...] + self.c[...]


class Net(nnx.Module):
    """trunk (Linear) -> [BatchNorm] -> tanh -> K heads; outputs [K, batch, 1]."""

    def __init__(self, rngs: nnx.Rngs, batchnorm: bool):
        self.trunk = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.8, rngs=rngs) if batchnorm else None
        self.heads = nnx.List([Head(4, rngs) for _ in range(K)])

    def __call__(self, x):
        a = self.trunk(x)
        if self.bn is not None:
            a = self.bn(a)
        z = jnp.tanh(a)
        return jnp.stack([h(z) for h in self.heads])


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=(16, 3)).astype(np.float32)
    y = rng.normal(size=(K, 16, 1)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _recipe(model, is_head, tx_after):
    graphdef = nnx.split(model, nnx.Param, ...)[0]

    def losses_fn(params, rest, x, y):
        m = nnx.merge(graphdef, params, rest, copy=True)
        return jnp.mean((m(x) - y) ** 2, axis=(1, 2)), nnx.state(m, nnx.BatchStat)

    grad_fn = mtl.value_and_grads(losses_fn, is_head, has_aux=True)
    tx = optax.chain(mtl.shared_rows(mtl.aggregation.mean(), is_head), tx_after)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        _, params, rest = nnx.split(model, nnx.Param, ...)
        (losses, stats), grads = grad_fn(params, rest, x, y)
        optimizer.update(model, grads, task_losses=losses)
        nnx.update(model, stats)
        return losses, grads

    return optimizer, step


# ---------------------------------------------------------------------------------------------
# labels


def test_leaf_path_drops_nnx_value_suffix_only():
    state = nnx.state(Net(nnx.Rngs(0), batchnorm=True), nnx.Param)
    paths = [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    pure = [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.as_pure(state))[0]]
    assert paths == pure
    assert "heads/0/w" in paths and "trunk/kernel" in paths
    assert leaf_path((jax.tree_util.DictKey("value"),)) == "value"  # a top-level name is kept


@pytest.mark.parametrize("make", ["paths", "types"])
def test_labels_fit_the_state_and_the_pure_arrays(make):
    model = Net(nnx.Rngs(0), batchnorm=True)
    labels = (
        task_specific_paths("^heads/") if make == "paths" else task_specific_types(model, HeadParam)
    )
    state = nnx.state(model, nnx.Param)
    for tree in (state, nnx.as_pure(state)):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        marks = jax.tree.leaves(mtl.sharing.task_specific_leaves(labels, tree))
        expected = [leaf_path(p).startswith("heads/") for p, _ in flat]
        assert marks == expected and sum(expected) == 2 * K


def test_labels_work_on_linen_variables():
    params = {"Dense_0": {"kernel": jnp.ones((3, 4))}, "head_0": {"kernel": jnp.ones((4, 1))}}
    labels = task_specific_paths("^head_")(params)
    assert labels == {"Dense_0": {"kernel": False}, "head_0": {"kernel": True}}


def test_bad_labels_are_clear_errors():
    model = Net(nnx.Rngs(0), batchnorm=False)
    state = nnx.state(model, nnx.Param)
    with pytest.raises(ValueError, match="at least one path pattern"):
        task_specific_paths()
    with pytest.raises(ValueError, match=r"no leaf matches .*Leaf paths: \[heads/0/c"):
        task_specific_paths("^head_")(state)
    with pytest.raises(ValueError, match="at least one nnx.Variable type"):
        task_specific_types(model)
    with pytest.raises(ValueError, match="not nnx.Variable subclasses"):
        task_specific_types(model, int)
    with pytest.raises(ValueError, match=r"no variable has type \['BatchStat'\]"):
        task_specific_types(model, nnx.BatchStat)


# ---------------------------------------------------------------------------------------------
# one step of the recipe against NumPy


def _numpy_grads(w, b, heads, x, y):
    """Per-task gradients of L_k = mean((tanh(x W + b) v_k + c_k - y_k)^2) by hand."""
    z = np.tanh(x @ w + b)
    rows_w, rows_b, head_grads = [], [], []
    for k, (v, c) in enumerate(heads):
        dpred = 2.0 * (z @ v + c - y[k]) / x.shape[0]  # [B, 1]
        da = (dpred @ v.T) * (1.0 - z**2)
        rows_w.append(x.T @ da)
        rows_b.append(da.sum(axis=0))
        head_grads.append((z.T @ dpred, dpred.sum(axis=0)))
    return np.stack(rows_w), np.stack(rows_b), head_grads


@pytest.mark.parametrize("make", ["paths", "types"])
def test_one_nnx_optimizer_step_matches_numpy(make):
    model = Net(nnx.Rngs(1), batchnorm=False)
    labels = (
        task_specific_paths("^heads/") if make == "paths" else task_specific_types(model, HeadParam)
    )
    x, y = _data()
    w0, b0 = np.asarray(model.trunk.kernel[...]), np.asarray(model.trunk.bias[...])
    heads0 = [(np.asarray(h.w[...]), np.asarray(h.c[...])) for h in model.heads]
    lr = 0.1
    optimizer, step = _recipe(model, labels, optax.sgd(lr))
    _, grads = step(model, optimizer, x, y)

    rows_w, rows_b, head_grads = _numpy_grads(w0, b0, heads0, np.asarray(x), np.asarray(y))
    # the gradient tree: shared rows [K, ...], heads their own task's gradient, no task axis
    np.testing.assert_allclose(grads["trunk"]["kernel"][...], rows_w, rtol=1e-4, atol=1e-6)
    for k in range(K):
        assert grads["heads"][k]["w"][...].shape == heads0[k][0].shape
        np.testing.assert_allclose(
            grads["heads"][k]["w"][...], head_grads[k][0], rtol=1e-4, atol=1e-6
        )
    # mean of the rows for the trunk, the own gradient for the heads, then SGD
    np.testing.assert_allclose(
        model.trunk.kernel[...], w0 - lr * rows_w.mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        model.trunk.bias[...], b0 - lr * rows_b.mean(0), rtol=1e-5, atol=1e-6
    )
    for k, h in enumerate(model.heads):
        np.testing.assert_allclose(
            h.w[...], heads0[k][0] - lr * head_grads[k][0], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            h.c[...], heads0[k][1] - lr * head_grads[k][1], rtol=1e-5, atol=1e-6
        )
    assert int(optimizer.step[...]) == 1


def test_batch_stats_follow_the_forward_pass_and_stay_out_of_the_optimizer():
    model = Net(nnx.Rngs(2), batchnorm=True)
    x, y = _data(seed=3)
    optimizer, step = _recipe(model, task_specific_paths("^heads/"), optax.adam(1e-2))
    mean, var = np.zeros(4), np.ones(4)
    for _ in range(3):
        a = np.asarray(x) @ np.asarray(model.trunk.kernel[...]) + np.asarray(model.trunk.bias[...])
        step(model, optimizer, x, y)
        # running averages from this step's batch (biased variance), momentum 0.8
        mean = 0.8 * mean + 0.2 * a.mean(axis=0)
        var = 0.8 * var + 0.2 * a.var(axis=0)
        np.testing.assert_allclose(model.bn.mean[...], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(model.bn.var[...], var, rtol=1e-4, atol=1e-5)
    opt_paths = [
        leaf_path(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(nnx.as_pure(optimizer.opt_state))[0]
    ]
    assert not any(p.endswith("bn/mean") or p.endswith("bn/var") for p in opt_paths)
    assert any(p.endswith("bn/scale") for p in opt_paths)  # BatchNorm's Params are trained
