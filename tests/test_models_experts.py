"""The expert-and-gate models (issue 23): ``mmoe``, ``cgc``, ``ple``, ``dselect_k``.

Output shapes; which leaves are shared and which task-specific (against full-model per-task
gradients: a head's leaves get no gradient from another task's loss, and every encoder leaf gets
one from every task); forwards against NumPy implementations written from the papers' equations
with the same weights; DSelect-k's k-sparsity; a tiny PCGrad training run per model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from experiments.losses import head_loss_fns, task_loss
from experiments.models import dselect_k, mmoe, ple
from experiments.tasks import TaskSpec

SHAPE = (8, 8, 1)
BUILDERS = {
    "mmoe": (mmoe.build, mmoe.DEFAULTS),
    "cgc": (ple.build_cgc, ple.CGC_DEFAULTS),
    "ple": (ple.build, ple.DEFAULTS),
    "dselect_k": (dselect_k.build, dselect_k.DEFAULTS),
}
SMALL = {"expert_sizes": (16,), "tower_hidden": 8}


def _tasks(k: int, num_classes: int = 5) -> tuple[TaskSpec, ...]:
    return tuple(TaskSpec(f"task{i}", "classification", num_classes + i) for i in range(k))


def _model(name: str, tasks, **overrides):
    build, defaults = BUILDERS[name]
    return build(ml_collections.ConfigDict({**defaults, **overrides}), tasks, SHAPE)


def _init(model, seed: int):
    """Real variables, fast on the CPU: one jitted init with the RBG PRNG (as tests/test_models.py)."""
    return jax.jit(model.init, static_argnums=1)(jax.random.key(seed, impl="rbg"), SHAPE)


def _apply(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x)[0])(variables, x)


def _images(n: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *SHAPE)), jnp.float32)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# --------------------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("k", [2, 3])
def test_output_shapes(name, k):
    tasks = _tasks(k)
    model = _model(name, tasks, **SMALL)
    x = jax.ShapeDtypeStruct((4, *SHAPE), jnp.float32)
    variables = jax.eval_shape(lambda key: model.init(key, SHAPE), jax.random.key(0))
    preds = jax.eval_shape(lambda v, x: model.apply(v, x)[0], variables, x)
    assert list(preds) == [t.name for t in tasks]
    for t in tasks:
        assert preds[t.name].shape == (4, t.num_classes)
        assert preds[t.name].dtype == jnp.float32


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("mmoe", {"num_experts": 0}, "num_experts must be >= 1"),
        ("mmoe", {"expert_sizes": ()}, "expert_sizes must be a non-empty"),
        ("ple", {"num_levels": 0}, "num_levels must be >= 1"),
        ("cgc", {"num_task_experts": 0}, "num_task_experts must be >= 1"),
        ("dselect_k", {"num_nonzeros": 5}, r"num_nonzeros \(k = 5\) must be <= num_experts"),
        ("dselect_k", {"num_experts": 1}, "num_experts must be >= 2"),
        ("dselect_k", {"gamma": 0.0}, "gamma must be > 0"),
    ],
)
def test_bad_config_names_the_problem(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        _model(name, _tasks(2), **overrides)


# --------------------------------------------------------------------------- shared vs task-specific


def _full_task_grads(model, variables, x, targets):
    """``[d loss_j / d {"encoder", "heads"}]`` for each task j, from the whole model's forward
    (one ``jacrev`` of the loss vector)."""
    params, state = model.split(variables)

    def losses(p):
        preds, _ = model.apply(model.merge(p, state), x)
        return jnp.stack([task_loss(t, preds[t.name], targets[t.name]) for t in model.tasks])

    jac = jax.jit(jax.jacrev(losses))(params)
    return [jax.tree.map(lambda r, j=j: r[j], jac) for j in range(len(model.tasks))]


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("mmoe", {}), ("cgc", {}), ("ple", {"num_levels": 3}), ("dselect_k", {})],
)
def test_gates_are_task_specific_and_the_encoder_is_shared(name, overrides):
    tasks = _tasks(3)
    model = _model(name, tasks, **SMALL, **overrides)
    variables = _init(model, 1)
    params, state = model.split(variables)
    x = _images(16, seed=1)
    rng = np.random.default_rng(2)
    targets = {t.name: jnp.asarray(rng.integers(0, t.num_classes, 16)) for t in tasks}
    fn = mtl.value_and_grads(
        mtl.TrunkAndHeads(
            model.encoder_fn(state["encoder"], train=True),
            head_loss_fns(model, state["heads"], train=True),
        ),
        has_aux=True,
    )
    _, grads = jax.jit(fn)({"trunk": params["encoder"], "heads": params["heads"]}, x, targets)
    full = _full_task_grads(model, variables, x, targets)
    for j, task in enumerate(tasks):
        # the encoder's row j and head j's gradient are task j's full-model gradient
        row_j = jax.tree.map(lambda r, j=j: r[j], grads["trunk"])
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            row_j,
            full[j]["encoder"],
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            grads["heads"][task.name],
            full[j]["heads"][task.name],
        )
        for other in tasks:  # task j's loss never reaches another head (gates included)
            if other.name != task.name:
                leaves = jax.tree.leaves(full[j]["heads"][other.name])
                assert all(not np.any(np.asarray(g)) for g in leaves), (task.name, other.name)
    # every encoder leaf is reached by every task: nothing task-specific is left in the encoder
    for path, rows in jax.tree_util.tree_leaves_with_path(grads["trunk"]):
        norms = np.linalg.norm(np.asarray(rows).reshape(len(tasks), -1), axis=1)
        assert np.all(norms > 0), (jax.tree_util.keystr(path), norms)
    # each head's gate is trained by its own task
    gate_keys = {
        "mmoe": ["gate"],
        "cgc": ["gate", "experts"],
        "ple": ["gate", "gate_prev", "experts"],
    }
    for t in tasks:
        for key in gate_keys.get(name, ["z_logits", "w_logits"]):
            g = grads["heads"][t.name][key]
            assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g)), (t.name, key)


# --------------------------------------------------------------------------- NumPy references


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _dense(p, h):
    return h @ p["kernel"] + p["bias"]


def _tower(p, h):
    if "fc1" in p:
        h = np.maximum(_dense(p["fc1"], h), 0.0)
    return _dense(p["pred"], h)


def _experts(p, h):
    """Expert e: ``h -> ReLU(h W_e0 + b_e0) -> ...``; returns ``[B, E, D]``, looping over e."""
    num = p["kernel0"].shape[0]
    outs = []
    for e in range(num):
        a = h
        for i in range(len(p) // 2):
            a = np.maximum(a @ p[f"kernel{i}"][e] + p[f"bias{i}"][e], 0.0)
        outs.append(a)
    return np.stack(outs, axis=1)


def _mix(gate_logits, experts):
    return np.einsum("be,bed->bd", _softmax(gate_logits), experts)


def test_mmoe_forward_matches_the_paper():
    """``y_k = tower_k(sum_e softmax(W_k x)_e f_e(x))`` (Ma et al. 2018, Eqs. 5-6)."""
    tasks = _tasks(2)
    model = _model("mmoe", tasks, expert_sizes=(12, 10), tower_hidden=6)
    variables = _init(model, 3)
    x = _images(5, seed=3)
    preds = _apply(model, variables, x)
    p = _np(model.split(variables)[0])
    xf = np.asarray(x, np.float64).reshape(5, -1)
    f = _experts(p["encoder"]["experts"], xf)
    for t in tasks:
        h = p["heads"][t.name]
        want = _tower(h["tower"], _mix(_dense(h["gate"], xf), f))
        np.testing.assert_allclose(np.asarray(preds[t.name]), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_ple_forward_matches_the_paper(num_levels):
    """PLE's levels as in Tang et al. 2020 (Eqs. 4-5), written per level and per task; CGC is one
    level. Task experts and gates at the last levels are looked up in the heads."""
    tasks = _tasks(2)
    model = _model("ple", tasks, num_levels=num_levels, **SMALL)
    variables = _init(model, 4)
    x = _images(5, seed=4)
    preds = _apply(model, variables, x)
    p = _np(model.split(variables)[0])
    enc, heads = p["encoder"], [p["heads"][t.name] for t in tasks]
    last = num_levels - 1

    def task_experts(j, k):
        return heads[k]["experts"] if j == last else enc[f"level{j}_task{k}_experts"]

    def task_gate(j, k):
        if j == last:
            return heads[k]["gate"]
        return heads[k]["gate_prev"] if j == last - 1 else enc[f"level{j}_task{k}_gate"]

    xf = np.asarray(x, np.float64).reshape(5, -1)
    g_shared, g_task = xf, [xf, xf]
    for j in range(num_levels):
        shared = _experts(enc[f"level{j}_shared_experts"], g_shared)
        own = [_experts(task_experts(j, k), g_task[k]) for k in range(2)]
        new_task = [
            _mix(_dense(task_gate(j, k), g_task[k]), np.concatenate([shared, own[k]], 1))
            for k in range(2)
        ]
        if j < last:  # the shared gate mixes every expert of the level
            g_shared = _mix(
                _dense(enc[f"level{j}_shared_gate"], g_shared), np.concatenate([shared, *own], 1)
            )
        g_task = new_task
    for k, t in enumerate(tasks):
        want = _tower(heads[k]["tower"], g_task[k])
        np.testing.assert_allclose(np.asarray(preds[t.name]), want, rtol=1e-4, atol=1e-5)


def _np_smooth_step(t, gamma):
    out = np.empty_like(t)
    for i, v in np.ndenumerate(t):
        if v <= -gamma / 2:
            out[i] = 0.0
        elif v >= gamma / 2:
            out[i] = 1.0
        else:
            out[i] = -2 * v**3 / gamma**3 + 3 * v / (2 * gamma) + 0.5
    return out


def test_dselect_k_forward_matches_the_paper():
    """Hazimeh et al. 2021, Eqs. 4-7, with bits of expert e most significant first."""
    tasks = _tasks(2)
    e_num, k_num, gamma = 8, 3, 2.0
    model = _model("dselect_k", tasks, num_experts=e_num, num_nonzeros=k_num, gamma=gamma, **SMALL)
    variables = _init(model, 5)
    params, _ = model.split(variables)
    # spread the selector logits over the whole smooth-step (both flat parts and the cubic)
    for t in tasks:
        zp = params["heads"][t.name]["z_logits"]
        zp["kernel"] = zp["kernel"] * 100.0
    variables = model.merge(params, model.split(variables)[1])
    x = _images(6, seed=5)
    preds = _apply(model, variables, x)
    p = _np(params)
    xf = np.asarray(x, np.float64).reshape(6, -1)
    f = _experts(p["encoder"]["experts"], xf)
    codes = [[int(b) for b in format(e, "03b")] for e in range(e_num)]
    for t in tasks:
        h = p["heads"][t.name]
        z = _dense(h["z_logits"], xf).reshape(6, k_num, 3)
        s = _np_smooth_step(z, gamma)
        assert np.any((s > 0) & (s < 1)) and np.any(s == 0) and np.any(s == 1)
        r = np.ones((6, k_num, e_num))
        for e, code in enumerate(codes):
            for bit, c in enumerate(code):
                r[:, :, e] *= s[:, :, bit] if c else 1 - s[:, :, bit]
        q = np.einsum("bi,bie->be", _softmax(_dense(h["w_logits"], xf)), r)
        want = _tower(h["tower"], np.einsum("be,bed->bd", q, f))
        np.testing.assert_allclose(np.asarray(preds[t.name]), want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- DSelect-k sparsity


def test_dselect_k_is_k_sparse_once_the_selectors_saturate():
    e_num, k_num = 8, 2
    codes = dselect_k.binary_codes(e_num)
    rng = np.random.default_rng(6)
    # any logits with |z| >= gamma/2: every selector one-hot, at most k experts weighted
    z = rng.choice([-1.0, 1.0], size=(32, k_num, 3)) * rng.uniform(0.5, 3.0, (32, k_num, 3))
    q = np.asarray(dselect_k.expert_weights(jnp.asarray(z), jnp.zeros((32, k_num)), codes, 1.0))
    assert np.all(np.count_nonzero(q, axis=1) <= k_num)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)
    # the head's gate set to a binary code: selector i picks expert (5, 2)[i], weights softmax(w)
    tasks = _tasks(1)
    model = _model("dselect_k", tasks, num_experts=e_num, num_nonzeros=k_num, **SMALL)
    params, state = model.split(_init(model, 7))
    head = params["heads"]["task0"]
    picks, w = (5, 2), np.array([0.3, -0.4])
    bias = np.concatenate([np.where(codes[e], 1.0, -1.0) for e in picks])  # +-gamma: saturated
    head["z_logits"] = {"kernel": jnp.zeros_like(head["z_logits"]["kernel"]), "bias": bias}
    head["w_logits"] = {"kernel": jnp.zeros_like(head["w_logits"]["kernel"]), "bias": w}
    z_rep, _ = model.encoder_fn(state["encoder"], False)(params["encoder"], _images(4))
    q = np.asarray(model.heads["task0"].apply({"params": head}, z_rep, method="expert_weights"))
    want = np.zeros((4, e_num))
    want[:, list(picks)] = _softmax(w)
    np.testing.assert_allclose(q, want, atol=1e-6)


# --------------------------------------------------------------------------- learning


def _synthetic(n: int, tasks, seed: int):
    """Images and per-task labels ``argmax(x W_k)``: learnable, different for every task."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    proj = np.random.default_rng(99)  # the same labelling rule for train and test
    ys = {}
    for t in tasks:
        w = proj.normal(size=(int(np.prod(SHAPE)), t.num_classes))
        ys[t.name] = jnp.asarray(np.argmax(x.reshape(n, -1) @ w, axis=1))
    return jnp.asarray(x), ys


