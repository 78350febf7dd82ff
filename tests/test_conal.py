"""CoNAL / CoNAL-Pro (mtl_jax.conal): the supernet against a naive P x K reference, the nocl rule,
the jitted search step, discretisation and parameter counts, the controlled-conflict synthetic
search, and the progressive (Pro) search.

The naive reference computes, for every task k and branch point p, the explicit path
"shared blocks 0..p-1, then task k's own blocks p..B-1" with the Linen modules, and mixes the P
outputs with the task's weights (the paper's relaxation, the official ``model.py``).
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
from mtl_jax import conal


class Tanh(nn.Module):
    width: int = 6

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.width)(x))


class Affine(nn.Module):
    width: int = 6

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.width)(x)


class BNBlock(nn.Module):
    width: int = 6

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.width)(x)
        return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))


def naive_features(modules, params, x, weights):
    """Plain reference: ``z_k = sum_p w_kp path_{k,p}(x)``, every path computed separately."""
    weights = np.asarray(weights)
    k, p_count = weights.shape
    out = []
    for t in range(k):
        z = 0.0
        for p in range(p_count):
            h = x
            for b, module in enumerate(modules):
                if b < p:
                    v = params["shared"][b]
                else:
                    v = jax.tree.map(lambda a, t=t: a[t], params["private"][b])
                h = module.apply({"params": v}, h)
            z = z + weights[t, p] * np.asarray(h, np.float64)
        out.append(z)
    return np.stack(out)


def _feature_tree(blocks, arch):
    """The retrain tree with identity heads: ``apply`` gives every task's encoder feature."""
    heads = {f"t{t}": (lambda params, z, train: z) for t in range(arch.num_tasks)}
    return conal.TreeModel(blocks, arch, heads)


def _tree_params(tree, supernet_tree):
    """Tree params (or state) from the supernet's, plus the (empty) identity heads."""
    return {
        **conal.inherit_params(supernet_tree, tree.arch),
        "heads": {name: {} for name in tree.heads},
    }


def _random_weights(key, k, p):
    return jax.nn.softmax(2.0 * jax.random.normal(key, (k, p)), axis=-1)


def _setup(module_cls, k=3, nb=3, mixing="stream", seed=0):
    modules = [module_cls() for _ in range(nb)]
    sn = conal.Supernet([conal.linen_block(m) for m in modules], k, mixing=mixing)
    x = jax.random.normal(jax.random.PRNGKey(seed + 7), (5, 4))
    params, state = sn.init(jax.random.PRNGKey(seed), x)
    return modules, sn, x, params, state


# ---------------------------------------------------------------------------------------------
# Supernet semantics


def test_paths_mixing_equals_naive_reference_on_nonlinear_blocks():
    modules, sn, x, params, state = _setup(Tanh, mixing="paths")
    w = _random_weights(jax.random.PRNGKey(3), 3, 4)
    z, _ = sn.apply(params, state, x, w)
    np.testing.assert_allclose(z, naive_features(modules, params, x, w), rtol=1e-5, atol=1e-6)


def test_stream_mixing_equals_naive_reference_on_affine_blocks():
    modules, sn, x, params, state = _setup(Affine, mixing="stream")
    w = _random_weights(jax.random.PRNGKey(4), 3, 4)
    z, _ = sn.apply(params, state, x, w)
    np.testing.assert_allclose(z, naive_features(modules, params, x, w), rtol=1e-4, atol=1e-5)


def test_stream_mixing_is_a_relaxation_on_nonlinear_blocks():
    # documented: not the P-path mixture for non-linear blocks at non-one-hot weights
    modules, sn, x, params, state = _setup(Tanh, mixing="stream")
    w = _random_weights(jax.random.PRNGKey(5), 3, 4)
    z, _ = sn.apply(params, state, x, w)
    assert np.max(np.abs(np.asarray(z) - naive_features(modules, params, x, w))) > 1e-3


@pytest.mark.parametrize("mixing", ["stream", "paths"])
def test_one_hot_weights_recover_the_discrete_architecture(mixing):
    modules, sn, x, params, state = _setup(Tanh, k=4, mixing=mixing)
    bps = (0, 2, 3, 2)
    w = jax.nn.one_hot(jnp.array(bps), 4)
    z, _ = sn.apply(params, state, x, w)
    ref = naive_features(modules, params, x, w)
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6)
    for grouped in (False, True):
        arch = conal.Architecture(bps, 3, grouped=grouped)
        blocks = sn.blocks
        # ungrouped: every task its own copy = the supernet's; grouped: tasks 1 and 3 (branch
        # point 2) share task 1's copy, so task 3's reference uses task 1's private blocks
        tree = _feature_tree(blocks, arch)
        out = tree.predict(_tree_params(tree, params), conal.inherit_params(state, arch), x)
        feats = np.stack([out[name] for name in tree.task_names])
        expected = ref.copy()
        if grouped:
            expected[3] = ref[1]
        np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixing", ["stream", "paths"])
