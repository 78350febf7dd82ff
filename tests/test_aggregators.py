"""Aggregators as the specification: NumPy references from the papers, properties, degenerate input.

Each aggregator is run through its optax transform on Jacobians split across three pytree leaves,
for K in {1, 2, 3, 5, 10, 40}, eight matrix families (normal, conflicting, aligned, parallel,
opposite, zero rows, rank-deficient, zero) and scales 1e-8, 1, 1e8.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from tests import _matrices as M
from tests import _reference as R

# K -> transform; num_tasks=K so that the state logs the weights (mtl.aggregation.weights).
GRAM_AGGREGATORS = {
    "mean": lambda k: mtl.aggregation.mean(num_tasks=k),
    "sum": lambda k: mtl.aggregation.sum_(num_tasks=k),
    "pcgrad": lambda k: mtl.aggregation.pcgrad(seed=0, num_tasks=k),
    "pcgrad_ordered": lambda k: mtl.aggregation.pcgrad(shuffle=False, num_tasks=k),
    "mgda": lambda k: mtl.aggregation.mgda(num_tasks=k),
    "cagrad": lambda k: mtl.aggregation.cagrad(c=0.5, num_tasks=k),
    "imtl_g": lambda k: mtl.aggregation.imtl_g(num_tasks=k),
}
ALL_AGGREGATORS = {
    **GRAM_AGGREGATORS,
    "graddrop": lambda k: mtl.aggregation.graddrop(seed=0, num_tasks=k),
}


@functools.cache
def _transform(name: str, k: int):
    return ALL_AGGREGATORS[name](k)


@functools.cache
def _jitted_update(name: str, k: int):
    return jax.jit(_transform(name, k).update)


def aggregate(name: str, J: np.ndarray, *, jit: bool = True, dtype=np.float32, losses=None):
    """Runs aggregator ``name`` on ``J[K, P]`` (as a 3-leaf tree); returns (d[P], state)."""
    k = J.shape[0]
    tx = _transform(name, k)
    jac = M.to_tree(J, dtype)
    params = M.params_like(jac)
    state = tx.init(params)
    update = _jitted_update(name, k) if jit else tx.update
    kwargs = {} if losses is None else {"task_losses": jnp.asarray(losses, dtype)}
    out, state = update(jac, state, params, **kwargs)
    return M.from_tree(out), state


def _row_scale(J: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(J, axis=1))) if J.size else 0.0


def assert_close(actual, expected, J, rtol):
    """|actual - expected| <= rtol * (K * max_k |g_k|), the natural scale of any aggregate."""
    scale = J.shape[0] * _row_scale(J)
    err = np.linalg.norm(np.asarray(actual) - np.asarray(expected))
    assert err <= rtol * scale + 1e-300, f"error {err:.3e} > {rtol:.0e} x scale {scale:.3e}"


# ---------------------------------------------------------------------------------------------
# Degenerate input: finite output on every sample, for every aggregator (float32, jitted).


@pytest.mark.parametrize("name", sorted(ALL_AGGREGATORS))
def test_finite_output_on_every_sample(name):
    for k, kind, scale, J in M.all_samples():
        d, state = aggregate(name, J)
        assert np.all(np.isfinite(d)), f"{name}: non-finite output for K={k} {kind} x{scale:g}"
        w = mtl.aggregation.weights(state)
        if w is not None:
            assert np.all(np.isfinite(np.asarray(w))), f"{name}: non-finite weights, K={k} {kind}"


# ---------------------------------------------------------------------------------------------
# Agreement with NumPy implementations written from the papers' equations (float64).


def _reference(name: str, J: np.ndarray) -> np.ndarray | None:
    k = J.shape[0]
    if name == "mean":
        return J.mean(axis=0)
    if name == "sum":
        return J.sum(axis=0)
    if name == "pcgrad_ordered":
        orders = [[j for j in range(k) if j != i] for i in range(k)]
        return R.pcgrad_ref(J, orders)
    if name == "mgda":
        if k > 10:
            return None  # certified by the optimality conditions instead, see below
        w = R.mgda_bruteforce_weights(J @ J.T)
        return w @ J
    if name == "imtl_g":
        full_rank = k <= J.shape[1] and np.linalg.matrix_rank(J) == k
        return R.imtl_g_ref(J) if k >= 2 and full_rank else None
    raise KeyError(name)


@pytest.mark.parametrize("name", ["mean", "sum", "pcgrad_ordered", "mgda", "imtl_g"])
@pytest.mark.parametrize("k", M.KS)
def test_matches_numpy_reference_float64(name, k):
    compared = 0
    with jax.enable_x64(True):
        for kind in M.KINDS:
            for scale in M.SCALES:
                J = scale * M.sample(kind, k)
                expected = _reference(name, J)
                if expected is None:
                    continue
                actual, _ = aggregate(name, J, dtype=np.float64)
                assert_close(actual, expected, J, rtol=1e-9)
                compared += 1
    if name != "imtl_g" and not (name == "mgda" and k > 10):
        assert compared == len(M.KINDS) * len(M.SCALES)


@pytest.mark.parametrize("k", M.KS)
def test_pcgrad_random_orders_match_reference(k):
    with jax.enable_x64(True):
        for kind in M.KINDS:
            J = M.sample(kind, k)
            key = jax.random.PRNGKey(k)
            orders = np.asarray(mtl.weighting.visiting_orders(k, key))
            for i in range(k):  # every task visits every other task exactly once
                assert sorted(orders[i]) == [j for j in range(k) if j != i]
            w = mtl.weighting.pcgrad_weights(jnp.asarray(J @ J.T), jnp.asarray(orders))
            assert_close(np.asarray(w) @ J, R.pcgrad_ref(J, orders), J, rtol=1e-9)


def test_pcgrad_transform_uses_the_orders_drawn_from_its_state_key():
    k = 5
    J = M.sample("conflicting", k)
    with jax.enable_x64(True):
        d, _ = aggregate("pcgrad", J, dtype=np.float64)
        key = jax.random.PRNGKey(0)  # the state key of mtl.aggregation.pcgrad(seed=0)
        _, sub = jax.random.split(key)
        (group_key,) = jax.random.split(sub, 1)
        orders = np.asarray(mtl.weighting.visiting_orders(k, group_key))
    assert_close(d, R.pcgrad_ref(J, orders), J, rtol=1e-9)


@pytest.mark.parametrize("k", M.KS)
def test_mgda_is_the_min_norm_point_to_1e6(k):
    """Optimality certificate of the min-norm point d* of conv{g_k}: d* in the hull and
    d* . g_j >= |d*|^2 for all j (equality on the support); checked to 1e-6 relative."""
    with jax.enable_x64(True):
        for kind in M.KINDS:
            for scale in M.SCALES:
                J = scale * M.sample(kind, k)
                d, state = aggregate("mgda", J, dtype=np.float64)
                w = np.asarray(mtl.aggregation.weights(state))
                assert np.all(w >= -1e-12) and abs(w.sum() - 1.0) < 1e-9, (kind, w)
                np.testing.assert_allclose(w @ J, d, atol=1e-12 * scale * k)
                gap = d @ d - np.min(J @ d)
                assert gap <= 1e-6 * _row_scale(J) ** 2 + 1e-300, (kind, scale, gap)


@pytest.mark.parametrize("k", [2, 3, 5, 10, pytest.param(40, marks=pytest.mark.slow)])
def test_cagrad_matches_slsqp_reference(k):
    c = 0.5
    with jax.enable_x64(True):
        for kind in ("normal", "conflicting", "aligned"):
            J = M.sample(kind, k)
            d, _ = aggregate("cagrad", J, dtype=np.float64)
            assert_close(d, R.cagrad_ref(J, c), J, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 3, 5, 40])
@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_cagrad_solves_the_primal_on_every_family(k, c):
    """Our d is in the ball and reaches the primal optimum ``max_d min_i g_i . d`` (SLSQP on
    the paper's eq. 3, independent of the dual and of the library), on every family."""
    with jax.enable_x64(True):
        for kind in M.KINDS:
            J = M.sample(kind, k)
            d = np.asarray(mtl.weighting.cagrad_weights(jnp.asarray(J @ J.T), c)) @ J
            g0 = J.mean(axis=0)
            _, best = R.cagrad_primal_ref(J, c)
            scale = _row_scale(J) ** 2
            assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-8) + 1e-12 * scale
            assert np.min(J @ d) >= best - 1e-7 * scale, (kind, np.min(J @ d), best)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cagrad_pareto_stationary_matrix(dtype):
    """Issue 11: the origin in the hull of J = [[2, 1], [-1, 0.5], [-1, -1]]: the optimum of
    ``min_i g_i . d`` is 0 (d = 0 is feasible for c >= 1); the update conflicted before."""
    J = np.array([[2.0, 1.0], [-1.0, 0.5], [-1.0, -1.0]])
    with jax.enable_x64(dtype == np.float64):
        G = jnp.asarray(J @ J.T, dtype)
        for c in (1.0, 2.0):
            w = np.asarray(mtl.weighting.cagrad_weights(G, c), np.float64)
            tol = 10 * np.finfo(dtype).eps ** (1.0 if dtype == np.float64 else 0.8)
            assert np.min(J @ (w @ J)) >= -tol, (c, J @ (w @ J))
            assert np.max(np.abs(w)) < 10
            assert R.cagrad_primal_ref(J, c)[1] == pytest.approx(0.0, abs=1e-9)


