"""Recon (mtl_jax.recon): scores, selection and controls, branching with BatchNorm, costs, reports.

References: hand-written two-branch models (Linen and NNX) for ``branch`` + ``per_task``; a NumPy
recount of logged per-layer cosines for the scores; per-task ``jax.grad`` for the gradients; the
paper's Table 6 numbers for the reduction %.
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
from mtl_jax import recon
from mtl_jax.sharing import COPIED, SHARED, per_task, shared_view
from tests._programs import has_task_by_task_value, temp_bytes, traced_shapes
from tests.test_grads_cut import plain_loss_vector_grads

K, B, D, H = 2, 8, 4, 16


def _close(a, b, **kw):
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, **{"rtol": 1e-5, "atol": 1e-5, **kw}), a, b
    )


def _x(n=B, d=D, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Linen: a BN net, and the same net written by hand with two branches


def _bn(train, name):
    return nn.BatchNorm(use_running_average=not train, momentum=0.5, name=name)


class Net(nn.Module):
    width: int = H

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(_bn(train, "bn0")(nn.Dense(self.width, name="trunk")(x)))
        x = nn.relu(_bn(train, "bn1")(nn.Dense(self.width, name="branch")(x)))
        return nn.Dense(2, name="out")(x)


class TwoBranch(nn.Module):
    """Net with per-task ``branch`` and ``bn1`` written out; ``out`` is shared by both streams."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(_bn(train, "bn0")(nn.Dense(H, name="trunk")(x)))
        out = nn.Dense(2, name="out")
        streams = []
        for t in range(K):
            h = nn.relu(_bn(train, f"bn1_{t}")(nn.Dense(H, name=f"branch_{t}")(x)))
            streams.append(out(h))
        return jnp.stack(streams)


def _hand_variables(branched):
    """TwoBranch's variables from branched Net variables (rows of the copied leaves)."""
    row = lambda tree, t: jax.tree.map(lambda v: v[t], tree)
    p, s = branched["params"], branched["batch_stats"]
    params = {"trunk": p["trunk"], "bn0": p["bn0"], "out": p["out"]}
    for v in jax.tree.leaves(s["bn0"]):  # before the branch: K identical rows of statistics
        np.testing.assert_array_equal(v, jnp.broadcast_to(v[0], v.shape))
    stats = {"bn0": row(s["bn0"], 0)}
    for t in range(K):
        params[f"branch_{t}"] = row(p["branch"], t)
        params[f"bn1_{t}"] = row(p["bn1"], t)
        stats[f"bn1_{t}"] = row(s["bn1"], t)
    return {"params": params, "batch_stats": stats}


def _bump_stats(variables, seed=1, per_copy=("bn1",)):
    """Non-trivial running statistics, as after some training: different per copy for the
    layers ``per_copy`` (after the branch), the same in every row for the others."""
    rng = np.random.default_rng(seed)

    def bump(path, v):
        layer = jax.tree_util.keystr(path[:1], simple=True)
        shape = v.shape if layer in per_copy else v.shape[-1:]
        return v + jnp.asarray(rng.uniform(0.1, 0.5, size=shape), v.dtype)

    stats = jax.tree_util.tree_map_with_path(bump, variables["batch_stats"])
    return {**variables, "batch_stats": stats}