def test_scan_and_unroll_task_maps_equal_vmap(mixing):
    _, sn, x, params, state = _setup(BNBlock, k=3, mixing=mixing)
    w = _random_weights(jax.random.PRNGKey(1), 3, 4)
    for task_map in ("scan", "unroll"):
        other = conal.Supernet(sn.blocks, 3, mixing=mixing, task_map=task_map)
        for train in (False, True):
            a = sn.apply(params, state, x, w, train=train)
            b = other.apply(params, state, x, w, train=train)
            jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a, b)
    with pytest.raises(ValueError, match="task_map"):
        conal.Supernet(sn.blocks, 3, task_map="loop")


def test_supernet_shapes_and_errors():
    _, sn, x, params, state = _setup(Tanh, k=2, nb=2)
    assert params["alpha"].shape == (2, 3)
    np.testing.assert_array_equal(params["alpha"], 1.0)  # uniform softmax, as the official code
    assert jax.tree.leaves(params["private"][0])[0].shape[0] == 2
    assert not np.allclose(  # every task copy has its own random init
        params["private"][0]["Dense_0"]["kernel"][0], params["private"][0]["Dense_0"]["kernel"][1]
    )
    with pytest.raises(ValueError, match=r"weights must be \[K, P\]"):
        sn.apply(params, state, x, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="mixing"):
        conal.Supernet(sn.blocks, 2, mixing="bogus")
    with pytest.raises(ValueError, match="num_tasks"):
        conal.Supernet(sn.blocks, 0)


def test_batchnorm_state_shared_once_private_per_task():
    k = 3
    sn = conal.Supernet([conal.linen_block(BNBlock()) for _ in range(2)], k)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    params, state = sn.init(jax.random.PRNGKey(1), x)
    assert state["shared"][0]["batch_stats"]["BatchNorm_0"]["mean"].shape == (6,)
    assert state["private"][0]["batch_stats"]["BatchNorm_0"]["mean"].shape == (k, 6)
    w = _random_weights(jax.random.PRNGKey(2), k, 3)
    _, new = sn.apply(params, state, x, w, train=True)
    means = np.asarray(new["private"][1]["batch_stats"]["BatchNorm_0"]["mean"])
    assert not np.allclose(means[0], means[1])  # each task's copy saw its own stream
    assert not np.allclose(new["shared"][0]["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    _, same = sn.apply(params, state, x, w, train=False)
    jax.tree.map(np.testing.assert_array_equal, same, state)
    # paths mixing also runs with BatchNorm (per-path batch statistics)
    sn_p = conal.Supernet(sn.blocks, k, mixing="paths")
    z, new_p = sn_p.apply(params, state, x, w, train=True)
    assert z.shape == (k, 8, 6)
    assert jax.tree.structure(new_p) == jax.tree.structure(state)


class NNXBlock(nnx.Module):
    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, momentum=0.5, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.linear(x)))


def test_nnx_blocks_search_step_and_one_hot():
    blocks = [
        conal.nnx_block(lambda rngs: NNXBlock(4, 6, rngs=rngs), "first"),
        conal.nnx_block(lambda rngs: NNXBlock(6, 6, rngs=rngs), "second"),
    ]
    k = 2
    sn = conal.Supernet(blocks, k)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    params, state = sn.init(jax.random.PRNGKey(1), x)
    # one-hot at p = 1: shared first block, own second block (eval mode: running statistics)
    w = jax.nn.one_hot(jnp.array([1, 1]), 3)
    z, _ = sn.apply(params, state, x, w)
    for t in range(k):
        h, _ = blocks[0].apply(params["shared"][0], state["shared"][0], x, False)
        row = jax.tree.map(lambda a, t=t: a[t], (params["private"][1], state["private"][1]))
        h, _ = blocks[1].apply(*row, h, False)
        np.testing.assert_allclose(z[t], h, rtol=1e-5, atol=1e-6)

    def loss_fn(heads, feats, y):
        return jnp.mean((feats.mean(-1) - y) ** 2, axis=-1)

    search = conal.make_search(sn, loss_fn, conal.SearchConfig(weight_lr=1e-2, arch_lr=1e-2))
    st = search.init(jax.random.PRNGKey(2), x)
    step = jax.jit(search.step)
    y = jnp.stack([x[:, 0], -x[:, 0]])
    st2, metrics = step(st, (x, y), (x, y))
    assert metrics["alpha_softmax"].shape == (k, 3)
    assert not np.allclose(st2.params["alpha"], st.params["alpha"])
    old = jax.tree.leaves(st.model_state["private"])
    new = jax.tree.leaves(st2.model_state["private"])
    assert any(not np.allclose(a, b) for a, b in zip(old, new, strict=True))