def test_cagrad_formula_and_rescale():
    """Away from degeneracy the update is the paper's ``g0 + c |g0| g_w / |g_w|`` (SLSQP dual),
    and ``rescale`` divides it by ``1 + c^2`` (the official code's default)."""
    J = M.sample("conflicting", 3)
    expected = R.cagrad_ref(J, 0.4)
    with jax.enable_x64(True):
        G = jnp.asarray(J @ J.T)
        plain = np.asarray(mtl.weighting.cagrad_weights(G, 0.4)) @ J
        rescaled = np.asarray(mtl.weighting.cagrad_weights(G, 0.4, rescale=True)) @ J
    np.testing.assert_allclose(plain, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rescaled, expected / (1 + 0.4**2), rtol=1e-6, atol=1e-9)


def test_cagrad_c_zero_is_the_mean():
    J = M.sample("conflicting", 4)
    with jax.enable_x64(True):
        w = np.asarray(mtl.weighting.cagrad_weights(jnp.asarray(J @ J.T), 0.0))
    np.testing.assert_allclose(w, np.full(4, 0.25), rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 10, 40])
def test_graddrop_matches_reference(k):
    J = M.sample("conflicting", k)
    leak = np.linspace(0.0, 0.5, k)
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(3)
        U = np.asarray(jax.random.uniform(key, (M.P,), dtype=jnp.float64))
        out = mtl.aggregation.graddrop_leaf(jnp.asarray(J), key, jnp.asarray(leak))
    np.testing.assert_allclose(np.asarray(out), R.graddrop_ref(J, U, leak), rtol=1e-12, atol=1e-12)