@pytest.mark.parametrize("init", ["copy", "fresh"])
def test_linen_branch_equals_hand_written_two_branch_model(init):
    model, x = Net(), _x()
    variables = model.init(jax.random.PRNGKey(0), x)
    fresh = (
        [model.init(jax.random.PRNGKey(100 + t), x) for t in range(K)] if init == "fresh" else None
    )
    branched, spec = recon.branch(
        variables, ["branch", "params/bn1"], K, init=init, fresh_variables=fresh
    )
    assert spec["params"]["branch"]["kernel"] is COPIED
    assert spec["batch_stats"]["bn1"]["mean"] is COPIED  # statistics follow their layer
    # every BatchNorm keeps per-task statistics (bn0's scale and bias stay shared)
    assert spec["params"]["bn0"]["scale"] is SHARED and spec["batch_stats"]["bn0"]["var"] is COPIED
    assert branched["batch_stats"]["bn1"]["var"].shape == (K, H)
    assert branched["params"]["bn0"]["bias"].shape == (H,)
    np.testing.assert_array_equal(  # unchosen layers' statistics: copies of the given ones
        branched["batch_stats"]["bn0"]["mean"][1], variables["batch_stats"]["bn0"]["mean"]
    )
    if init == "fresh":  # copy t comes from the t-th fresh initialisation, shared layers do not
        for t in range(K):
            np.testing.assert_array_equal(
                branched["params"]["branch"]["kernel"][t], fresh[t]["params"]["branch"]["kernel"]
            )
        np.testing.assert_array_equal(
            branched["params"]["trunk"]["kernel"], variables["params"]["trunk"]["kernel"]
        )
    else:  # make the copies differ, as after training
        branched["params"]["branch"]["kernel"] = branched["params"]["branch"]["kernel"] * (
            jnp.arange(1.0, K + 1.0).reshape(K, 1, 1)
        )
    branched = _bump_stats(branched)

    apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    outs, state = jax.jit(per_task(apply, spec, K, has_state=True))(branched, x)
    hand_vars = _hand_variables(branched)
    ref, ref_state = TwoBranch().apply(hand_vars, x, train=True, mutable=["batch_stats"])
    _close(outs, ref)
    assert not np.allclose(outs[0], outs[1])
    for t in range(K):  # per-task statistics of the branched BatchNorm
        _close(
            jax.tree.map(lambda v: v[t], state["batch_stats"]["bn1"]),
            ref_state["batch_stats"][f"bn1_{t}"],
        )
    for v, ref_v in zip(
        jax.tree.leaves(state["batch_stats"]["bn0"]),
        jax.tree.leaves(ref_state["batch_stats"]["bn0"]),
        strict=True,
    ):  # before the branch: K bit-identical rows (the same computation), equal to the hand model
        np.testing.assert_array_equal(v, jnp.broadcast_to(v[0], v.shape))
        _close(v[0], ref_v)
    # evaluation mode uses each copy's running statistics
    ev = per_task(lambda v, x: model.apply(v, x, train=False), spec, K)(branched, x)
    _close(ev, TwoBranch().apply(hand_vars, x, train=False))


def _dot_generals(jaxpr):
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes.extend(_dot_generals(inner))
    return shapes


def test_shared_prefix_before_the_first_branched_layer_runs_once():
    model, x = Net(), _x()
    branched, spec = recon.branch(model.init(jax.random.PRNGKey(0), x), ["branch", "bn1"], K)
    apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    jaxpr = jax.make_jaxpr(per_task(apply, spec, K, has_state=True))(branched, x).jaxpr
    shapes = _dot_generals(jaxpr)
    assert shapes[0] == (B, H)  # trunk: once, no task axis
    assert len(shapes) == 3 and all(K in s for s in shapes[1:]), shapes  # branch, out: per task


# ---------------------------------------------------------------------------------------------
# Gradients of the branched model: own-task gradients, O(K) memory, one optimizer


def _linen_training_problem(num_tasks: int = K, width: int = H):
    model, x = Net(width), _x()
    branched, spec = recon.branch(
        model.init(jax.random.PRNGKey(0), x), ["branch", "bn1"], num_tasks
    )
    branched["params"]["branch"]["kernel"] *= jnp.arange(1.0, num_tasks + 1.0).reshape(-1, 1, 1)
    ys = jnp.asarray(np.random.default_rng(2).normal(size=(num_tasks, B, 2)), jnp.float32)
    forward = per_task(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        spec,
        num_tasks,
        has_state=True,
    )

    def losses(params, batch_stats, x, ys):
        outs, state = forward({"params": params, "batch_stats": batch_stats}, x)
        return jnp.mean((outs - ys) ** 2, axis=(1, 2)), state["batch_stats"]

    return branched, spec, x, ys, losses