# ---------------------------------------------------------------------------------------------
# The search step


def _readout_loss(width):
    r = jnp.ones((width,)) / np.sqrt(width)

    def loss_fn(heads, feats, y):  # a fixed readout: no head can undo a conflict
        return jnp.mean((feats @ r - y) ** 2, axis=1)

    return loss_fn


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_nocl_zeroes_conflicting_shared_blocks_and_passes_the_mean(sign):
    k, nb, width = 2, 2, 6
    modules, sn, x, _, _ = _setup(Tanh, k=k, nb=nb, mixing="paths")
    y = jnp.stack([x[:, 0], sign * x[:, 0]])
    loss_fn = _readout_loss(width)
    search = conal.make_search(
        sn,
        loss_fn,
        weight_optimizer=optax.sgd(1.0),
        arch_optimizer=optax.set_to_zero(),  # alpha fixed: the weight step sees uniform weights
    )
    st = search.init(jax.random.PRNGKey(0), x)
    new, metrics = jax.jit(search.step)(st, (x, y), (x, y))
    w = np.full((k, nb + 1), 1.0 / (nb + 1))

    # reference: each task's gradient of the naive mixture, per shared block
    def task_loss(shared, t):
        p = {**st.params, "shared": shared}
        z = _naive_jax(modules, p, x, w)
        return loss_fn(None, z, y)[t]

    grads = [jax.grad(task_loss)(st.params["shared"], t) for t in range(k)]
    conflicts = []
    for b in range(nb):
        g = [np.concatenate([np.ravel(a) for a in jax.tree.leaves(gt[b])]) for gt in grads]
        conflict = float(g[0] @ g[1]) < 0
        conflicts.append(conflict)
        expected = np.zeros_like(g[0]) if conflict else 0.5 * (g[0] + g[1])
        delta = np.concatenate(
            [
                np.ravel(a - b_)
                for a, b_ in zip(
                    jax.tree.leaves(new.params["shared"][b]),
                    jax.tree.leaves(st.params["shared"][b]),
                    strict=True,
                )
            ]
        )
        np.testing.assert_allclose(-delta, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(metrics["shared_conflict"], np.array(conflicts, np.float32))
    assert any(conflicts) == (sign < 0)  # the constructed conflict is seen, agreement is not

    # private copies: the gradient of the summed loss (not the last task's, as the official code)
    def summed(private):
        p = {**st.params, "private": private}
        return jnp.sum(loss_fn(None, _naive_jax(modules, p, x, w), y))

    g_priv = jax.grad(summed)(st.params["private"])
    jax.tree.map(
        lambda a, b_, g: np.testing.assert_allclose(b_ - a, g, rtol=1e-4, atol=1e-6),
        new.params["private"],
        st.params["private"],
        g_priv,
    )


def _naive_jax(modules, params, x, w):
    """The naive mixture in jnp (differentiable), same loops as naive_features."""
    k, p_count = w.shape
    out = []
    for t in range(k):
        z = 0.0
        for p in range(p_count):
            h = x
            for b, module in enumerate(modules):
                v = (
                    params["shared"][b]
                    if b < p
                    else jax.tree.map(lambda a, t=t: a[t], params["private"][b])
                )
                h = module.apply({"params": v}, h)
            z = z + w[t, p] * h
        out.append(z)
    return jnp.stack(out)


def test_nocl_off_gives_shared_blocks_the_summed_gradient():
    k, nb = 2, 2
    modules, sn, x, _, _ = _setup(Tanh, k=k, nb=nb, mixing="paths")
    y = jnp.stack([x[:, 0], -x[:, 0]])
    loss_fn = _readout_loss(6)
    search = conal.make_search(
        sn,
        loss_fn,
        conal.SearchConfig(nocl=False),
        weight_optimizer=optax.sgd(1.0),
        arch_optimizer=optax.set_to_zero(),
    )
    st = search.init(jax.random.PRNGKey(0), x)
    new, metrics = jax.jit(search.step)(st, (x, y), (x, y))
    w = np.full((k, nb + 1), 1.0 / (nb + 1))

    def summed(shared):
        return jnp.sum(loss_fn(None, _naive_jax(modules, {**st.params, "shared": shared}, x, w), y))

    g = jax.grad(summed)(st.params["shared"])
    jax.tree.map(
        lambda a, b_, gg: np.testing.assert_allclose(b_ - a, gg, rtol=1e-4, atol=1e-6),
        new.params["shared"],
        st.params["shared"],
        g,
    )
    np.testing.assert_array_equal(metrics["shared_conflict"], 0.0)  # no Jacobian computed


def _count_eqns(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_eqns(sub)
    return n


def _step_program_size(k, mixing):
    sn = conal.Supernet([conal.linen_block(Tanh()) for _ in range(3)], k, mixing=mixing)
    search = conal.make_search(sn, _readout_loss(6))
    x = jnp.zeros((5, 4))
    st = search.init(jax.random.PRNGKey(0), x)
    y = jnp.zeros((k, 5))
    return _count_eqns(jax.make_jaxpr(search.step)(st, (x, y), (x, y)).jaxpr)


@pytest.mark.parametrize("mixing", ["stream", "paths"])
def test_search_step_has_no_per_task_unrolling(mixing):
    # the traced program does not grow with K: tasks (and paths) are vmapped, not unrolled
    assert _step_program_size(2, mixing) == _step_program_size(5, mixing)


def test_search_step_compiles_once_and_keeps_the_state_structure():
    _, sn, x, _, _ = _setup(Tanh, k=2)
    search = conal.make_search(sn, _readout_loss(6), conal.SearchConfig(gumbel=True))
    st = search.init(jax.random.PRNGKey(0), x)
    step = jax.jit(search.step)
    y = jnp.zeros((2, 5))
    st1, _ = step(st, (x, y), (x, y))
    st2, m = step(st1, (x, y), (x, y))
    assert step._cache_size() == 1
    assert jax.tree.structure(st2) == jax.tree.structure(st)
    for a, b in zip(jax.tree.leaves(st2), jax.tree.leaves(st), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert int(st2.step) == 2
    np.testing.assert_allclose(np.sum(m["alpha_softmax"], axis=1), 1.0, rtol=1e-6)


def test_branch_weights_gumbel_hard_is_one_hot_and_masked():
    alpha = jnp.zeros((3, 4))
    cand = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1]], bool)
    w = conal.branch_weights(alpha, cand, jax.random.PRNGKey(0), gumbel=True)
    np.testing.assert_allclose(np.sum(w, axis=1), 1.0, atol=1e-6)
    assert set(np.round(np.asarray(w), 6).ravel()) <= {0.0, 1.0}
    assert np.all(np.asarray(w)[~np.asarray(cand)] == 0)
    soft = conal.branch_weights(alpha, cand)
    np.testing.assert_allclose(soft[1], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(soft[2], [0, 0, 0, 1])
    with pytest.raises(ValueError, match="key"):
        conal.branch_weights(alpha, gumbel=True)


def test_bad_loss_shape_is_a_clear_error():
    _, sn, x, _, _ = _setup(Tanh, k=2)
    search = conal.make_search(sn, lambda h, f, y: jnp.sum(f))
    st = search.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"f32\[K\]"):
        search.step(st, (x, None), (x, None))