def test_graddrop_keeps_only_one_sign_per_coordinate_without_leak():
    J = M.sample("conflicting", 5)
    d, _ = aggregate("graddrop", J)
    tree = M.to_tree(J, np.float64)
    for leaf, out in zip(
        jax.tree.leaves(tree), jax.tree.leaves(M.to_tree(d[None], np.float64)), strict=False
    ):
        pos = np.where(leaf > 0, leaf, 0).sum(0)
        neg = np.where(leaf < 0, leaf, 0).sum(0)
        out = out[0]
        ok = np.isclose(out, pos, rtol=1e-5, atol=1e-6) | np.isclose(out, neg, rtol=1e-5, atol=1e-6)
        assert np.all(ok)


# ---------------------------------------------------------------------------------------------
# Properties.


def test_mgda_two_tasks_matches_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(20):
        J = rng.normal(size=(2, M.P)) * rng.uniform(0.1, 10, size=(2, 1))
        d, _ = aggregate("mgda", J)
        np.testing.assert_allclose(d, R.mgda_two_closed_form(J[0], J[1]), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["mgda", "pcgrad"])
@pytest.mark.parametrize("k", M.KS)
def test_non_conflicting(name, k):
    """d . g_k >= 0 for every task: MGDA always; PCGrad is only guaranteed for K <= 2."""
    if name == "pcgrad" and k > 2:
        pytest.skip("PCGrad's non-conflict guarantee holds for two tasks")
    for kind in M.KINDS:
        for scale in M.SCALES:
            J = scale * M.sample(kind, k)
            d, _ = aggregate(name, J)
            dots = J @ d
            # float32 rounding leaves |d| ~ 1e-6 max|g| where the exact d is 0
            tol = 1e-5 * (np.linalg.norm(d) + _row_scale(J)) * np.linalg.norm(J, axis=1)
            assert np.all(dots >= -tol - 1e-30), (kind, scale, dots)