@pytest.mark.slow
def test_copies_receive_only_their_own_task_gradient():
    branched, spec, x, ys, losses = _linen_training_problem()
    params, stats = branched["params"], branched["batch_stats"]
    grad_fn = jax.jit(mtl.value_and_grads(losses, spec["params"], has_aux=True))
    (vals, new_stats), grads = grad_fn(params, stats, x, ys)
    assert new_stats["bn1"]["mean"].shape == (K, H)
    for t in range(K):
        ref = jax.grad(lambda p: losses(p, stats, x, ys)[0][t])(params)
        for layer in ("branch", "bn1"):
            for name, g in grads[layer].items():
                assert g.shape == params[layer][name].shape  # [K, ...]: one copy axis only
                _close(g[t], ref[layer][name][t])
                other = ref[layer][name][1 - t]  # task t's loss never reaches the other copy
                assert np.count_nonzero(other) == 0
        for layer in ("trunk", "bn0", "out"):  # shared layers: row t is task t's gradient
            _close(jax.tree.map(lambda g: g[t], grads[layer]), ref[layer])

    # one optimizer for everything; the aggregator sees only the remaining shared parameters
    tx = optax.chain(mtl.shared_rows(mtl.aggregation.pcgrad(), spec["params"]), optax.sgd(0.1))
    opt_state = tx.init(params)
    updates, _ = tx.update(grads, opt_state, params, task_losses=vals)
    _close(updates["branch"], jax.tree.map(lambda g: -0.1 * g, grads["branch"]))
    assert updates["trunk"]["kernel"].shape == (D, H)


def test_copied_leaf_gradients_are_o_k_in_the_compiled_program():
    """The traced program still computes the copies' task-by-task rows; XLA drops them. So the
    check reads the compiled scratch memory (not XLA's printed HLO): below one task-by-task
    Jacobian of the branched kernel, which the full Jacobian path does hold. The problem is wide
    and has four tasks so that buffer dominates everything else (new: ~2 copies of ``[K, W, W]``;
    the bound: ``K`` of them)."""
    num_tasks, width = 4, 128
    branched, spec, x, ys, losses = _linen_training_problem(num_tasks, width)
    args = (branched["params"], branched["batch_stats"], x, ys)
    new = mtl.value_and_grads(losses, spec["params"], has_aux=True)
    old = plain_loss_vector_grads(losses, False, has_aux=True)  # K pullbacks of the whole vector
    task_by_task_bytes = num_tasks * num_tasks * width * width * 4  # f32[K, K, W, W]
    assert temp_bytes(old, *args) >= task_by_task_bytes  # the check can see the buffer
    assert temp_bytes(new, *args) < task_by_task_bytes
    assert jax.eval_shape(new, *args)[1]["branch"]["kernel"].shape == (num_tasks, width, width)


# ---------------------------------------------------------------------------------------------
# NNX


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Linear(D, H, rngs=rngs)
        self.bn0 = nnx.BatchNorm(H, momentum=0.5, rngs=rngs)
        self.branch = nnx.Linear(H, H, rngs=rngs)
        self.bn1 = nnx.BatchNorm(H, momentum=0.5, rngs=rngs)
        self.out = nnx.Linear(H, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.trunk(x)))
        return self.out(nnx.relu(self.bn1(self.branch(x))))


class NNXTwoBranch(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Linear(D, H, rngs=rngs)
        self.bn0 = nnx.BatchNorm(H, momentum=0.5, rngs=rngs)
        self.branch_0 = nnx.Linear(H, H, rngs=rngs)
        self.branch_1 = nnx.Linear(H, H, rngs=rngs)
        self.bn1_0 = nnx.BatchNorm(H, momentum=0.5, rngs=rngs)
        self.bn1_1 = nnx.BatchNorm(H, momentum=0.5, rngs=rngs)
        self.out = nnx.Linear(H, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.trunk(x)))
        h = [nnx.relu(self.bn1_0(self.branch_0(x))), nnx.relu(self.bn1_1(self.branch_1(x)))]
        return jnp.stack([self.out(v) for v in h])


def _load(module, layer_state, t=None):
    for name, var in layer_state.items():
        value = var[...]
        getattr(module, name).set_value(value if t is None else value[t])