# ---------------------------------------------------------------------------------------------
# Discretisation, parameter counts, report, retrain


def test_discretise_argmax_and_tie_breaking():
    alpha = np.array([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [3.0, 0.0, 3.0]])
    assert conal.discretise(alpha) == (1, 1, 2)
    assert conal.discretise(alpha, tie_break="private") == (1, 0, 0)
    cand = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 0]], bool)
    assert conal.discretise(alpha, cand) == (2, 1, 1)
    assert conal.discretise(np.ones((2, 4))) == (3, 3)  # untrained: fully shared
    with pytest.raises(ValueError, match="tie_break"):
        conal.discretise(alpha, tie_break="x")
    with pytest.raises(ValueError, match=r"\[K, P\]"):
        conal.discretise(np.ones(3))


def test_param_counts_against_hand_counts():
    _, sn, x, params, _ = _setup(Tanh, k=3, nb=3)
    sizes = conal.block_param_counts(params)
    assert sizes == [4 * 6 + 6, 6 * 6 + 6, 6 * 6 + 6]  # 30, 42, 42
    arch = conal.Architecture((0, 2, 3), 3)
    counts = conal.param_counts(sizes, arch)
    # trunk: 3 blocks (task 2 is fully shared); task 0: 3 own blocks; task 1: own block 2
    assert counts == {"learned": 114 + 114 + 42, "all_shared": 114, "all_private": 342}
    grouped = conal.Architecture((1, 1, 3), 3, grouped=True)
    assert conal.param_counts(sizes, grouped)["learned"] == 114 + 84  # one shared copy of 1..2
    assert conal.param_counts(sizes, conal.Architecture((1, 1, 3), 3))["learned"] == 114 + 168
    private = conal.Architecture((0, 0, 0), 3)
    assert conal.param_counts(sizes, private)["learned"] == 342
    # the retrain model holds exactly that many encoder parameters
    for a in (arch, grouped, private):
        tree = _feature_tree(sn.blocks, a)
        block_vars = conal.random_block_init(sn.blocks, jax.random.PRNGKey(0), x)
        p, _ = conal.tree_init(tree, block_vars)
        n = sum(int(np.size(v)) for v in jax.tree.leaves(p))
        assert n == conal.param_counts(sizes, a)["learned"]
    with pytest.raises(ValueError, match="Branch points"):
        conal.Architecture((0, 4), 3)