@pytest.mark.parametrize("k", [2, 3, 5, 10, 40])
def test_pcgrad_without_conflict_is_the_sum(k):
    for kind in ("aligned", "parallel"):
        J = M.sample(kind, k)
        assert np.all(J @ J.T >= 0)
        d, _ = aggregate("pcgrad", J)
        np.testing.assert_allclose(d, J.sum(0), rtol=1e-5, atol=1e-5)


def test_pcgrad_reproducible_for_a_seed_and_different_across_seeds():
    J = M.sample("conflicting", 5)
    jac = M.to_tree(J)
    params = M.params_like(jac)

    def run(seed):
        tx = mtl.aggregation.pcgrad(seed=seed)
        state = tx.init(params)
        outs = []
        for _ in range(3):
            out, state = tx.update(jac, state, params)
            outs.append(M.from_tree(out))
        return outs

    first, again, other = run(0), run(0), run(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(first, other, strict=True))
    assert not np.allclose(first[0], first[1])  # a fresh order at every step


def test_pcgrad_two_tasks_does_not_depend_on_seed():
    J = M.sample("conflicting", 2)
    d0, _ = aggregate("pcgrad", J)
    d1, _ = aggregate("pcgrad_ordered", J)
    np.testing.assert_allclose(d0, d1, rtol=1e-6)


@pytest.mark.parametrize("name", ["mean", "sum", "mgda", "cagrad", "imtl_g"])
@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_permutation_equivariance(name, k):
    """Permuting the tasks does not change the update of a symmetric method."""
    rng = np.random.default_rng(k)
    for kind in ("normal", "conflicting", "rank_deficient"):
        J = M.sample(kind, k)
        perm = rng.permutation(k)
        d, _ = aggregate(name, J)
        dp, _ = aggregate(name, J[perm])
        assert_close(dp, d, J, rtol=2e-5)


@pytest.mark.parametrize("name", sorted(GRAM_AGGREGATORS))
@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_positive_homogeneity(name, k):
    """A(a J) = a A(J) for a > 0: every Gram-space method here is positively homogeneous."""
    for kind in ("normal", "conflicting", "rank_deficient"):
        J = M.sample(kind, k)
        d, _ = aggregate(name, J)
        for a in (1e-8, 1e-3, 1e3, 1e8):
            da, _ = aggregate(name, a * J)
            assert_close(da / a, d, J, rtol=5e-5)


@pytest.mark.parametrize("name", sorted(ALL_AGGREGATORS))
def test_jit_and_no_jit_agree(name):
    for k in (1, 2, 5, 40):
        for kind in ("conflicting", "zero_rows"):
            J = M.sample(kind, k)
            d_jit, _ = aggregate(name, J, jit=True)
            d_eager, _ = aggregate(name, J, jit=False)
            assert_close(d_eager, d_jit, J, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL_AGGREGATORS))
def test_single_task_returns_a_multiple_of_its_gradient(name):
    J = M.sample("normal", 1)
    d, _ = aggregate(name, J)
    expected = {"cagrad": 1.5}.get(name, 1.0) * J[0]  # CAGrad: g0 + c |g0| g0/|g0|
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-6)


def test_opposite_gradients_give_zero_for_mgda_and_pcgrad_two_tasks():
    v = M.sample("normal", 1)[0]
    J = np.stack([v, -v])
    for name in ("mgda", "pcgrad"):
        d, _ = aggregate(name, J)
        np.testing.assert_allclose(d, 0.0, atol=1e-5)


