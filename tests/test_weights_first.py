"""Each method at its own cost (issue 22): weights before the backward pass.

``Method.weigh`` must give the weights and the state that ``Method.transform.update`` gives from
the Jacobian (it never sees it), and ``mtl.gradients.WeightedBackward`` must give the gradient of
``sum_k w_k L_k`` -- checked against ``jax.grad`` of that scalar, written out here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl

K = 3
# every weights-first method family: loss-only (stateless, stateful, random, post-step),
# representation (stateless, stateful) and the constant aggregators
WEIGHTS_FIRST = [
    "uw",
    "dwa",
    "rlw",
    "famo",
    "stch",
    "gls",
    "imtl_l",
    "mean",
    "sum",
    "mgda_ub",
    "aligned_mtl_ub",
    "nash_mtl_ub",
]


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    jac = {
        "a": jnp.asarray(rng.normal(size=(K, 4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(K, 5)), jnp.float32),
    }
    losses = jnp.asarray(rng.uniform(0.2, 2.0, size=K), jnp.float32)
    rep = jnp.asarray(rng.normal(size=(K, 6, 2)), jnp.float32)
    return jac, losses, rep


@pytest.mark.parametrize("name", WEIGHTS_FIRST)
def test_weigh_gives_the_weights_and_state_of_update(name):
    method = mtl.get_method(name, num_tasks=K, seed=1)
    assert method.weigh is not None, name
    params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((5,))}
    by_update = by_weigh = method.transform.init(params)
    for step in range(3):  # stateful methods: the states stay equal over steps
        jac, losses, rep = _inputs(step)
        extra = {"rep_grads": rep} if "rep_grads" in method.inputs else {}
        updates, by_update = method.transform.update(
            jac, by_update, params, task_losses=losses, **extra
        )
        w, by_weigh = method.weigh(by_weigh, losses, **extra)
        for leaf in ("a", "b"):  # sum_k w_k g_k, written out
            combined = np.tensordot(np.asarray(w), np.asarray(jac[leaf]), axes=1)
            np.testing.assert_allclose(updates[leaf], combined, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(mtl.aggregation.weights(by_update), w, rtol=1e-6)
        same = by_update._replace(gram=by_weigh.gram)  # the Jacobian's Gram: never formed
        for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(by_weigh), strict=True):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_methods_that_need_the_jacobian_have_no_weigh():
    assert mtl.get_method("pcgrad", num_tasks=K).weigh is None
    assert mtl.get_method("upgrad", num_tasks=K).weigh is None
    assert mtl.get_method("gradnorm", num_tasks=K, layer="x").weigh is None


def test_weigh_refuses_a_chain_state():
    method = mtl.get_method("uw", num_tasks=K)
    state = (method.transform.init({"a": jnp.zeros(2)}),)
    with pytest.raises(TypeError, match="aggregator's own state"):
        method.weigh(state, jnp.ones(K))


def test_weigh_with_nonfinite_losses_keeps_the_state():
    method = mtl.get_method("uw", num_tasks=K)
    state = method.transform.init({"a": jnp.zeros(2)})
    w, new = method.weigh(state, jnp.array([1.0, jnp.nan, 1.0]))
    assert np.all(np.isnan(np.asarray(w)))
    for x, y in zip(jax.tree.leaves(state.inner), jax.tree.leaves(new.inner), strict=True):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# WeightedBackward: the gradient of the weighted loss from one trunk backward pass.


def _trunk(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _head(hp, z, y):
    return jnp.mean((z @ hp["v"] - y) ** 2)


def _problem(dtype):
    rng = np.random.default_rng(0)
    a = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
    params = {
        "trunk": {"w1": a(5, 7), "w2": a(7, 4)},
        "heads": [{"v": a(4, 2)} for _ in range(K)],
    }
    x, targets = a(8, 5), [a(8, 2) for _ in range(K)]
    return params, x, targets


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("scale_heads", [True, False])
def test_weighted_backward_is_the_gradient_of_the_weighted_loss(dtype, scale_heads):
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
    try:
        params, x, targets = _problem(dtype)
        fixed = jnp.asarray([0.2, 0.5, 0.3], dtype)

        def weigh(losses, rep_grads):
            return fixed * 1.0, jnp.sum(losses)

        fn = mtl.value_and_grads(
            mtl.TrunkAndHeads(_trunk, [_head] * K),
            representation=mtl.gradients.WeightedBackward(weigh, scale_heads=scale_heads),
        )
        (losses, aux), grads = jax.jit(fn)(params, x, targets)

        def weighted(p):  # the reference: one scalar, jax.grad
            z = _trunk(p["trunk"], x)
            return sum(fixed[k] * _head(p["heads"][k], z, targets[k]) for k in range(K))

        ref = jax.grad(weighted)(params)
        tol = 1e-5 if dtype == jnp.float32 else 1e-12
        for g, r in zip(
            jax.tree.leaves(grads["trunk"]), jax.tree.leaves(ref["trunk"]), strict=True
        ):
            np.testing.assert_allclose(g, r, rtol=tol, atol=tol)
        for k in range(K):
            own = jax.grad(lambda hp, k=k: _head(hp, _trunk(params["trunk"], x), targets[k]))(
                params["heads"][k]
            )
            want = ref["heads"][k] if scale_heads else own
            np.testing.assert_allclose(grads["heads"][k]["v"], want["v"], rtol=tol, atol=tol)
        np.testing.assert_allclose(aux["weights"], fixed)
        np.testing.assert_allclose(aux["weigh"], np.sum(np.asarray(losses)), rtol=tol)
    finally:
        jax.config.update("jax_enable_x64", False)


# ---------------------------------------------------------------------------------------------
# The runner: the weights-first step against the Jacobian step, and the probe's period.


def _runner_problem(method: str, **conflict):
    import dataclasses

    from experiments import config as config_lib
    from experiments import data as data_lib
    from experiments import models as models_lib
    from experiments import studies
    from experiments import train as train_lib

    config = config_lib.base_config("multi_digits", "mlp")
    config.dataset.max_train_examples = 128
    config.dataset.max_test_examples = 64
    config.train.batch_size = 32
    for key, value in conflict.items():
        config.conflict[key] = value
    studies.validate(config)
    data = data_lib.make_dataset(config.dataset)
    model = models_lib.make_model(config.model, data.tasks, data.input_shape)
    spec = train_lib.RunSpec(label=method, method=method, seed=0)
    problem = train_lib.build_problem(config, data.tasks, data.tasks, model, spec, 4)
    params, model_state = train_lib.initial_params(model, data.tasks, data.input_shape, 0)
    state = train_lib.init_state(problem, params, model_state)
    batches = list(data_lib.batches(data.train, 32, seed=0, epoch=0, shuffle=True))
    columns = ["image", *[t.name for t in data.tasks]]
    batches = [{c: b[c] for c in columns} for b in batches]
    jacobian_problem = dataclasses.replace(
        problem, method=dataclasses.replace(problem.method, weigh=None)
    )
    return problem, jacobian_problem, state, batches


@pytest.mark.parametrize("method", ["uw", "famo", "mgda_ub", "mean", "auto_lambda"])
def test_runner_weights_first_step_matches_the_jacobian_step(method):
    from experiments import train as train_lib

    problem, jacobian_problem, state, batches = _runner_problem(method)
    assert problem.weights_first and not jacobian_problem.weights_first
    fast = jax.jit(train_lib.make_train_step(problem))
    slow = jax.jit(train_lib.make_train_step(jacobian_problem))
    a = b = state
    for batch in batches[:3]:
        a, out_a = fast(a, batch)
        b, out_b = slow(b, batch)
        np.testing.assert_allclose(out_a["weights"], out_b["weights"], rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_probe_runs_every_n_steps_and_counts_only_its_steps():
    from experiments import train as train_lib

    problem, _, state, batches = _runner_problem("uw", every=3)
    step = train_lib.ProbedStep(
        step=jax.jit(train_lib.make_train_step(problem)),
        probe=jax.jit(train_lib.make_conflict_probe(problem)),
        every=problem.conflict_every,
        next_step=0,
    )
    for batch in batches[:4] * 2:  # steps 0..7: probes before 0, 3, 6
        state, _ = step(state, batch)
    assert int(state.conflict.steps) == 3 and len(step.probe_seconds) == 3
    assert len(step.step_seconds) == 8 and int(state.step) == 8
    times = step.medians()
    assert times["probe_every"] == 3 and times["probe_seconds"] > 0
    resumed = train_lib.ProbedStep(step.step, step.probe, 3, next_step=7)
    state, _ = resumed(state, batches[0])  # step 7: no probe
    state, _ = resumed(state, batches[1])  # step 8: no probe
    state, _ = resumed(state, batches[2])  # step 9: a probe
    assert int(state.conflict.steps) == 4


@pytest.mark.parametrize("method", ["sdmgrad", "modo"])
def test_runner_feeds_a_cross_batch_method_the_two_halves_of_the_batch(method):
    from experiments import train as train_lib

    problem, _, state, batches = _runner_problem(method)
    assert problem.method.batches == 2
    mean_problem = _runner_problem("mean")[0]
    step = jax.jit(train_lib.make_train_step(problem))
    _, full = jax.jit(train_lib.make_train_step(mean_problem))(state, batches[0])
    new, out = step(state, batches[0])
    # the losses are the whole batch's (the mean over two equal halves of a mean loss)
    np.testing.assert_allclose(out["losses"], full["losses"], rtol=1e-5)
    w = np.asarray(out["weights"])
    assert np.all(np.isfinite(w)) and np.all(w >= 0) and w.shape == (2,)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params), strict=True)
    ]
    assert all(moved)


def test_runner_refuses_an_odd_batch_for_a_cross_batch_method():
    from experiments import config as config_lib
    from experiments.studies.base import check_methods

    config = config_lib.base_config("multi_digits", "mlp")
    config.train.batch_size = 33
    with pytest.raises(ValueError, match="batch_size=33 is odd"):
        check_methods(config, ["sdmgrad"], num_tasks=2)
    with pytest.raises(ValueError, match="batch_size=33 is odd"):
        check_methods(config, ["auto_lambda"], num_tasks=2)
    check_methods(config, ["pcgrad"], num_tasks=2)