def test_architecture_text():
    arch = conal.Architecture((3, 3, 1), 3)
    text = conal.architecture_text(arch, ["stem", "l1", "l2"], ["seg", "depth", "normal"])
    lines = text.splitlines()
    assert lines[0].startswith("seg") and "shared [stem, l1, l2] | own [-]" in lines[0]
    assert "branch point 1: shared [stem] | own [l1, l2]" in lines[2]
    grouped = conal.architecture_text(conal.Architecture((1, 1, 3), 3, grouped=True))
    assert "group task0+task1" in grouped


def _tree_setup(branch_points, grouped=False, module=Tanh):
    """A retrain tree of three blocks with linear heads ``z @ v_t`` and squared-error losses."""
    k = len(branch_points)
    arch = conal.Architecture(branch_points, 3, grouped=grouped)
    blocks = tuple(conal.linen_block(module()) for _ in range(3))
    heads = {f"t{t}": (lambda v, z, train: z @ v) for t in range(k)}
    tree = conal.TreeModel(blocks, arch, heads)
    x = jax.random.normal(jax.random.PRNGKey(7), (5, 4))
    enc, state = conal.tree_init(tree, conal.random_block_init(blocks, jax.random.PRNGKey(1), x))
    vs = jax.random.normal(jax.random.PRNGKey(2), (k, 6))
    params = {**enc, "heads": {f"t{t}": vs[t] for t in range(k)}}
    ys = {f"t{t}": jnp.sin((t + 1.0) * x[:, t % 4]) for t in range(k)}

    def loss_fn(name, pred, targets):
        return jnp.mean((pred - targets[name]) ** 2)

    return tree, params, state, x, ys, loss_fn


def _reference_task_losses(params, tree, x, ys):
    """Each task's loss from the definition: tanh(h W + b) through the trunk blocks 0..p-1, then
    its branch's copies p..B-1, then ``z @ v``; no library forward."""
    out = []
    for t, p in enumerate(tree.arch.branch_points):
        h = x
        layers = params["trunk"][:p]
        if p < tree.arch.num_blocks:
            c = next(i for i, (_, ts) in enumerate(tree.arch.branches()) if t in ts)
            layers = layers + params["branches"][c]
        for layer in layers:
            w = layer["Dense_0"]
            h = jnp.tanh(h @ w["kernel"] + w["bias"])
        out.append(jnp.mean((h @ params["heads"][f"t{t}"] - ys[f"t{t}"]) ** 2))
    return jnp.stack(out)