def test_imtl_g_equal_projections():
    """IMTL-G: the update has the same projection on every task's unit gradient, weights sum to 1."""
    for k in (2, 3, 5, 10):
        J = M.sample("normal", k)
        d, state = aggregate("imtl_g", J)
        proj = J @ d / np.linalg.norm(J, axis=1)
        np.testing.assert_allclose(proj, proj[0], rtol=1e-3)
        np.testing.assert_allclose(np.sum(mtl.aggregation.weights(state)), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Granularity, shared_rows, state readers, chaining.


def test_leaf_granularity_weights_each_leaf_separately():
    J = M.sample("conflicting", 3)
    tree = M.to_tree(J, np.float64)
    params = M.params_like(tree)
    tx = mtl.aggregation.mgda(granularity="leaf", num_tasks=3)
    with jax.enable_x64(True):
        out, state = tx.update(tree, tx.init(params), params)
        weights = mtl.aggregation.weights(state)
    assert set(weights) == {"enc/w", "enc/b", "head"}
    for path, leaf in (
        ("enc/w", tree["enc"]["w"]),
        ("enc/b", tree["enc"]["b"]),
        ("head", tree["head"]),
    ):
        rows = leaf.reshape(3, -1)
        w = R.mgda_bruteforce_weights(rows @ rows.T)
        got = np.ravel(out[path.split("/")[0]][path.split("/")[1]] if "/" in path else out[path])
        np.testing.assert_allclose(got, w @ rows, rtol=1e-8, atol=1e-10)


def test_by_module_granularity_groups_modules():
    ones = functools.partial(np.ones, dtype=np.float32)
    tree = {
        "params": {
            "Dense_0": {"kernel": ones((2, 3, 4)), "bias": ones((2, 4))},
            "BatchNorm_0": {"scale": ones((2, 4)), "bias": ones((2, 4))},
        }
    }
    params = jax.tree.map(lambda x: x[0], tree)
    tx = mtl.aggregation.pcgrad(granularity=mtl.gramian.by_module, num_tasks=2)
    _, state = tx.update(tree, tx.init(params), params)
    assert set(mtl.aggregation.weights(state)) == {"params/Dense_0", "params/BatchNorm_0"}


@pytest.mark.parametrize("method", ["upgrad", "pcgrad", "gradvac", "nash_mtl"])
def test_batched_groups_match_one_solve_per_group(method):
    """Issue 11: the groups are solved in one vmap; the result is the per-group loop's, each group
    weighted by its own Gram matrix (checked against the global weighting of each leaf alone)."""
    J = M.sample("conflicting", 3)
    tree = M.to_tree(J, np.float64)
    params = M.params_like(tree)
    weighting = mtl.weighting.get_weighting(method)
    with jax.enable_x64(True):
        outs = []
        for batch in (True, False):
            tx = mtl.aggregation.from_weighting(
                weighting, granularity="leaf", num_tasks=3, _batch_groups=batch
            )
            state = tx.init(params)
            for _ in range(2):  # the second step uses the state of the first (GradVac)
                out, state = tx.update(tree, state, params)
            outs.append((M.from_tree(out), mtl.aggregation.weights(state)))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    for group in outs[0][1]:
        np.testing.assert_allclose(outs[0][1][group], outs[1][1][group], rtol=1e-10)
    # Each leaf's rows weighted by its own (leaf) Gram matrix, by the reference where one exists.
    if method == "upgrad":
        for rows, got in (
            (J[:, :10], outs[0][0][:10]),
            (J[:, 10:14], outs[0][0][10:14]),
            (J[:, 14:], outs[0][0][14:]),
        ):
            np.testing.assert_allclose(got, R.upgrad_ref(rows), rtol=1e-9, atol=1e-12)


def test_batched_groups_non_finite_group_gives_an_all_nan_update():
    J = M.sample("conflicting", 3)
    J[1, 0] = np.nan  # only the first leaf ("enc/w") is non-finite
    tree = M.to_tree(J)
    params = M.params_like(tree)
    tx = mtl.aggregation.gradvac(granularity="leaf", num_tasks=3)
    state = tx.init(params)
    out, new_state = tx.update(tree, state, params)
    assert np.all(np.isnan(M.from_tree(out)))
    jax.tree.map(np.testing.assert_array_equal, new_state.inner, state.inner)


def test_shared_rows_aggregates_shared_rows_and_passes_head_gradients():
    # loss_k = mean((tanh(x W) h_k - y_k)^2): W shared, head h_k task k's own
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    params = {
        "encoder": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "heads": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
    }

    def task_loss(p, k):
        return jnp.mean((jnp.tanh(x @ p["encoder"]) @ p["heads"][k] - y[k]) ** 2)

    def task_losses(p):
        return jnp.stack([task_loss(p, k) for k in range(2)])

    is_head = {"encoder": False, "heads": True}
    tx = optax.chain(mtl.shared_rows(mtl.aggregation.mgda(num_tasks=2), is_head), optax.sgd(1.0))
    losses, grads = mtl.value_and_grads(task_losses, is_head)(params)
    updates, state = tx.update(grads, tx.init(params), params, task_losses=losses)

    # reference from the definition: one jax.grad per task loss
    per_task = [jax.grad(task_loss)(params, k) for k in range(2)]
    rows = np.stack([np.asarray(g["encoder"]).ravel() for g in per_task])  # [K, n]
    w = R.mgda_bruteforce_weights(rows @ rows.T)
    np.testing.assert_allclose(-np.asarray(updates["encoder"]).ravel(), w @ rows, rtol=1e-5)
    own = sum(np.asarray(g["heads"]) for g in per_task)  # head k: d loss_k / d h_k only
    np.testing.assert_allclose(-np.asarray(updates["heads"]), own, rtol=1e-6)
    assert mtl.aggregation.weights(state[0].inner_state).shape == (2,)


def test_chains_in_front_of_adam_and_passes_task_losses():
    J = M.sample("conflicting", 3)
    jac = M.to_tree(J)
    params = M.params_like(jac)
    tx = optax.chain(mtl.aggregation.mgda(normalization="loss", num_tasks=3), optax.adam(1e-3))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jac, state, params, task_losses=jnp.array([1.0, 2.0, 3.0]))
    assert np.all(np.isfinite(M.from_tree(updates)))
    assert mtl.aggregation.weights(state).shape == (3,)
    np.testing.assert_allclose(mtl.aggregation.gram(state), J @ J.T, rtol=1e-5, atol=1e-5)


