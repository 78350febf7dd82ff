"""Precise BN (mtl_jax.batchnorm) and per-task BatchNorm statistics through per_task.

References: NumPy per-channel mean / biased variance of a BatchNorm's input over the batches
(the BN sits directly on the input, so its input is known); K separate single-task models
(plain ``model.apply`` with each task's view of the parameters and its own row of statistics).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_jax as mtl
from mtl_jax.batchnorm import recompute_statistics

K, B, D, H = 2, 16, 4, 8


def _batches(n=5, seed=0):
    """Batches whose means and scales differ, so batch statistics differ from batch to batch."""
    rng = np.random.default_rng(seed)
    return [
        jnp.asarray(rng.normal(loc=2.0 * i - 3.0, scale=0.5 + i, size=(B, D)), jnp.float32)
        for i in range(n)
    ]


def _numpy_stats(batches):
    """Precise BN's definition: mean of the batch means, mean of the biased batch variances."""
    xs = [np.asarray(x, np.float64) for x in batches]
    return np.mean([x.mean(0) for x in xs], 0), np.mean([x.var(0) for x in xs], 0)


class InputBN(nn.Module):
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name="bn_in")(x)
        x = nn.Dense(H, name="dense")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name="bn")(x)


def _linen_update(model, params):
    def update(stats, x):
        new = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )[1]
        return new["batch_stats"]

    return update


@pytest.mark.parametrize("momentum", [0.9, 0.99, 0.0])
def test_linen_recompute_equals_numpy_statistics_of_the_input(momentum):
    model, batches = InputBN(momentum), _batches()
    variables = model.init(jax.random.PRNGKey(0), batches[0])
    stats = jax.tree.map(lambda v: v + 7.0, variables["batch_stats"])  # stale values: ignored
    out = recompute_statistics(_linen_update(model, variables["params"]), stats, batches)
    mean, var = _numpy_stats(batches)
    np.testing.assert_allclose(out["bn_in"]["mean"], mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["bn_in"]["var"], var, rtol=1e-4, atol=1e-4)
    # the second BN: its input is Dense(normalised x) with each batch's own statistics
    p = variables["params"]
    hs = []
    for x in batches:
        x = np.asarray(x, np.float64)
        z = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * p["bn_in"]["scale"] + p["bn_in"]["bias"]
        hs.append(z @ np.asarray(p["dense"]["kernel"]) + np.asarray(p["dense"]["bias"]))
    mean, var = _numpy_stats(hs)
    np.testing.assert_allclose(out["bn"]["mean"], mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["bn"]["var"], var, rtol=1e-4, atol=1e-4)


def test_jit_and_no_jit_agree_and_a_filter_keeps_other_leaves():
    model, batches = InputBN(), _batches()
    variables = model.init(jax.random.PRNGKey(0), batches[0])
    update = _linen_update(model, variables["params"])
    stats = variables["batch_stats"]
    eager = recompute_statistics(update, stats, batches)
    jitted = recompute_statistics(jax.jit(update), stats, iter(batches))  # any iterable
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), eager, jitted)
    only = recompute_statistics(update, stats, batches, state_filter="^bn_in/")
    np.testing.assert_array_equal(only["bn"]["mean"], stats["bn"]["mean"])
    np.testing.assert_allclose(only["bn_in"]["var"], eager["bn_in"]["var"], rtol=1e-6)


def test_errors_name_the_problem():
    model, batches = InputBN(), _batches()
    variables = model.init(jax.random.PRNGKey(0), batches[0])
    update = _linen_update(model, variables["params"])
    stats = variables["batch_stats"]
    frozen = lambda s, x: s  # e.g. an evaluation-mode forward: r' = r
    with pytest.raises(ValueError, match=r"does not update the state leaf 'bn/mean'.*train"):
        recompute_statistics(frozen, stats, batches)
    growing = lambda s, x: jax.tree.map(lambda r: 2.0 * r + 1.0, s)  # m = 2: not an EMA
    with pytest.raises(ValueError, match=r"not an exponential moving average.*m in \[2"):
        recompute_statistics(growing, stats, batches)
    with pytest.raises(ValueError, match="batches is empty"):
        recompute_statistics(update, stats, [])
    with pytest.raises(ValueError, match="selects no floating-point leaf"):
        recompute_statistics(update, stats, batches, state_filter="^nothing/")


# ---------------------------------------------------------------------------------------------
# Per-task statistics of a branched model: evaluation equals K single-task models