@pytest.mark.parametrize("task_map", ["vmap", "scan", "unroll"])
@pytest.mark.parametrize(
    "branch_points, grouped", [((1, 3, 0), False), ((2, 2, 3), True), ((0, 0, 0), False)], ids=str
)
def test_tree_gradients_are_rows_for_shared_and_own_for_task_specific(
    branch_points, grouped, task_map
):
    """The one gradient format: trunk and group copies get Jacobian rows [K, ...] (zero for tasks
    that do not use them), a task's own copies and head its own gradient."""
    tree, params, state, x, ys, loss_fn = _tree_setup(branch_points, grouped)
    fn = jax.jit(conal.tree_value_and_grads(tree, loss_fn, task_map=task_map))
    losses, grads, _ = fn(params, state, x, ys)
    ref = _reference_task_losses(params, tree, x, ys)
    np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-6)
    per_task = [
        jax.grad(lambda p, t=t: _reference_task_losses(p, tree, x, ys)[t])(params) for t in range(3)
    ]
    spec = tree.task_specific(params)
    for path_leaf, own in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(spec), strict=True
    ):
        path, got = path_leaf
        expected = [_leaf_at(g, path) for g in per_task]
        if own:  # the one task that uses it (the reference gradients of the others are zero)
            np.testing.assert_allclose(got, sum(expected), rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5, atol=1e-6)
    # the rows of the tasks that branched before a trunk block are exactly zero
    for b, leaf in enumerate(grads["trunk"]):
        for t, p in enumerate(branch_points):
            if p <= b:
                assert not np.any(np.asarray(leaf["Dense_0"]["kernel"][t]))


def _leaf_at(tree, path):
    for key in path:
        tree = tree[getattr(key, "key", getattr(key, "idx", None))]
    return np.asarray(tree)


def test_retrain_with_shared_rows_and_unit_aggregation():
    """``optax.chain(mtl.shared_rows(aggregator, tree.task_specific), optimizer)`` consumes the
    tree's gradients; ``unit_aggregation`` averages each unit over its users only."""
    tree, params, state, x, ys, loss_fn = _tree_setup((1, 3, 1))
    tx = optax.chain(
        mtl.shared_rows(mtl.aggregation.upgrad(), tree.task_specific), optax.adam(1e-2)
    )
    retrain = conal.make_retrain(tree, loss_fn, tx)
    st = retrain.init(params, state)
    step = jax.jit(retrain.step)
    first = None
    for _ in range(30):
        st, out = step(st, x, ys)
        first = out["losses"] if first is None else first
    assert float(jnp.sum(out["losses"])) < float(jnp.sum(first))
    assert int(st.first_nonfinite) == -1

    # unit_aggregation with the plain mean: block 0 (all three tasks) moves by the mean of the
    # three rows, blocks 1..2 (task 1 only) by task 1's row
    def mean(n):
        return optax.GradientTransformation(
            lambda p: optax.EmptyState(),
            lambda g, s, p=None, **kw: (jax.tree.map(lambda r: jnp.mean(r, 0), g), s),
        )

    sgd = optax.chain(conal.unit_aggregation(tree, mean), optax.sgd(1.0))
    retrain = conal.make_retrain(tree, loss_fn, sgd, task_map="unroll")
    new, _ = jax.jit(retrain.step)(retrain.init(params, state), x, ys)
    per_task = [
        jax.grad(lambda p, t=t: _reference_task_losses(p, tree, x, ys)[t])(params) for t in range(3)
    ]
    moved = jax.tree.map(lambda a, b: a - b, params, new.params)
    expected0 = jax.tree.map(lambda *g: sum(g) / 3, *[g["trunk"][0] for g in per_task])
    jax.tree.map(
        lambda e, g: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6),
        expected0,
        moved["trunk"][0],
    )
    for b in (1, 2):
        jax.tree.map(
            lambda e, g: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6),
            per_task[1]["trunk"][b],
            moved["trunk"][b],
        )
    with pytest.raises(ValueError, match="task_map"):
        conal.tree_value_and_grads(tree, loss_fn, task_map="loop")
    with pytest.raises(ValueError, match="heads"):
        conal.TreeModel(tree.blocks, tree.arch, {"t0": None})


# ---------------------------------------------------------------------------------------------
# Controlled conflict (the "must show")


def _synthetic_search(signs, nocl, seeds, steps=300, width=16, nb=3):
    """Tasks y_k = sign_k * sin(x a) read out by one fixed vector from the task's feature.

    Equal signs: the tasks' gradients on the shared blocks agree. Opposite signs: the shared path
    cannot serve both (its readout would have to be y and -y), so their shared-block gradients
    conflict. ``signs: [R, K]`` and ``seeds: [R]`` describe R runs, vmapped in one program.
    Returns ``alpha [R, K, P]`` after the search and the mean conflict flags ``[R, B]``.
    """
    k = np.shape(signs)[1]
    sn = conal.Supernet([conal.linen_block(Tanh(width)) for _ in range(nb)], k)
    a = jax.random.normal(jax.random.PRNGKey(100), (8,))
    cfg = conal.SearchConfig(weight_lr=3e-3, arch_lr=3e-2, nocl=nocl, track_conflict=True)
    search = conal.make_search(sn, _readout_loss(width), cfg)

    def run(sign, seed):
        def data(key):
            x = jax.random.normal(key, (64, 8))
            return x, sign[:, None] * jnp.sin(x @ a)[None]

        st = search.init(jax.random.fold_in(jax.random.PRNGKey(0), seed), jnp.zeros((8, 8)))

        def body(st, key):
            k1, k2 = jax.random.split(key)
            st, m = search.step(st, data(k1), data(k2))
            return st, m["shared_conflict"]

        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), seed), steps)
        st, conflicts = jax.lax.scan(body, st, keys)
        return st.params["alpha"], conflicts.mean(0)

    alpha, conflicts = jax.jit(jax.vmap(run))(jnp.asarray(signs, jnp.float32), jnp.asarray(seeds))
    return np.asarray(alpha), np.asarray(conflicts)