def test_num_tasks_gives_fixed_shape_state_usable_in_scan():
    J = M.sample("conflicting", 4)
    jac = M.to_tree(J)
    params = M.params_like(jac)
    tx = mtl.aggregation.pcgrad(num_tasks=4)
    state = tx.init(params)
    assert mtl.aggregation.weights(state).shape == (4,)

    def body(state, _):
        out, state = tx.update(jac, state, params)
        return state, out["head"]

    state, outs = jax.lax.scan(body, state, None, length=3)
    assert outs.shape == (3, 16)
    assert np.all(np.isfinite(np.asarray(mtl.aggregation.weights(state))))


def test_last_weights_before_the_first_step():
    params = M.params_like(M.to_tree(M.sample("normal", 2)))
    np.testing.assert_array_equal(
        mtl.aggregation.weights(mtl.aggregation.mean(num_tasks=2).init(params)), [0, 0]
    )
    assert mtl.aggregation.weights(optax.adam(1e-3).init(params)) is None
    with pytest.raises(ValueError, match="num_tasks"):
        mtl.aggregation.weights(mtl.aggregation.mean().init(params))  # K unknown at init: no logs


def test_state_readers_take_an_aggregator_state_or_a_chain_holding_one():
    J = M.sample("conflicting", 3)
    jac = M.to_tree(J)
    params = M.params_like(jac)
    tx = optax.chain(mtl.aggregation.upgrad(num_tasks=3), optax.adam(1e-3))
    _, state = tx.update(jac, tx.init(params), params)
    agg_state = state[0]
    w, gram = mtl.aggregation.weights(agg_state), mtl.aggregation.gram(agg_state)
    np.testing.assert_allclose(gram, J @ J.T, rtol=1e-5, atol=1e-5)
    assert w.shape == (3,)
    # optax's own lookup finds the logs by the field's name: {group: w[K]}
    np.testing.assert_array_equal(optax.tree_utils.tree_get(state, "weights")["global"], w)
    np.testing.assert_array_equal(optax.tree_utils.tree_get(state, "gram")["global"], gram)
    np.testing.assert_array_equal(mtl.aggregation.weights(state), w)  # the chain's one state
    assert mtl.aggregation.weights(optax.adam(1e-3).init(params)) is None  # no aggregator