def test_nnx_branch_equals_hand_written_two_branch_model():
    graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
    fresh = [nnx.split(NNXNet(nnx.Rngs(10 + t)))[1] for t in range(K)]
    branched, spec = recon.branch(state, ["branch", "bn1"], K, init="fresh", fresh_variables=fresh)
    assert branched["bn1"]["mean"][...].shape == (K, H)
    params, stats = nnx.split_state(branched, nnx.Param, nnx.BatchStat)
    pspec, sspec = nnx.split_state(spec, nnx.Param, nnx.BatchStat)
    x = _x()

    def apply(variables, x):
        model = nnx.merge(graphdef, *variables, copy=True)
        return model(x), nnx.state(model, nnx.BatchStat)

    forward = jax.jit(per_task(apply, (pspec, sspec), K, has_state=True))
    outs, new_stats = forward((params, stats), x)

    hand = NNXTwoBranch(nnx.Rngs(0))
    for name in ("trunk", "bn0", "out"):
        _load(getattr(hand, name), branched[name])
    for t in range(K):
        _load(getattr(hand, f"branch_{t}"), branched["branch"], t)
        _load(getattr(hand, f"bn1_{t}"), branched["bn1"], t)
    ref = hand(x)  # train mode: updates the hand model's running statistics
    _close(outs, ref)
    for t in range(K):
        _close(new_stats["bn1"]["mean"][...][t], getattr(hand, f"bn1_{t}").mean[...])
        _close(new_stats["bn1"]["var"][...][t], getattr(hand, f"bn1_{t}").var[...])
    _close(new_stats["bn0"]["mean"][...], hand.bn0.mean[...])

    # the gradient tree: copies [K, ...] with their own task's gradient
    ys = jnp.ones((K, B, 2))
    losses = lambda p: jnp.mean((forward((p, stats), x)[0] - ys) ** 2, axis=(1, 2))
    _, grads = mtl.value_and_grads(losses, pspec)(params)
    assert grads["branch"]["kernel"][...].shape == (K, H, H)
    assert grads["trunk"]["kernel"][...].shape == (K, D, H)
    for t in range(K):
        ref_t = jax.grad(lambda p: losses(p)[t])(params)
        _close(grads["branch"]["kernel"][...][t], ref_t["branch"]["kernel"][...][t])


# ---------------------------------------------------------------------------------------------
# Scores: a NumPy recount of logged per-layer cosines


def test_scores_equal_a_numpy_recount_of_logged_cosines():
    num_tasks, severity, steps = 3, -0.1, 12
    rng = np.random.default_rng(0)
    shapes = {
        "Conv_0": {"kernel": (3, 3, 1, 2), "bias": (2,)},
        "BatchNorm_0": {"scale": (2,), "bias": (2,)},
        "Dense_0": {"kernel": (8, 3), "bias": (3,)},
    }
    params = jax.tree.map(lambda s: jnp.zeros(s), shapes, is_leaf=lambda s: isinstance(s, tuple))
    tracker = recon.search_tracker(num_tasks, severity)
    update = jax.jit(tracker.update)
    cstate = tracker.init(params)
    expected = dict.fromkeys(["Conv_0", "BatchNorm_0", "Dense_0"], 0)
    for _ in range(steps):
        jac = jax.tree.map(
            lambda s: jnp.asarray(rng.normal(size=(num_tasks, *s)), jnp.float32),
            shapes,
            is_leaf=lambda s: isinstance(s, tuple),
        )
        cstate = update(cstate, jac)
        for layer, leaves in jac.items():
            # a layer = its leaves flattened and concatenated (kernel and bias together)
            g = np.concatenate([np.asarray(v).reshape(num_tasks, -1) for v in leaves.values()], 1)
            for i in range(num_tasks):
                for j in range(i + 1, num_tasks):
                    cos = g[i] @ g[j] / (np.linalg.norm(g[i]) * np.linalg.norm(g[j]))
                    expected[layer] += int(cos < severity)
    scores = recon.layer_scores(tracker, cstate)
    assert scores == expected
    assert sum(expected.values()) > 0  # the test exercises counting


def test_score_is_strict_and_counts_events_not_rates():
    tracker = recon.search_tracker(2, severity=0.0)
    params = {"a": {"w": jnp.zeros(2)}, "b": {"w": jnp.zeros(2)}}
    orth = {"a": {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}, "b": {"w": -jnp.eye(2)[:, ::-1]}}
    # layer a: cos = 0 exactly (not < 0); layer b: rows [0,-1] and [-1,0]: cos = 0 too
    opposite = {"a": {"w": jnp.array([[1.0, 0.0], [-1.0, 0.0]])}, "b": {"w": jnp.eye(2)}}
    cstate = tracker.init(params)
    for jac in (orth, opposite, opposite):
        cstate = tracker.update(cstate, jac)
    assert recon.layer_scores(tracker, cstate) == {"a": 2, "b": 0}


# ---------------------------------------------------------------------------------------------
# Selection and controls


