"""The method catalogue: mtl.get_method builds every method, and says how a loop feeds it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl

K = 3
REQUIRED = {
    "gradnorm": {"layer": "w"},
    "linear": {"weights": [1.0, 2.0, 0.5]},
    "linear_ub": {"weights": [1.0, 2.0, 0.5]},
}


def _rows(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(K, 4, 2)), jnp.float32)}


def _rep_grads(seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(K, 5, 3)), jnp.float32)


def test_the_catalogue_is_every_aggregator_scalarizer_and_representation_method():
    expected = (
        set(mtl.aggregation.AGGREGATORS)
        | set(mtl.scalarization.SCALARIZERS)
        | {f"{w}_ub" for w in mtl.weighting.WEIGHTINGS}
        | {"auto_lambda"}  # a loss method with a hypergradient input, in neither registry
    )
    assert set(mtl.METHODS) == expected
    for name in mtl.aggregation.AGGREGATORS:  # "mean" and "sum" are the aggregators
        assert mtl.METHODS[name].cost == "jacobian"
    assert {e.cost for e in mtl.METHODS.values()} == set(mtl.methods.COSTS)


@pytest.mark.parametrize("name", list(mtl.METHODS))
def test_every_method_builds_and_updates_with_what_it_says_it_needs(name):
    method = mtl.get_method(name, num_tasks=K, seed=0, **REQUIRED.get(name, {}))
    assert method.name == name and method.cost in mtl.methods.COSTS
    assert method.batches == (2 if "paired_rows" in method.inputs else 1)
    assert set(method.inputs) <= set(mtl.methods.INPUTS)
    rows = _rows()
    params = jax.tree.map(lambda r: r[0], rows)
    inputs = {"task_losses": jnp.array([1.0, 0.5, 2.0])}
    if "rep_grads" in method.inputs:
        inputs["rep_grads"] = _rep_grads()
    if "paired_rows" in method.inputs:  # the rows on two batches (SDMGrad, MoDo)
        inputs["paired_rows"] = jax.tree.map(lambda a, b: jnp.stack([a, b]), rows, _rows(3))
    if "lambda_grad" in method.inputs:  # Auto-Lambda's hypergradient
        inputs["lambda_grad"] = jnp.array([0.1, -0.2, 0.05])
    state = method.transform.init(params)
    update, state = jax.jit(method.transform.update)(rows, state, params, **inputs)
    assert jax.tree.structure(update) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(update))
    assert method.scales_heads == (method.cost == "loss")
    assert (method.post_step is not None) == (name == "famo")
    if method.post_step is not None:
        stepped = method.post_step(state, jnp.array([0.9, 0.4, 1.5]))
        assert jax.tree.structure(stepped) == jax.tree.structure(state)


def test_the_loss_methods_update_is_the_gradient_of_the_weighted_loss():
    method = mtl.get_method("uw", num_tasks=K)
    rows = _rows(2)
    params = jax.tree.map(lambda r: r[0], rows)
    losses = jnp.array([1.0, 0.5, 2.0])
    update, state = method.transform.update(
        rows, method.transform.init(params), params, task_losses=losses
    )
    w = np.asarray(mtl.aggregation.weights(state))
    np.testing.assert_allclose(
        update["w"], np.tensordot(w, np.asarray(rows["w"]), axes=1), rtol=1e-5, atol=1e-6
    )


def test_method_strings_hyperparameters_and_seeds():
    method = mtl.get_method("cagrad:c=0.4,rescale=True", num_tasks=K, seed=5)
    assert method.hyperparams == {"c": 0.4, "rescale": True}  # CAGrad draws nothing: no seed
    assert mtl.parse_method("pcgrad:seed=7,shuffle=False") == (
        "pcgrad",
        {"seed": 7, "shuffle": False},
    )

    def key_of(spec, seed):
        state = mtl.get_method(spec, num_tasks=K, seed=seed).transform.init({"w": jnp.zeros(2)})
        return np.asarray(jax.random.key_data(state.key))

    np.testing.assert_array_equal(key_of("pcgrad", 3), jax.random.key_data(jax.random.key(3)))
    np.testing.assert_array_equal(key_of("pcgrad:seed=7", 3), key_of("pcgrad", 7))  # spec wins
    assert not np.array_equal(key_of("pcgrad", 1), key_of("pcgrad", 2))
    # keyword hyper-parameters, the method string's win on a clash
    assert mtl.get_method("cagrad:c=0.2", num_tasks=K, c=0.9).hyperparams["c"] == 0.2


def test_dwa_gets_the_epoch_length_and_gradnorm_its_layer():
    dwa = mtl.get_method("dwa", num_tasks=K, steps_per_epoch=7)
    assert dwa.hyperparams == {}  # the loop's epoch length is not a hyper-parameter it was given
    with pytest.raises(ValueError, match=r"gradnorm needs \['layer'\].*gradnorm:layer="):
        mtl.get_method("gradnorm", num_tasks=K)


def test_bad_names_and_hyperparameters_are_named():
    with pytest.raises(
        ValueError,
        match=r"Unknown method 'pcgard'.*aggregators .*'pcgrad'.*"
        r"loss-only methods .*'uw'.*representation methods .*'mgda_ub'",
    ):
        mtl.get_method("pcgard", num_tasks=K)
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) \['alpha'\].*'c'"):
        mtl.get_method("cagrad", num_tasks=K, alpha=0.4)
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) \['bogus'\]"):
        mtl.get_method("mgda_ub:bogus=1", num_tasks=K)
    with pytest.raises(ValueError, match=r"'c' must be a number .*got 'abc'"):
        mtl.get_method("cagrad:c=abc", num_tasks=K)
    with pytest.raises(ValueError, match=r"'shuffle' must be a bool .*got 1 \(int\)"):
        mtl.get_method("pcgrad:shuffle=1", num_tasks=K)
    with pytest.raises(ValueError, match="Bad method string"):
        mtl.parse_method("cagrad:c")
    with pytest.raises(ValueError, match=r"uw \(loss method\) needs num_tasks=K"):
        mtl.get_method("uw")
    with pytest.raises(ValueError, match=r"linear_ub needs the hyper-parameter\(s\) \['weights'\]"):
        mtl.get_method("linear_ub", num_tasks=K)


def test_a_method_chains_into_optax_through_shared_rows():
    def loss_fn(params, x, ys):
        z = jnp.tanh(x @ params["trunk"])
        return jnp.stack([jnp.mean((z @ params["heads"][t] - ys[t]) ** 2) for t in range(K)])

    labels = {"trunk": False, "heads": True}
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"trunk": jax.random.normal(k1, (4, 8)), "heads": [jnp.zeros((8, 1))] * K}
    x, ys = jax.random.normal(k2, (32, 4)), jax.random.normal(k3, (K, 32, 1))
    method = mtl.get_method("upgrad", num_tasks=K)
    tx = optax.chain(mtl.shared_rows(method.transform, labels), optax.adam(1e-2))
    grad_fn = jax.jit(mtl.value_and_grads(loss_fn, labels))
    opt_state = tx.init(params)
    first = None
    for _ in range(30):
        losses, grads = grad_fn(params, x, ys)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        params = optax.apply_updates(params, updates)
        first = losses if first is None else first
    assert bool(jnp.all(losses < first))  # every task's loss falls
    assert mtl.aggregation.weights(opt_state).shape == (K,)