def _expected_branch_point(alpha):
    w = np.asarray(jax.nn.softmax(alpha, axis=-1))
    return (w * np.arange(alpha.shape[-1])).sum(-1)  # [R, K]


def test_controlled_conflict_agreeing_tasks_share_conflicting_tasks_branch_earlier():
    seeds = [0, 1, 2, 3]
    # one program for the nocl runs: 4 seeds agreeing (+1, +1), 4 seeds conflicting (+1, -1)
    signs = [(1, 1)] * 4 + [(1, -1)] * 4
    alpha, conflicts = _synthetic_search(signs, nocl=True, seeds=seeds + seeds)
    agree, conflict = alpha[:4], alpha[4:]
    alpha_off, _ = _synthetic_search([(1, -1)] * 4, nocl=False, seeds=seeds)
    bp_agree = [conal.discretise(a) for a in agree]
    bp_conflict = [conal.discretise(a) for a in conflict]
    # the construction: agreeing tasks never conflict on a shared block, opposite ones do
    assert conflicts[:4].max() < 0.05 and conflicts[4:, -1].min() > 0.9
    # agreeing tasks stay shared (the deepest branch point, 3 = fully shared)
    assert sum(bp == (3, 3) for bp in bp_agree) >= 3
    assert _expected_branch_point(agree).mean() > 2.2
    # conflicting tasks branch earlier, none fully shared
    assert all(max(bp) < 3 for bp in bp_conflict)
    e_conflict = _expected_branch_point(conflict).mean()
    assert e_conflict < 1.2
    # with nocl off (summed gradient on the shared blocks) the steering is weaker: later
    # branch points than with nocl for the same conflicting tasks
    assert _expected_branch_point(alpha_off).mean() > e_conflict + 0.3


# ---------------------------------------------------------------------------------------------
# CoNAL-Pro


def test_conal_pro_restrict_and_decide_tie_groups():
    _, sn, x, _, _ = _setup(Tanh, k=4, nb=3)
    search = conal.make_search(sn, _readout_loss(6))
    st = search.init(jax.random.PRNGKey(0), x)
    alpha = jnp.array([[0, 0, 5.0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0], [5.0, 0, 0, 0]])
    st = st._replace(params={**st.params, "alpha": alpha})
    st = conal.pro_restrict(st, 3)
    st, groups = conal.pro_decide(st, 3)
    assert groups == ((2,),)
    st = conal.pro_restrict(st, 2)
    np.testing.assert_array_equal(st.candidates[0], [True, True, True, False])
    np.testing.assert_array_equal(st.candidates[2], [False, False, False, True])
    st, groups = conal.pro_decide(st, 2, split_conflicting=False)
    assert groups == ((0, 1),)
    for b in (2,):  # tasks 0 and 1 now hold one (averaged) copy of block 2
        leaf = st.params["private"][b]["Dense_0"]["kernel"]
        np.testing.assert_array_equal(leaf[0], leaf[1])
    leaf1 = st.params["private"][1]["Dense_0"]["kernel"]
    assert not np.allclose(leaf1[0], leaf1[1])  # block 1 is before their branch point: untied
    y = jnp.zeros((4, 5))
    st2, _ = jax.jit(search.step)(st, (x, y + 1.0), (x, y))
    leaf = st2.params["private"][2]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(leaf[0], leaf[1])  # stays tied through updates
    assert not np.allclose(leaf[0], st.params["private"][2]["Dense_0"]["kernel"][0])