def test_select_layers_top_k_ties_and_budget():
    scores = {"conv1": 5, "bn1": 9, "conv2": 5, "bn2": 0, "fc": 7}
    assert recon.select_layers(scores, k=3) == ["bn1", "fc", "conv1"]  # tie: parameter order
    assert recon.select_layers(scores, k=0) == []
    sizes = {"conv1": 100, "bn1": 4, "conv2": 200, "bn2": 4, "fc": 50}
    assert recon.select_layers(scores, budget=160, sizes=sizes) == ["bn1", "fc", "conv1", "bn2"]
    # down the ranking, every layer that still fits: conv1 (100) and conv2 (200) do not fit
    # after bn1 + fc (54), bn2 (4) does
    assert recon.select_layers(scores, budget=150, sizes=sizes) == ["bn1", "fc", "bn2"]
    assert recon.select_layers(scores, budget=3, sizes=sizes) == []  # no layer fits
    # k caps the chosen layers, not the ranking: the 2nd chosen is bn2 (5th ranked)
    assert recon.select_layers(scores, k=2, budget=10, sizes=sizes) == ["bn1", "bn2"]
    assert recon.select_layers(scores, k=1, budget=1000, sizes=sizes) == ["bn1"]
    with pytest.raises(ValueError, match="needs sizes"):
        recon.select_layers(scores, budget=10)
    with pytest.raises(ValueError, match=r"k must be in \[0, 5\]"):
        recon.select_layers(scores, k=6)


def test_layer_sizes_and_parameter_increase():
    model, x = Net(), _x()
    variables = model.init(jax.random.PRNGKey(0), x)
    sizes = recon.layer_sizes(variables["params"])
    assert sizes == {
        "trunk": D * H + H,
        "bn0": 2 * H,
        "branch": H * H + H,
        "bn1": 2 * H,
        "out": 2 * H + 2,
    }
    branched, _ = recon.branch(variables, ["branch", "bn1"], 3)
    inc = recon.parameter_increase(variables["params"], branched["params"])
    total = sum(sizes.values())
    assert inc["before"] == total
    assert inc["absolute"] == 2 * (sizes["branch"] + sizes["bn1"])  # (K - 1) x the layers
    assert inc["percent"] == pytest.approx(100 * inc["absolute"] / total)


def test_random_controls():
    layers = [f"l{i}" for i in range(20)]
    rsl = recon.random_layers(layers, 5, seed=0)
    assert len(set(rsl)) == 5 and set(rsl) <= set(layers)
    assert rsl == recon.random_layers(layers, 5, seed=0)
    assert any(recon.random_layers(layers, 5, seed=s) != rsl for s in range(1, 4))

    rng = np.random.default_rng(0)
    sizes = {name: int(rng.choice([4, 16, 100, 1000])) for name in layers}
    target = 1130
    for seed in range(5):
        chosen = recon.random_parameters(sizes, target, seed=seed)
        count = sum(sizes[n] for n in chosen)
        assert count <= target
        left = [sizes[n] for n in layers if n not in chosen]
        assert not left or min(left) > target - count  # nothing else fits: maximal
    picks = {tuple(recon.random_parameters(sizes, target, seed=s)) for s in range(5)}
    assert len(picks) > 1


# ---------------------------------------------------------------------------------------------
# Branch errors and the spec


def test_branch_errors():
    model, x = Net(), _x()
    variables = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"Layers not found: \['Conv_9'\].*branch"):
        recon.branch(variables, ["Conv_9"], K)
    with pytest.raises(ValueError, match="fresh_variables: 2 variable trees"):
        recon.branch(variables, ["branch"], K, init="fresh", fresh_variables=[variables])
    with pytest.raises(ValueError, match="'copy'.*'fresh'"):
        recon.branch(variables, ["branch"], K, init="random")
    other = Net().init(jax.random.PRNGKey(1), _x(d=D + 1))
    with pytest.raises(ValueError, match=r"fresh_variables\[0\] does not have the structure"):
        recon.branch(variables, ["branch"], K, init="fresh", fresh_variables=[other, other])


def test_branched_layers_of_a_spec():
    model, x = Net(), _x()
    _, spec = recon.branch(model.init(jax.random.PRNGKey(0), x), ["bn1", "branch"], K)
    assert set(recon.branched_layers(spec)) == {"bn1", "branch"}


# ---------------------------------------------------------------------------------------------
# Histograms of the remaining shared parameters, reduction %