def _train(model, tasks, steps: int, seed: int = 0):
    """PCGrad on the encoder rows, Adam on everything; returns (first loss, last loss, acc)."""
    params, state = model.split(_init(model, seed))
    grad_fn = mtl.value_and_grads(
        mtl.TrunkAndHeads(
            model.encoder_fn(state["encoder"], train=True),
            head_loss_fns(model, state["heads"], train=True),
        ),
        has_aux=True,
    )
    method = mtl.get_method("pcgrad", num_tasks=len(tasks), seed=seed)
    tx = optax.chain(
        mtl.shared_rows(method.transform, {"trunk": False, "heads": True}), optax.adam(3e-3)
    )
    p = {"trunk": params["encoder"], "heads": params["heads"]}
    x_train, y_train = _synthetic(1024, tasks, seed=1)
    x_test, y_test = _synthetic(512, tasks, seed=2)

    @jax.jit
    def step(p, opt_state, i):
        idx = (i * 64 + jnp.arange(64)) % 1024
        (losses, _), grads = grad_fn(p, x_train[idx], {n: y[idx] for n, y in y_train.items()})
        updates, opt_state = tx.update(grads, opt_state, p, task_losses=losses)
        return optax.apply_updates(p, updates), opt_state, jnp.sum(losses)

    opt_state = tx.init(p)
    first = None
    for i in range(steps):
        p, opt_state, loss = step(p, opt_state, i)
        first = float(loss) if first is None else first
    merged = model.merge({"encoder": p["trunk"], "heads": p["heads"]}, state)
    preds = _apply(model, merged, x_test)
    acc = {t.name: float(jnp.mean(jnp.argmax(preds[t.name], -1) == y_test[t.name])) for t in tasks}
    return first, float(loss), acc


@pytest.mark.parametrize("name", list(BUILDERS))
def test_learns_with_pcgrad(name):
    tasks = tuple(TaskSpec(f"task{i}", "classification", 4) for i in range(2))
    first, last, acc = _train(_model(name, tasks, expert_sizes=(32,), tower_hidden=16), tasks, 300)
    assert last < 0.6 * first, (first, last)
    assert min(acc.values()) > 0.25 + 0.2, acc  # chance is 0.25