def test_weights_refuses_to_guess_between_two_aggregator_states():
    params = M.params_like(M.to_tree(M.sample("normal", 2)))
    tx = optax.chain(mtl.aggregation.mean(num_tasks=2), mtl.aggregation.upgrad(num_tasks=2))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"2 aggregator states .*opt_state\[0\].*opt_state\[1\]"):
        mtl.aggregation.weights(state)
    with pytest.raises(ValueError, match="mtl.aggregation.gram"):
        mtl.aggregation.gram(state)
    np.testing.assert_array_equal(mtl.aggregation.weights(state[1]), [0.0, 0.0])


def test_generated_factories_keep_their_signatures():
    """The table-generated factories: name, kind and default of every parameter, as written out."""
    expected = {
        "mean": "(*, num_tasks=None)",
        "sum": "(*, num_tasks=None)",
        "linear": "(weights, *, num_tasks=None)",
        "pcgrad": "(seed=0, shuffle=True, *, granularity='global', num_tasks=None)",
        "mgda": "(normalization='none', *, granularity='global', num_tasks=None)",
        "cagrad": "(c=0.5, rescale=False, *, granularity='global', num_tasks=None)",
        "imtl_g": "(*, granularity='global', num_tasks=None)",
        "gradvac": "(beta=0.5, seed=0, shuffle=True, *, granularity='global', num_tasks=None)",
        "nash_mtl": (
            "(max_norm=1.0, update_weights_every=1, *, granularity='global', num_tasks=None)"
        ),
        "aligned_mtl": (
            "(scale_mode='min', pref_vector=None, *, granularity='global', num_tasks=None)"
        ),
        "upgrad": "(pref_vector=None, reg_eps=0.0, *, granularity='global', num_tasks=None)",
        "dualproj": "(pref_vector=None, reg_eps=0.0, *, granularity='global', num_tasks=None)",
        "config": "(pref_vector=None, *, granularity='global', num_tasks=None)",
        "random_weighting": "(seed=0, *, granularity='global', num_tasks=None)",
        "fairgrad": "(alpha=1.0, *, granularity='global', num_tasks=None)",
        "nocl": "(*, granularity='global', num_tasks=None)",
        "ema_weights": (
            "(method='mgda', alpha=0.9, method_kwargs=None, seed=0, *, granularity='global', "
            "num_tasks=None)"
        ),
    }
    for name, text in expected.items():
        sig = inspect.signature(mtl.aggregation.AGGREGATORS[name])
        plain = sig.replace(
            parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
            return_annotation=sig.empty,
        )
        assert str(plain) == text, name
    assert mtl.aggregation.sum_ is mtl.aggregation.AGGREGATORS["sum"]
    assert mtl.aggregation.conflict_free is mtl.aggregation.AGGREGATORS["config"]
    assert "mtl_jax.weighting.pcgrad" in mtl.aggregation.pcgrad.__doc__
    with pytest.raises(TypeError, match="unexpected keyword argument 'c'"):
        mtl.aggregation.pcgrad(c=0.5)
    with pytest.raises(ValueError, match="num_tasks=2 but the per-task vector has 3"):
        mtl.aggregation.upgrad(pref_vector=[1.0, 1.0, 1.0], num_tasks=2)
    assert mtl.aggregation.linear([0.2, 0.8]).init({"w": jnp.zeros(3)}).weights["global"].shape == (
        2,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_task_axis_is_a_clear_error(dtype):
    """Issue 11: ``mean`` on a K = 0 Jacobian raised ``ZeroDivisionError: integer modulo``."""
    with jax.enable_x64(dtype == np.float64):
        jac = M.to_tree(np.zeros((0, M.P)), dtype)
        params = M.params_like(jac)
        for tx in (mtl.aggregation.mean(), mtl.aggregation.upgrad(), mtl.aggregation.graddrop()):
            with pytest.raises(ValueError, match="K=0"):
                tx.update(jac, tx.init(params), params)


def test_get_method_by_name():
    tx = mtl.get_method("cagrad:c=0.2").transform
    J = M.sample("normal", 3)
    jac = M.to_tree(J)
    params = M.params_like(jac)
    out, _ = tx.update(jac, tx.init(params), params)
    np.testing.assert_allclose(M.from_tree(out), R.cagrad_ref(J, 0.2), rtol=1e-4, atol=1e-5)