def test_histograms_fraction_below_and_reduction():
    counts = np.array([80, 6, 4, 3, 7])  # RECON_BINS: [0,1], [-0.01,0), ..., [-1,-0.03)
    np.testing.assert_allclose(recon.histogram_percent(counts), counts)
    assert recon.fraction_below(counts, -0.01) == pytest.approx(0.14)  # a share, not %
    assert recon.fraction_below(counts, 0.0) == pytest.approx(0.20)
    assert recon.fraction_below(counts, -0.03) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="not an inner bin edge"):
        recon.fraction_below(counts, -0.015)
    assert recon.fraction_below(np.zeros(5), -0.01) == 0.0
    # Table 6: joint 12.56% below -0.01 -> Joint + Recon 3.79%: a 69.8% reduction
    assert recon.reduction_percent(12.56, 3.79) == pytest.approx(69.8, abs=0.05)
    assert recon.reduction_percent(10.0, 15.29) == pytest.approx(-52.9)


def test_tracker_on_the_remaining_shared_parameters():
    branched, spec, x, ys, losses = _linen_training_problem()
    params, stats = branched["params"], branched["batch_stats"]
    tracker = recon.search_tracker(K, severity=-0.01)
    cstate = tracker.init(shared_view(params, spec["params"]))
    assert set(tracker.groups(shared_view(params, spec["params"]))) == {
        "global",
        "trunk",
        "bn0",
        "out",
    }
    _, grads = mtl.value_and_grads(losses, spec["params"], has_aux=True)(params, stats, x, ys)
    cstate = tracker.update(cstate, shared_view(grads, spec["params"]))
    hist = np.asarray(cstate.histogram["global"])
    assert hist.sum() == 1  # one step, one pair
    # the global cosine is over the remaining shared parameters only
    rows = np.concatenate(
        [
            np.asarray(g).reshape(K, -1)
            for layer in ("bn0", "out", "trunk")
            for g in jax.tree.leaves(grads[layer])
        ],
        axis=1,
    )
    cos = rows[0] @ rows[1] / np.linalg.norm(rows[0]) / np.linalg.norm(rows[1])
    np.testing.assert_allclose(cstate.last_mean_cos["global"], cos, rtol=1e-4)


