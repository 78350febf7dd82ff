"""Multi-column and attention architectures (issue 23): ``cross_stitch``, ``mtan``, ``ltb``.

Output shapes for K = 2 and 3; the encoder's Jacobian rows and the heads' gradients from
``mtl.TrunkAndHeads`` against ``jax.grad`` of the plain full-model losses (so MTAN's attention
modules in head k get task k's gradient and no other); cross-stitch columns independent at identity
units; LTB's Gumbel-softmax against its definition; a short learning run per model."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from experiments.data import default_dataset_config, make_dataset
from experiments.losses import head_loss_fns, task_loss
from experiments.models import cross_stitch, ltb, mtan
from experiments.tasks import TaskSpec

SHAPE = (12, 12, 1)  # the embedded multi_digits canvas
MODULES = {"cross_stitch": cross_stitch, "mtan": mtan, "ltb": ltb}
TINY = {
    "cross_stitch": {"channels": (4, 8), "head_hidden": 8},
    "mtan": {"channels": (4, 8), "head_hidden": 8},
    "ltb": {"channels": (4, 8, 8), "head_hidden": 8},
}


def _tasks(k: int) -> tuple[TaskSpec, ...]:
    return tuple(TaskSpec(f"task{i}", "classification", 3 + i) for i in range(k))


def _build(name: str, tasks, **overrides):
    module = MODULES[name]
    config = ml_collections.ConfigDict({**module.DEFAULTS, **TINY[name], **overrides})
    return module.build(config, tasks, SHAPE)


def _init(model, seed: int = 0):
    variables = jax.jit(model.init, static_argnums=1)(jax.random.key(seed, impl="rbg"), SHAPE)
    return model.split(variables)


def _batch(tasks, batch: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, *SHAPE)), jnp.float32)
    y = {t.name: jnp.asarray(rng.integers(0, t.num_classes, batch)) for t in tasks}
    return x, y


def _full_losses(model, params, state, x, y):
    """The per-task losses of the plain full forward (``MultiTaskModel.apply``), ``[K]``."""
    preds, _ = model.apply(model.merge(params, state), x, train=True)
    return jnp.stack([task_loss(t, preds[t.name], y[t.name]) for t in model.tasks])


def _full_jacobian(model, params, state, x, y):
    """``d loss_k / d params`` stacked ``[K, ...]``: one plain ``jax.grad`` of the full model per
    task (eager; on the CPU faster than compiling a ``jacrev`` of these convolutions)."""
    rows = [
        jax.grad(lambda p, k=k: _full_losses(model, p, state, x, y)[k])(params)
        for k in range(len(model.tasks))
    ]
    return jax.tree.map(lambda *r: jnp.stack(r), *rows)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_output_shapes(name, k):
    tasks = _tasks(k)
    model = _build(name, tasks)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), SHAPE))
    x, _ = _batch(tasks, batch=5)
    z = jax.eval_shape(lambda v: model.encoder.apply(v, x, train=False), variables["encoder"])
    if name == "cross_stitch":
        assert z.shape == (5, k, 8)
    elif name == "ltb":
        assert z.shape == (5, k, 3, 3, 8)  # stem 12 -> 6, one branching layer 6 -> 3
    else:  # mtan: (mid, out) per stage
        assert [(m.shape, o.shape) for m, o in z] == [
            ((5, 12, 12, 4), (5, 12, 12, 4)),
            ((5, 6, 6, 8), (5, 6, 6, 8)),
        ]
    for train in (False, True):
        preds = jax.eval_shape(lambda v, t=train: model.apply(v, x, train=t)[0], variables)
        assert {n: p.shape for n, p in preds.items()} == {t.name: (5, t.num_classes) for t in tasks}


def test_bad_configs_name_the_fix():
    tasks = _tasks(2)
    with pytest.raises(ValueError, match="cross_stitch: channels must list"):
        _build("cross_stitch", tasks, channels=())
    with pytest.raises(ValueError, match="mtan: input 12x12 is too small"):
        _build("mtan", tasks, channels=(2, 2, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="ltb: channels needs at least two layers"):
        _build("ltb", tasks, channels=(4,))


# --------------------------------------------------------------------------- shared vs task-specific


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("cross_stitch", marks=pytest.mark.slow),  # ~10-20 s each on a loaded CPU
        pytest.param("ltb", marks=pytest.mark.slow),
        "mtan",
    ],
)
def test_trunk_and_heads_rows_match_full_model_jacobian(name):
    tasks = _tasks(2)
    model = _build(name, tasks, **({"warmup_steps": 0} if name == "ltb" else {}))
    params, state = _init(model, seed=2)
    if name == "ltb":  # past the warm-up: hard Gumbel choices, straight-through gradients
        state = jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.full_like(v, 7.0) if "ltb" in jax.tree_util.keystr(path) else v,
            state,
        )
    x, y = _batch(tasks)
    fn = mtl.value_and_grads(
        mtl.TrunkAndHeads(
            model.encoder_fn(state["encoder"], train=True),
            head_loss_fns(model, state["heads"], train=True),
        ),
        has_aux=True,
    )
    (losses, _), grads = fn({"trunk": params["encoder"], "heads": params["heads"]}, x, y)
    # the independent reference: every task's loss differentiated through the whole model
    jac = _full_jacobian(model, params, state, x, y)
    np.testing.assert_allclose(losses, _full_losses(model, params, state, x, y), rtol=1e-5)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, grads["trunk"], jac["encoder"])  # [K, ...]: every task's row
    for i, t in enumerate(tasks):
        jax.tree.map(lambda g, j, i=i: close(g, j[i]), grads["heads"][t.name], jac["heads"][t.name])
        for j in range(len(tasks)):  # no other task's loss reaches head t
            if j != i:
                assert all(not np.any(a[j]) for a in jax.tree.leaves(jac["heads"][t.name]))
    # the encoder is shared: every task's row is nonzero on it
    rows = np.stack(
        [np.abs(np.asarray(a)).reshape(2, -1).sum(1) for a in jax.tree.leaves(jac["encoder"])]
    )
    assert np.all(rows.sum(0) > 0)
    if name == "mtan":  # task-specific attention modules: task k's own gradient is nonzero
        for t in tasks:
            att = grads["heads"][t.name]["attention1"]
            assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(att)) > 0


# --------------------------------------------------------------------------- cross-stitch


def test_cross_stitch_identity_units_make_columns_independent():
    tasks = _tasks(3)
    model = _build("cross_stitch", tasks)
    params, state = _init(model, seed=3)
    x, y = _batch(tasks, seed=4)

    def column_grad_norms(p):  # [task j, column k]: |d loss_j / d column k's convs|
        jac = _full_jacobian(model, p, state, x, y)["encoder"]
        return np.array(
            [
                [
                    sum(
                        float(jnp.abs(a[j]).sum())
                        for n, leaf in jac.items()
                        if n.startswith(f"column{c}_")
                        for a in jax.tree.leaves(leaf)
                    )
                    for c in range(3)
                ]
                for j in range(3)
            ]
        )

    stitched = column_grad_norms(params)  # default init 0.9 / 0.05: every column feeds every task
    assert np.all(stitched > 0)
    eye = {n: jnp.eye(3) if n.startswith("stitch") else v for n, v in params["encoder"].items()}
    separate = column_grad_norms({**params, "encoder": eye})
    np.testing.assert_array_equal(separate * (1 - np.eye(3)), 0.0)
    assert np.all(np.diag(separate) > 0)


def test_cross_stitch_unit_is_misra_eq1_and_init_rows_sum_to_one():
    alpha = np.array([[0.9, 0.1], [0.3, 0.7]], np.float32)
    cols = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    expected = np.stack([0.9 * cols[0] + 0.1 * cols[1], 0.3 * cols[0] + 0.7 * cols[1]])
    np.testing.assert_allclose(
        cross_stitch.cross_stitch(jnp.asarray(alpha), cols), expected, rtol=1e-6
    )
    init = np.asarray(cross_stitch.stitch_init(3, 0.9)(None, (3, 3)))
    np.testing.assert_allclose(
        init, [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]], rtol=1e-6
    )


# --------------------------------------------------------------------------- LTB


def test_ltb_gumbel_softmax_matches_its_definition():
    logits = jnp.array([[0.3, -0.2, 1.1], [0.0, 0.5, -0.4]])
    noise = jnp.array([[0.1, 1.5, -0.3], [0.2, -0.1, 0.4]])
    values = np.array([2.0, -1.0, 0.5])
    tau = 0.7
    s = np.exp((np.asarray(logits + noise)) / tau)
    s /= s.sum(-1, keepdims=True)
    soft = ltb.gumbel_softmax(logits, tau, noise, hard=False)
    np.testing.assert_allclose(soft, s, rtol=1e-5)
    hard = ltb.gumbel_softmax(logits, tau, noise, hard=True)
    np.testing.assert_allclose(hard, np.eye(3)[s.argmax(-1)], atol=1e-6)  # one-hot forward
    # straight-through: the soft sample's gradient, d/dl sum_j v_j s_j = s (v - s.v) / tau
    grad = jax.grad(lambda lg: jnp.sum(ltb.gumbel_softmax(lg, tau, noise, True) @ values))(logits)
    np.testing.assert_allclose(grad, s * (values - (s @ values)[:, None]) / tau, rtol=1e-4)


def test_ltb_schedule_warmup_eval_and_temperature():
    sched = ltb.BranchSchedule(warmup_steps=10, tau_initial=5.0, tau_decay_steps=100.0)
    logits = jnp.array([[0.0, 2.0], [3.0, 1.0]])
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(ltb.branch_weights(logits, jnp.array(9.0), key, sched, True), 1.0)
    np.testing.assert_array_equal(
        ltb.branch_weights(logits, jnp.array(10.0), key, sched, False), [[0, 1], [1, 0]]
    )
    np.testing.assert_allclose(ltb.temperature(jnp.array(300.0), sched), 2.5, rtol=1e-6)


def test_ltb_counter_advances_in_training_and_choices_vary():
    tasks = _tasks(2)
    model = _build("ltb", tasks, warmup_steps=0)
    params, state = _init(model)
    x, _ = _batch(tasks)
    variables = model.merge(params, state)
    _, after_eval = model.apply(variables, x, train=False)
    assert float(after_eval["encoder"]["ltb"]["counter"]["step"]) == 0.0

    def parents(step):  # the encoder's layer-1 choices at ``step`` (uniform logits at init)
        return np.asarray(
            ltb.branch_weights(
                params["encoder"]["layer1"]["alpha"],
                jnp.array(step),
                jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), step), 1),
                model.encoder.schedule,
                True,
            ).argmax(-1)
        )

    new_vars = variables
    for _ in range(3):
        _, new_vars = model.apply(new_vars, x, train=True)
    assert float(new_vars["encoder"]["ltb"]["counter"]["step"]) == 3.0
    assert all(float(new_vars["heads"][t.name]["ltb"]["counter"]["step"]) == 3.0 for t in tasks)
    choices = np.stack([parents(s) for s in range(20)])
    assert len(np.unique(choices)) == 2  # uniform logits: both parents get sampled


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def digits():
    config = default_dataset_config("multi_digits")
    config.num_train, config.num_test = 256, 8
    data = make_dataset(config)
    x = jnp.asarray(data.train.arrays["image"], jnp.float32).reshape(-1, *SHAPE)
    y = {t.name: jnp.asarray(data.train.arrays[t.name]) for t in data.tasks}
    return data.tasks, x, y


@pytest.mark.parametrize("name", sorted(MODULES))
def test_learns_multi_digits(name, digits):
    tasks, x_all, y_all = digits
    overrides = {"warmup_steps": 10, "tau_decay_steps": 10.0} if name == "ltb" else {}
    module = MODULES[name]
    model = module.build(ml_collections.ConfigDict({**module.DEFAULTS, **overrides}), tasks, SHAPE)
    params, state = _init(model)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(p, s, o, x, y):
        def loss(p):
            preds, new = model.apply(model.merge(p, s), x, train=True)
            ls = jnp.stack([task_loss(t, preds[t.name], y[t.name]) for t in tasks])
            return ls.sum(), (ls, model.split(new)[1])

        (_, (ls, s)), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), s, o, ls

    rng = np.random.default_rng(0)
    history = []
    start = None
    for i in range(40):
        idx = rng.choice(len(x_all), 64, replace=False)
        params, state, opt, ls = step(
            params, state, opt, x_all[idx], {n: v[idx] for n, v in y_all.items()}
        )
        history.append(np.asarray(ls))
        if i == 0:
            start = time.perf_counter()
    ms = (time.perf_counter() - start) / 39 * 1e3
    history = np.array(history)
    first, last = history[:3].mean(0), history[-5:].mean(0)
    print(f"{name}: loss {first} -> {last}, {ms:.1f} ms/step")
    assert np.all(first > 2.0)  # ~ln(10) = 2.30 at init
    assert last.sum() < first.sum() - 0.4, (first, last)  # 40 steps: 0.8-1.3 on the sum
    assert np.all(last < first - 0.1), (first, last)  # every task learns something
