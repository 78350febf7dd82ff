"""The NNX architectures (issue 23) and DSelect-k's entropy regulariser.

* Each NNX model is its Linen twin: with the Linen variables copied in, the outputs (evaluation
  and training mode), the BatchNorm statistics and LTB's step counters agree in float32.
* ``TASK_SPECIFIC`` makes the heads' leaves (gates, attention, last nodes, towers) task-specific
  in the one gradient tree of ``mtl.value_and_grads``: rows ``[K, ...]`` for the encoder equal to
  each task's gradient of the plain forward, each head its own task's gradient.
* A tiny learning run per architecture on the embedded digits with ``shared_rows(upgrad)`` and
  ``nnx.Optimizer``.
* ``selector_entropy`` against its definition (a NumPy loop), and the penalty's gradient reaching
  only the head's selector logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_jax as mtl
from experiments.data import default_dataset_config, make_dataset
from experiments.losses import task_loss
from experiments.models import default_model_config, dselect_k, make_model
from experiments.models import nnx_architectures as na
from experiments.tasks import TaskSpec

SHAPE = (8, 8, 1)
DIGITS_SHAPE = (12, 12, 1)  # the embedded multi_digits canvas
TINY = {
    "mmoe": {"expert_sizes": (12, 10), "tower_hidden": 6},
    "cgc": {"expert_sizes": (10,), "tower_hidden": 6},
    "ple": {"num_levels": 3, "expert_sizes": (10,), "tower_hidden": 0},
    "dselect_k": {"expert_sizes": (10,), "tower_hidden": 6, "num_experts": 8, "num_nonzeros": 3},
    "cross_stitch": {"channels": (4, 6), "head_hidden": 6},
    "mtan": {"channels": (4, 6), "head_hidden": 6},
    "ltb": {"channels": (4, 6, 6), "head_hidden": 6, "warmup_steps": 1},
}


def _tasks(k: int = 2) -> tuple[TaskSpec, ...]:
    return tuple(TaskSpec(f"task{i}", "classification", 3 + i) for i in range(k))


def _config(name: str, **overrides) -> ml_collections.ConfigDict:
    config = default_model_config(name)
    config.update({**TINY[name], **overrides})
    return config


def _images(n: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *SHAPE)), jnp.float32)


def _twins(name: str, tasks, seed: int = 0, entropy_reg: float | None = None, **overrides):
    """The Linen model, its variables and the NNX model holding the same variables.

    ``entropy_reg``: DSelect-k's option, given to ``dselect_k.build`` (the runner's configs do
    not take it: its train step adds no auxiliary loss)."""
    if entropy_reg is None:
        linen = make_model(_config(name, **overrides), tasks, SHAPE)
    else:
        config = _config(name, **overrides)
        config.entropy_reg = entropy_reg
        linen = dselect_k.build(config, tasks, SHAPE)
    variables = jax.jit(linen.init, static_argnums=1)(jax.random.key(seed, impl="rbg"), SHAPE)
    model = na.from_linen(linen, SHAPE, nnx.Rngs(seed + 1))
    na.load_linen_variables(model, variables)
    return linen, variables, model


# the CNN models: ~20-45 s per test on 2 loaded cores (load 10), as the Linen ones are marked
CNN = ("cross_stitch", "mtan", "ltb")
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in CNN else n for n in na.NNX_MODELS]


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------- the Linen twin


def test_nnx_models_and_their_input_errors():
    assert set(TINY) == set(na.NNX_MODELS)
    with pytest.raises(ValueError, match="no NNX version of 'mlp'"):
        na.make_nnx_model(default_model_config("mlp"), _tasks(), SHAPE, nnx.Rngs(0))
    model = na.make_nnx_model(_config("mmoe"), _tasks(), SHAPE, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"built for examples of shape \(8, 8, 1\)"):
        model(jnp.zeros((2, 12, 12, 1)))
    mlp = make_model(default_model_config("mlp"), _tasks(), SHAPE)
    with pytest.raises(ValueError, match="no NNX version of a MLPEncoder encoder"):
        na.from_linen(mlp, SHAPE, nnx.Rngs(0))


@pytest.mark.parametrize("name", PARAMS)
def test_nnx_model_equals_its_linen_twin(name):
    tasks = _tasks(3 if name in ("ple", "cross_stitch") else 2)
    linen, variables, model = _twins(name, tasks)
    x = _images(5, seed=1)

    @nnx.jit
    def forward(model, x):
        return model(x)

    linen_apply = jax.jit(linen.apply, static_argnames="train")

    # training mode, two steps: BatchNorm batch statistics and running averages, LTB's counters
    # (warmup_steps=1: the second step samples Gumbel noise) advance the same way
    model.train()
    for _ in range(2):
        want, variables = linen_apply(variables, x, train=True)
        got = forward(model, x)
        for t in tasks:
            _close(got[t.name], want[t.name])
        pure = na.linen_variables_as_pure_dict(variables, model.task_names)
        jax.tree.map(_close, nnx.to_pure_dict(nnx.state(model)), pure)
    # evaluation: running averages, argmax parents, counters frozen
    model.eval()
    want, _ = linen_apply(variables, x, train=False)
    got = forward(model, x)
    for t in tasks:
        _close(got[t.name], want[t.name])
    jax.tree.map(_close, nnx.to_pure_dict(nnx.state(model)), pure)


def test_loading_other_hyper_parameters_names_the_leaves():
    tasks = _tasks()
    linen = make_model(_config("mmoe", expert_sizes=(12,)), tasks, SHAPE)
    variables = linen.init(jax.random.key(0), SHAPE)
    model = na.make_nnx_model(_config("mmoe"), tasks, SHAPE, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"missing encoder/experts/kernel1.*shape"):
        na.load_linen_variables(model, variables)


# --------------------------------------------------------------------------- gradient tree


def _losses_fn(model, tasks):
    graphdef = nnx.split(model, nnx.Param, ...)[0]

    def losses(params, rest, x, y):  # -> (f32[K], new state)
        m = nnx.merge(graphdef, params, rest, copy=True)
        preds, aux = m.with_aux_losses(x)
        ls = jnp.stack([task_loss(t, preds[t.name], y[t.name]) for t in tasks])
        return ls + aux, nnx.state(m, na.STATE)

    return losses


@pytest.mark.parametrize("name", PARAMS)
def test_heads_are_task_specific_in_the_gradient_tree(name):
    tasks = _tasks(3)
    # LTB: past the warmup (alpha gets no gradient in it) and soft (a hard choice leaves the
    # nodes no child picked without a gradient)
    overrides = {"warmup_steps": 0, "hard": False} if name == "ltb" else {}
    model = na.make_nnx_model(_config(name, **overrides), tasks, SHAPE, nnx.Rngs(0))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(2)
    x = _images(8, seed=2)
    y = {t.name: jnp.asarray(rng.integers(0, t.num_classes, 8)) for t in tasks}
    losses = _losses_fn(model, tasks)
    fn = mtl.value_and_grads(losses, na.TASK_SPECIFIC, has_aux=True)
    _, grads = jax.jit(fn)(params, rest, x, y)
    # the reference: the Jacobian of the plain loss vector, every leaf with a task axis
    jac = jax.jit(jax.jacrev(lambda p: losses(p, rest, x, y)[0]))(params)
    labels = na.TASK_SPECIFIC(nnx.as_pure(params))
    pure_grads, pure_jac = nnx.to_pure_dict(grads), nnx.to_pure_dict(jac)
    assert not any(jax.tree.leaves(labels["encoder"]))
    assert all(jax.tree.leaves(labels["heads"]))
    jax.tree.map(_close, pure_grads["encoder"], pure_jac["encoder"])  # rows [K, ...]
    for k in range(len(tasks)):
        # head k: task k's gradient, no task axis; no other task reaches it
        jax.tree.map(
            lambda g, j, k=k: _close(g, j[k]), pure_grads["heads"][k], pure_jac["heads"][k]
        )
        for j in range(len(tasks)):
            if j != k:
                assert not any(
                    np.any(np.asarray(a[j])) for a in jax.tree.leaves(pure_jac["heads"][k])
                )
    # every encoder leaf is reached by every task
    for path, rows in jax.tree_util.tree_leaves_with_path(pure_grads["encoder"]):
        norms = np.linalg.norm(np.asarray(rows).reshape(len(tasks), -1), axis=1)
        assert np.all(norms > 0), (jax.tree_util.keystr(path), norms)


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def digits():
    """The embedded multi_digits benchmark (two real digits on a 12x12 canvas), 256 examples."""
    config = default_dataset_config("multi_digits")
    config.num_train, config.num_test = 256, 8
    data = make_dataset(config)
    x = jnp.asarray(data.train.arrays["image"], jnp.float32).reshape(-1, *DIGITS_SHAPE)
    return data.tasks, x, {t.name: jnp.asarray(data.train.arrays[t.name]) for t in data.tasks}


@pytest.mark.parametrize("name", PARAMS)
def test_learns_multi_digits_with_upgrad_and_nnx_optimizer(name, digits):
    tasks, x_all, y_all = digits
    # the default sizes; LTB with the Linen test's schedule (tests/test_models_columns.py)
    config = default_model_config(name)
    if name == "ltb":
        config.update({"warmup_steps": 10, "tau_decay_steps": 10.0})
    model = na.make_nnx_model(config, tasks, DIGITS_SHAPE, nnx.Rngs(0))
    grad_fn = mtl.value_and_grads(_losses_fn(model, tasks), na.TASK_SPECIFIC, has_aux=True)
    method = mtl.get_method("upgrad", num_tasks=len(tasks))
    tx = optax.chain(mtl.shared_rows(method.transform, na.TASK_SPECIFIC), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        _, params, rest = nnx.split(model, nnx.Param, ...)
        (losses, state), grads = grad_fn(params, rest, x, y)
        optimizer.update(model, grads, task_losses=losses)
        nnx.update(model, state)
        return losses

    model.train()
    rng = np.random.default_rng(0)
    history = []
    for _ in range(40):
        idx = rng.choice(len(x_all), 64, replace=False)
        history.append(
            np.asarray(step(model, optimizer, x_all[idx], {n: v[idx] for n, v in y_all.items()}))
        )
    history = np.array(history)
    first, last = history[:3].mean(0), history[-5:].mean(0)
    assert np.all(first > 2.0)  # ~ln(10) = 2.30 at init
    assert np.all(last < first - 0.1), (first, last)  # every task learns something


# --------------------------------------------------------------------------- DSelect-k entropy


def test_selector_entropy_is_libmtls_sum():
    rng = np.random.default_rng(0)
    r = rng.dirichlet(np.ones(4), size=(5, 2)).astype(np.float32)  # [B, k, E], rows sum to 1
    r[0, 0] = [0.0, 1.0, 0.0, 0.0]  # one-hot: no entropy
    want = 0.0
    for v in r.reshape(-1):
        want -= v * np.log(v + 1e-6)
    _close(dselect_k.selector_entropy(jnp.asarray(r)), want)
    uniform = jnp.full((3, 2, 4), 0.25)
    np.testing.assert_allclose(
        dselect_k.selector_entropy(uniform), 6 * np.log(0.25 + 1e-6) * -0.25 * 4, rtol=1e-5
    )
    assert float(dselect_k.selector_entropy(jnp.eye(4)[None, :2])) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"r \[B, k, E\]"):
        dselect_k.selector_entropy(jnp.ones((4, 4)))


def test_entropy_penalty_is_off_by_default_and_reaches_only_the_selector_logits():
    tasks = _tasks()
    linen, variables, model = _twins("dselect_k", tasks)
    x = _images(6, seed=3)
    assert float(jnp.sum(model.with_aux_losses(x)[1])) == 0.0  # default: no penalty
    with pytest.raises(ValueError, match="entropy_reg must be >= 0"):
        _twins("dselect_k", tasks, entropy_reg=-1.0)
    linen, variables, model = _twins("dselect_k", tasks, entropy_reg=1e-2)
    _, aux = model.with_aux_losses(x)
    # the Linen head gives the same penalty: entropy_reg * H(r) of its own selectors
    params, state = linen.split(variables)
    z, _ = linen.encoder_fn(state["encoder"], False)(params["encoder"], x)
    for k, t in enumerate(tasks):
        head_vars = {"params": params["heads"][t.name]}
        r = linen.heads[t.name].apply(head_vars, z, method="selector_outputs")
        _close(aux[k], 1e-2 * dselect_k.selector_entropy(r))
        _close(linen.heads[t.name].apply(head_vars, z, method="aux_loss"), aux[k])
    # its gradient: head k's z_logits only (the gate reads the input, not the experts)
    _, p, rest = nnx.split(model, nnx.Param, ...)
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    g = jax.grad(lambda p: nnx.merge(graphdef, p, rest, copy=True).with_aux_losses(x)[1][0])(p)
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(g)):
        where = jax.tree_util.keystr(path)
        reached = bool(np.any(np.asarray(leaf)))
        assert reached == ("'heads'][0]['z_logits'" in where), where