def test_split_by_conflict_is_greedy_in_task_order():
    gram = np.array([[1, 1, -1, 2], [1, 1, -1, -1], [-1, -1, 1, 1], [2, -1, 1, 1.0]])
    assert conal.split_by_conflict([0, 1, 2, 3], gram) == [(0, 1), (2, 3)]
    assert conal.split_by_conflict([0, 3], gram) == [(0, 3)]
    assert conal.split_by_conflict([0, 2], None) == [(0, 2)]
    assert conal.split_by_conflict([], gram) == []


def test_any_aggregator_on_the_shared_blocks():
    _, sn, x, _, _ = _setup(Tanh, k=3)
    pcgrad = mtl.aggregation.pcgrad(
        num_tasks=3
    )  # global granularity: one Gram matrix for all shared blocks
    search = conal.make_search(sn, _readout_loss(6), shared_aggregator=pcgrad)
    st = search.init(jax.random.PRNGKey(0), x)
    y = jnp.stack([x[:, 0], -x[:, 0], x[:, 1]])
    st2, m = jax.jit(search.step)(st, (x, y), (x, y))
    assert m["shared_conflict"].shape == (3,)
    assert mtl.aggregation.weights(st2.aggregator_state).shape == (3,)
    assert m["shared_conflict"].max() == 1.0  # flags per block, whatever the aggregator's groups
    assert not np.allclose(
        st2.params["shared"][0]["Dense_0"]["kernel"], st.params["shared"][0]["Dense_0"]["kernel"]
    )


def test_conal_pro_on_four_synthetic_tasks():
    # tasks 0, 1: y = sin(x a); tasks 2, 3: y = -sin(x a) (conflict across the pairs)
    k, nb, width = 4, 3, 12
    sn = conal.Supernet([conal.linen_block(Tanh(width)) for _ in range(nb)], k)
    a = jax.random.normal(jax.random.PRNGKey(100), (8,))
    s = jnp.array([1.0, 1.0, -1.0, -1.0])

    def data(key):
        x = jax.random.normal(key, (64, 8))
        return x, s[:, None] * jnp.sin(x @ a)[None]

    def batches():
        key = jax.random.PRNGKey(1)
        while True:
            key, k1, k2 = jax.random.split(key, 3)
            yield data(k1), data(k2)

    search = conal.make_search(
        sn, _readout_loss(width), conal.SearchConfig(weight_lr=3e-3, arch_lr=3e-2)
    )
    st = search.init(jax.random.PRNGKey(0), data(jax.random.PRNGKey(0))[0])
    arch, st, history = conal.search_pro(search, st, batches(), steps_per_stage=60)
    assert arch.grouped and arch.num_tasks == 4
    assert history[0]["depth"] == nb
    assert sorted(t for h in history for g in h["decided"] for t in g) == [0, 1, 2, 3]
    # the conflicting pairs are not all fully shared
    assert min(arch.branch_points) < nb
    # every decided group holds identical copies from its branch point on
    for p, tasks in arch.branches():
        for b in range(p, nb):
            leaf = np.asarray(st.params["private"][b]["Dense_0"]["kernel"])
            for t in tasks[1:]:
                np.testing.assert_array_equal(leaf[t], leaf[tasks[0]])
    sizes = conal.block_param_counts(st.params)
    assert (
        conal.param_counts(sizes, arch)["learned"]
        <= conal.param_counts(sizes, conal.Architecture(arch.branch_points, nb))["learned"]
    )


def test_report_png_and_markdown(tmp_path):
    from experiments import conal_report

    names = ["stem", "layer1", "layer2"]
    tasks = ["seg", "depth", "normal", "edge"]
    png = conal_report.draw_architecture((3, 3, 1, 0), names, tasks, str(tmp_path / "arch.png"))
    assert (tmp_path / "arch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arch = conal.Architecture((1, 1, 3, 0), 3, grouped=True)
    conal_report.draw_architecture(arch, names, tasks, str(tmp_path / "pro.png"), title="Pro")
    traj = np.full((5, 4, 4), 0.25)
    conal_report.plot_alpha_trajectory(traj, tasks, str(tmp_path / "alpha.png"))
    md = conal_report.architecture_section(
        (3, 3, 1, 0), names, tasks, [10, 20, 30], alpha_softmax=traj[-1], image="arch.png"
    )
    assert "| normal | 1 | stem | layer1, layer2 |" in md
    assert "learned 170, all-shared 60, all-private 240" in md  # 60 + 50 + 60
    assert "![architecture](arch.png)" in md and png.endswith("arch.png")
    with pytest.raises(ValueError, match="task names"):
        conal_report.draw_architecture((3, 3), names, tasks, str(tmp_path / "x.png"))