class Branched(nn.Module):
    """``branch`` (copied per task) -> shared-parameter ``bn`` -> ``out``."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(H, name="branch")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8, name="bn")(x)
        return nn.Dense(1, name="out")(nn.relu(x))


def _train_branched(spec_for, state_reduction, steps=6):
    """A few SGD steps of the two-task model; returns the per_task variables and spec."""
    model, batches = Branched(), _batches(n=4, seed=1)
    variables = model.init(jax.random.PRNGKey(0), batches[0])
    branched, spec = spec_for(variables)
    scale = jnp.asarray([1.0, -6.0]).reshape(K, 1, 1)  # very different copies
    branched["params"]["branch"]["kernel"] = branched["params"]["branch"]["kernel"] * scale
    branched["params"]["branch"]["bias"] = branched["params"]["branch"]["bias"] + jnp.asarray(
        [[0.0], [4.0]]
    )
    forward = mtl.per_task(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        spec,
        K,
        has_state=True,
        state_reduction=state_reduction,
    )
    ys = jnp.stack([jnp.sum(b, axis=1, keepdims=True) for b in batches])  # [steps, B, 1]

    def loss(params, stats, x, y):
        outs, new = forward({"params": params, "batch_stats": stats}, x)
        return jnp.sum(jnp.mean((outs - y) ** 2, axis=(1, 2))), new["batch_stats"]

    step = jax.jit(jax.grad(loss, has_aux=True))
    params, stats = branched["params"], branched["batch_stats"]
    for i in range(steps):
        grads, stats = step(params, stats, batches[i % 4], ys[i % 4])
        params = optax.apply_updates(params, jax.tree.map(lambda g: -0.01 * g, grads))
    return model, {"params": params, "batch_stats": stats}, spec, batches


def _per_task_spec(variables):
    return mtl.recon.branch(variables, ["branch"], K)


def _averaged_spec(variables):  # the former default: bn's statistics shared and averaged
    spec = mtl.sharing.layer_spec(variables, ["branch"])
    return mtl.sharing.copy_per_task(variables, spec, K), spec


def test_branched_model_evaluates_like_k_single_task_models():
    model, trained, spec, batches = _train_branched(_per_task_spec, None)
    assert trained["batch_stats"]["bn"]["mean"].shape == (K, H)
    evaluate = mtl.per_task(lambda v, x: model.apply(v, x, train=False), spec, K)
    x_test = _batches(n=1, seed=9)[0]
    outs = evaluate(trained, x_test)
    for t in range(K):  # task t alone: its view of the params, its own row of statistics
        ref = model.apply(mtl.sharing.task_params(trained, spec, t), x_test, train=False)
        np.testing.assert_allclose(outs[t], ref, rtol=1e-5, atol=1e-5)

    # precise BN through the per_task forward: each stream gets its own population statistics
    def update(stats, x):
        forward = mtl.per_task(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
            spec,
            K,
            has_state=True,
        )
        return forward({**trained, "batch_stats": stats}, x)[1]["batch_stats"]

    precise = recompute_statistics(jax.jit(update), trained["batch_stats"], batches)
    for t in range(K):
        view = mtl.sharing.task_params(trained, spec, t)
        single = recompute_statistics(
            _linen_update(model, view["params"]), view["batch_stats"], batches
        )
        for name in ("mean", "var"):
            np.testing.assert_allclose(
                precise["bn"][name][t], single["bn"][name], rtol=1e-4, atol=1e-4
            )
    assert np.abs(precise["bn"]["mean"][0] - precise["bn"]["mean"][1]).max() > 1.0


def test_averaged_statistics_differ_measurably_from_per_task_ones():
    model, per_task_vars, spec, _ = _train_branched(_per_task_spec, None)
    _, averaged_vars, avg_spec, _ = _train_branched(_averaged_spec, "mean")
    # batch statistics drive training: the parameters are the same either way
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        per_task_vars["params"],
        averaged_vars["params"],
    )
    x_test = _batches(n=1, seed=9)[0]
    own = mtl.per_task(lambda v, x: model.apply(v, x, train=False), spec, K)(per_task_vars, x_test)
    avg = mtl.per_task(lambda v, x: model.apply(v, x, train=False), avg_spec, K)(
        averaged_vars, x_test
    )
    assert averaged_vars["batch_stats"]["bn"]["mean"].shape == (H,)
    gap = float(jnp.max(jnp.abs(own - avg)))
    assert gap > 0.5, gap  # the streams' statistics differ, so their average evaluates neither


# ---------------------------------------------------------------------------------------------
# NNX


class NNXInputBN(nnx.Module):
    def __init__(self, rngs):
        self.bn_in = nnx.BatchNorm(D, momentum=0.95, rngs=rngs)
        self.dense = nnx.Linear(D, H, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.bn_in(x))


def test_nnx_recompute_equals_numpy_statistics_of_the_input():
    graphdef, params, stats = nnx.split(NNXInputBN(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    batches = _batches()

    @jax.jit
    def update(stats, x):
        model = nnx.merge(graphdef, params, stats, copy=True)
        model.train()
        model(x)
        return nnx.state(model, nnx.BatchStat)

    out = recompute_statistics(update, stats, batches)
    mean, var = _numpy_stats(batches)
    np.testing.assert_allclose(out["bn_in"]["mean"][...], mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["bn_in"]["var"][...], var, rtol=1e-4, atol=1e-4)
    # evaluation with the recomputed statistics normalises a batch by the population statistics
    model = nnx.merge(graphdef, params, out)
    model.eval()
    np.testing.assert_allclose(
        model.bn_in(batches[0]), (batches[0] - mean) / np.sqrt(var + 1e-5), rtol=1e-3, atol=1e-3
    )