def test_per_task_grads_on_the_branched_batchnorm_model():
    """The gradient inside the task vmap: same losses, gradients and per-task statistics as
    value_and_grads of the joint loss vector, and no [K, K, ...] value in the traced program.
    Three tasks, so no task axis can be mistaken for the output layer's width of 2."""
    k = 3
    branched, spec, x, ys, losses = _linen_training_problem(num_tasks=k)
    params, stats = branched["params"], branched["batch_stats"]
    model = Net()

    def task_loss(view, stats_t, t, x, ys):
        out, new = model.apply(
            {"params": view, "batch_stats": stats_t}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean((out - ys[t]) ** 2), new["batch_stats"]

    fn = mtl.value_and_grads(
        mtl.PerTaskLosses(
            task_loss, spec["params"], k, has_state=True, state_spec=spec["batch_stats"]
        )
    )
    (vals, new_stats), grads = jax.jit(fn)(params, stats, x, ys)
    (ref_vals, ref_stats), ref = mtl.value_and_grads(losses, spec["params"], has_aux=True)(
        params, stats, x, ys
    )
    _close(vals, ref_vals)
    _close(new_stats, ref_stats)
    _close(grads, ref)
    assert new_stats["bn1"]["mean"].shape == (k, H) and new_stats["bn0"]["mean"].shape == (k, H)
    rows = np.asarray(new_stats["bn0"]["var"])  # before the branch: bit-identical rows
    np.testing.assert_array_equal(rows, np.broadcast_to(rows[0], rows.shape))
    joint = plain_loss_vector_grads(losses, spec["params"], has_aux=True)  # [K, K, ...]
    assert has_task_by_task_value(traced_shapes(joint, params, stats, x, ys), k)
    cut = mtl.value_and_grads(losses, spec["params"], has_aux=True)  # at the cut (issue 25): none
    assert not has_task_by_task_value(traced_shapes(cut, params, stats, x, ys), k)
    assert not has_task_by_task_value(traced_shapes(fn, params, stats, x, ys), k)
    with pytest.raises(ValueError, match="batch_stats/bn1/mean.*copied per task"):
        mtl.value_and_grads(mtl.PerTaskLosses(task_loss, spec["params"], k, has_state=True))(
            params, {"batch_stats": stats}, x, ys
        )


# ---------------------------------------------------------------------------------------------
# Exact layer paths: ResNet-18's stem `bn1` is not `layer1_0/bn1` (issue 20, item 2)


def _resnet18():
    from experiments.models.resnet import ResNetEncoder

    model = ResNetEncoder(stem="cifar", width=8, feature_dim=0)
    x = _x(n=4, d=8 * 8).reshape(4, 8, 8, 1)
    return model, x, model.init(jax.random.PRNGKey(0), x, train=False)


_RESNET_SUBSETS = [
    pytest.param(["layer1_0/bn1"], False, id="layer1_0.bn1"),
    pytest.param(["bn1"], False, id="bn1"),
    pytest.param(["bn1", "layer1_0/bn1"], False, id="both"),
    pytest.param("random", False, id="random"),
    pytest.param(["layer1_0/bn1"], True, id="layer1_0.bn1-values", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("layers", "run"), _RESNET_SUBSETS)
def test_resnet18_layers_are_matched_on_exact_paths(layers, run):
    """Traced only (eval_shape) to stay fast; the `-values` case runs and compares numbers."""
    model, x, variables = _resnet18()
    if layers == "random":
        layers = recon.random_layers(mtl.sharing.layer_names(variables), k=6, seed=3)
        layers = sorted({*layers, "layer1_0/bn1"})
    branched, spec = recon.branch(variables, layers, K)
    assert set(recon.branched_layers(spec)) == set(layers)
    for name in ("bn1", "layer1_0/bn1"):  # only the named one has per-task scale
        scale = branched["params"]
        for part in name.split("/"):
            scale = scale[part]
        assert scale["scale"].ndim == (2 if name in layers else 1)

    def apply(v, x):  # returns the statistics without their collection
        out, new = model.apply(v, x, train=True, mutable=["batch_stats"])
        return out, new["batch_stats"]

    forward = per_task(apply, spec, K, has_state=True)
    outs, stats = jax.jit(forward)(branched, x) if run else jax.eval_shape(forward, branched, x)
    for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
        assert leaf.shape[0] == K, jax.tree_util.keystr(path)  # none mis-marked shared
    if run:
        ref_out, ref_new = model.apply(
            mtl.sharing.task_params(branched, spec, 1), x, train=True, mutable=["batch_stats"]
        )
        _close(outs[1], ref_out, rtol=1e-4, atol=1e-4)
        _close(jax.tree.map(lambda v: v[1], stats), ref_new["batch_stats"], rtol=1e-4, atol=1e-4)

    # a spec over the chosen layers only (layer_spec): no false refusal of the other `bn1`
    lspec = mtl.sharing.layer_spec(variables, layers)
    stacked = mtl.sharing.copy_per_task(variables, lspec, K)
    fwd = per_task(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
        lspec,
        K,
        has_state=True,
        state_reduction="mean",
    )
    jax.eval_shape(fwd, stacked, x)

    # per_task_grads with a parameter spec and no state spec: exactly the chosen BatchNorms'
    # uncopied statistics are refused, never a namesake's
    def task_loss(view, stats_t, t, x):
        out, new = model.apply({"params": view, **stats_t}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(out**2), new

    state = {"batch_stats": variables["batch_stats"]}
    grads_fn = mtl.value_and_grads(mtl.PerTaskLosses(task_loss, lspec["params"], K, has_state=True))
    with pytest.raises(ValueError, match=r"State leaves \[batch_stats/") as err:
        jax.eval_shape(grads_fn, stacked["params"], state, x)
    named = str(err.value).split("]")[0]  # bn1 sorts first, so the listing never cuts it
    assert ("batch_stats/bn1/mean" in named) == ("bn1" in layers)
    assert ("batch_stats/layer1_0/bn1/mean" in named) == ("layer1_0/bn1" in layers)
    fn = mtl.value_and_grads(
        mtl.PerTaskLosses(
            task_loss,
            spec["params"],
            K,
            has_state=True,
            state_spec={"batch_stats": spec["batch_stats"]},
        )
    )
    (losses, new_state), _ = jax.eval_shape(
        fn, branched["params"], {"batch_stats": branched["batch_stats"]}, x
    )
    assert losses.shape == (K,) and new_state["batch_stats"]["bn1"]["mean"].shape == (K, 8)
