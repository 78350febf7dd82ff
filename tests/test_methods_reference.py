"""The new aggregators against NumPy/SciPy implementations of their papers' equations (float64).

Each method runs through its optax transform on Jacobians split across three pytree leaves and is
compared with ``tests/_reference.py`` on the matrix families of ``tests/_matrices.py``. Method-
specific behaviour (state across steps, clipping, reuse of weights, grouping) is checked here too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from tests import _matrices as M
from tests import _properties as P
from tests import _reference as R

REF_KS = (2, 5, 10)
FULL_RANK_KINDS = ("normal", "conflicting", "aligned")


def _f64(name: str, J: np.ndarray, **kwargs):
    with jax.enable_x64(True):
        return P.run(name, J, dtype=np.float64, **kwargs)


@pytest.mark.parametrize("k", REF_KS)
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_match_nnls(name, k):
    ref = {"upgrad": R.upgrad_ref, "dualproj": R.dualproj_ref}[name]
    for kind in M.KINDS:
        for scale in M.SCALES:
            J = scale * M.sample(kind, k)
            d, _ = _f64(name, J)
            P.assert_close(d, ref(J), J, 1e-10, f"{name} K={k} {kind} x{scale:g}")


def test_upgrad_and_dualproj_preference_vectors():
    J = M.sample("conflicting", 3)
    pref = np.array([0.2, 0.5, 1.3])
    with jax.enable_x64(True):
        G = jnp.asarray(J @ J.T)
        up = np.asarray(mtl.weighting.upgrad_weights(G, jnp.asarray(pref))) @ J
        dp = np.asarray(mtl.weighting.dualproj_weights(G, jnp.asarray(pref))) @ J
    np.testing.assert_allclose(up, R.upgrad_ref(J, pref), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dp, R.dualproj_ref(J, pref), rtol=1e-10, atol=1e-12)
    # K is inferred from the preference vector (2 entries), so a K = 3 Jacobian is refused.
    with pytest.raises(ValueError, match="length 2.*K=3"):
        mtl.aggregation.upgrad(pref_vector=[1.0, 2.0]).update(
            M.to_tree(J), mtl.aggregation.upgrad().init(M.params_like(M.to_tree(J)))
        )


@pytest.mark.parametrize("k", (2, 10, 40))
def test_nash_mtl_is_the_bargaining_solution(k):
    """``G alpha = 1/alpha`` (root of scipy), |d| = sqrt(K) unclipped, clipped to max_norm = 1;
    every solvable family, including the nearly degenerate K = 40 one."""
    compared = 0
    for kind in M.KINDS:
        for scale in M.SCALES:
            J = scale * M.sample(kind, k)
            if P.ascent_margin(J) <= 1e-4 or np.any(np.linalg.norm(J, axis=1) == 0):
                continue
            d, state = _f64("nash_mtl_unclipped", J)
            P.assert_close(d, R.nash_mtl_ref(J, max_norm=0.0), J / scale, 1e-8, f"K={k} {kind}")
            alpha = np.asarray(mtl.aggregation.weights(state))
            # The K eps ridge moves alpha_i (G alpha)_i by delta beta_i^2: ~2e-7 at most here
            # (the nearly degenerate K = 40 family, whose weights are large).
            np.testing.assert_allclose((J @ J.T) @ alpha * alpha, 1.0, rtol=1e-6)
            np.testing.assert_allclose(np.linalg.norm(d), np.sqrt(k), rtol=1e-6)
            clipped, _ = _f64("nash_mtl", J)
            np.testing.assert_allclose(clipped, d / np.linalg.norm(d), rtol=1e-8, atol=1e-12)
            compared += 1
    assert compared >= 5


def test_nash_mtl_zero_gradient_tasks_are_left_out():
    J = M.sample("normal", 4)
    J[1] = 0.0
    d, state = _f64("nash_mtl_unclipped", J)
    keep = [0, 2, 3]
    P.assert_close(d, R.nash_mtl_ref(J[keep], max_norm=0.0), J, 1e-8, "zero row")
    assert np.asarray(mtl.aggregation.weights(state))[1] == 0.0


def test_nash_mtl_update_weights_every_reuses_the_weights():
    k = 3
    Js = [M.sample("normal", k, seed=s) for s in range(4)]
    tx = mtl.aggregation.nash_mtl(update_weights_every=2, max_norm=0.0, num_tasks=k)
    with jax.enable_x64(True):
        params = M.params_like(M.to_tree(Js[0], np.float64))
        state = tx.init(params)
        update = jax.jit(tx.update)
        weights = []
        for J in Js:
            _, state = update(M.to_tree(J, np.float64), state, params)
            weights.append(np.asarray(mtl.aggregation.weights(state)))
    np.testing.assert_allclose(weights[0], R.nash_weights_ref(Js[0] @ Js[0].T), rtol=1e-8)
    np.testing.assert_array_equal(weights[1], weights[0])  # reused
    np.testing.assert_allclose(weights[2], R.nash_weights_ref(Js[2] @ Js[2].T), rtol=1e-8)
    np.testing.assert_array_equal(weights[3], weights[2])
    with pytest.raises(ValueError, match="nash_mtl keeps per-task state.*num_tasks"):
        mtl.aggregation.nash_mtl(update_weights_every=2).init(params)


def test_nash_mtl_clipping_uses_the_current_gradients():
    J = M.sample("normal", 3)
    tx = mtl.aggregation.nash_mtl(update_weights_every=2, max_norm=0.5, num_tasks=3)
    with jax.enable_x64(True):
        params = M.params_like(M.to_tree(J, np.float64))
        update = jax.jit(tx.update)
        _, state = update(M.to_tree(J, np.float64), tx.init(params), params)
        out, _ = update(M.to_tree(10 * J, np.float64), state, params)
    d = M.from_tree(out)
    alpha = R.nash_weights_ref(J @ J.T)
    expected = 10 * J.T @ alpha
    np.testing.assert_allclose(d, expected * 0.5 / np.linalg.norm(expected), rtol=1e-8)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_matches_official_least_squares(alpha):
    name = {0.5: "fairgrad_half", 1.0: "fairgrad", 2.0: "fairgrad_2"}[alpha]
    for k in (3, 10):
        for kind in FULL_RANK_KINDS:
            J = M.sample(kind, k)
            d, _ = _f64(name, J)
            P.assert_close(d, R.fairgrad_ref(J, alpha), J, 1e-7, f"alpha={alpha} K={k} {kind}")


def test_fairgrad_alpha_one_is_nash_without_clipping_and_alpha_zero_is_the_mean():
    J = M.sample("conflicting", 5)
    d1, _ = _f64("fairgrad", J)
    dn, _ = _f64("nash_mtl_unclipped", J)
    np.testing.assert_allclose(d1, dn, rtol=1e-10, atol=1e-12)
    with jax.enable_x64(True):
        w0 = np.asarray(mtl.weighting.fairgrad_weights(jnp.asarray(J @ J.T), 0.0))
    np.testing.assert_allclose(w0, np.full(5, 0.2))
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        mtl.aggregation.fairgrad(alpha=-1.0)


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_aligned_mtl_matches_svd_reference(mode):
    name = {"min": "aligned_mtl", "median": "aligned_mtl_median", "rmse": "aligned_mtl_rmse"}[mode]
    for k in (2, 10, 40):
        for kind in M.KINDS:
            for scale in M.SCALES:
                J = scale * M.sample(kind, k)
                d, _ = _f64(name, J)
                P.assert_close(d, R.aligned_mtl_ref(J, mode), J, 1e-8, f"{mode} K={k} {kind}")


def test_aligned_gradients_are_orthogonal_with_equal_norms():
    """The defining property: ``J^T B`` has orthogonal columns of norm sqrt(lambda_min)."""
    J = M.sample("conflicting", 5)
    with jax.enable_x64(True):
        B = np.asarray(mtl.weighting.balance_transformation(jnp.asarray(J @ J.T), "min"))
    aligned = J.T @ B
    lam_min = np.linalg.eigvalsh(J @ J.T).min()
    np.testing.assert_allclose(aligned.T @ aligned, lam_min * np.eye(5), atol=1e-8 * lam_min)
    with pytest.raises(ValueError, match="Unknown scale_mode 'max'"):
        mtl.aggregation.aligned_mtl(scale_mode="max")


# Issue 11 (peer suite): ConFIG in float32 with K > P (the cosine matrix C is singular) was off by
# up to 5e-4 of |d| (0.14 on a K = 40 "aligned" sample) when it took C's pseudo-inverse by an
# eigen-decomposition. The pivoted-Cholesky least squares (cond(L) = sqrt(cond(C))) reaches the
# floor set by the float32 Gram matrix itself -- the exact float64 computation from the same
# float32 G is off by 5e-5 (conflicting), 1.4e-5 (rank-deficient) and 8e-4 (aligned, whose
# smallest non-zero eigenvalue of C is ~1e-5 of the largest) -- so the float32 bounds below are
# relative to |d| and per family (~2x what is measured, over 3 seeds x 3 row orders); float64 is
# exact to ~1e-13 (measurements: the docstring of mtl_jax/weighting/config.py).
CONFIG_F32_RTOL = {"normal": 3e-5, "conflicting": 1.5e-4, "rank_deficient": 6e-5, "aligned": 5e-4}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_config_with_more_tasks_than_parameters(dtype):
    rng = np.random.default_rng(0)
    with jax.enable_x64(dtype == np.float64):
        for kind, rtol32 in CONFIG_F32_RTOL.items():
            rtol = rtol32 if dtype == np.float32 else 1e-11
            for seed in range(3):
                J = M.sample(kind, 40, seed)  # K = 40 > P = 30
                expected = R.config_ref(J)
                for _ in range(3):
                    perm = rng.permutation(40)
                    Jp = J[perm].astype(dtype)
                    G = jnp.matmul(Jp, Jp.T, precision=jax.lax.Precision.HIGHEST)
                    d = np.asarray(mtl.weighting.config_weights(G), np.float64) @ J[perm]
                    err = np.linalg.norm(d - expected) / np.linalg.norm(expected)
                    assert err <= rtol, (kind, seed, err)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_config_with_fewer_tasks_than_parameters_and_degenerate_rows(dtype):
    """K <= P (C invertible unless rank-deficient), zero rows, all-zero and K = 1 Jacobians."""
    with jax.enable_x64(dtype == np.float64):
        weights = jax.jit(mtl.weighting.config_weights)
        rtol = 1e-5 if dtype == np.float32 else 1e-12
        for kind in ("normal", "conflicting", "aligned", "rank_deficient", "zero_rows"):
            for k in (2, 5, 10):
                J = M.sample(kind, k)
                Jd = J.astype(dtype)
                G = jnp.matmul(Jd, Jd.T, precision=jax.lax.Precision.HIGHEST)
                w = np.asarray(weights(G), np.float64)
                expected = R.config_ref(J)
                err = np.linalg.norm(w @ J - expected) / np.linalg.norm(expected)
                assert err <= rtol, (kind, k, err)
                if kind == "zero_rows":
                    assert np.all(w[::2] == 0.0)  # zero gradients get zero weight
        zero = weights(jnp.zeros((3, 3), dtype))
        assert np.all(np.asarray(zero) == 0.0)
        g = M.sample("normal", 1).astype(dtype)
        one = weights(jnp.asarray(g @ g.T))
        np.testing.assert_allclose(np.asarray(one), [1.0], rtol=10 * np.finfo(dtype).eps)


@pytest.mark.parametrize("k", REF_KS)
def test_config_matches_official_formula(k):
    for kind in FULL_RANK_KINDS:
        for scale in M.SCALES:
            J = scale * M.sample(kind, k)
            d, _ = _f64("config", J)
            P.assert_close(d, R.config_ref(J), J, 1e-9, f"K={k} {kind}")
            cosines = (J @ d) / (np.linalg.norm(J, axis=1) * np.linalg.norm(d))
            np.testing.assert_allclose(cosines, cosines[0], rtol=1e-9)  # equal angles
            assert cosines[0] > 0


def test_gradvac_three_steps_match_algorithm_1():
    """The state's EMA targets evolve as in the paper; the orders come from the state's key."""
    k, beta = 4, 0.5
    Js = [M.sample("conflicting", k, seed=s) for s in range(3)]
    tx = mtl.aggregation.gradvac(beta=beta, seed=0, num_tasks=k)
    targets = np.zeros((k, k))
    key = jax.random.PRNGKey(0)
    with jax.enable_x64(True):
        params = M.params_like(M.to_tree(Js[0], np.float64))
        state = tx.init(params)
        update = jax.jit(tx.update)
        for step, J in enumerate(Js):
            key, sub = jax.random.split(key)
            (group_key,) = jax.random.split(sub, 1)
            orders = np.asarray(mtl.weighting.visiting_orders(k, group_key))
            expected, targets = R.gradvac_ref(J, orders, targets, beta)
            out, state = update(M.to_tree(J, np.float64), state, params)
            P.assert_close(M.from_tree(out), expected, J, 1e-10, f"step {step}")
            np.testing.assert_allclose(state.inner["global"].targets, targets, atol=1e-12)
    assert np.any(targets > 0)


def test_gradvac_first_step_is_pcgrad_and_per_group_targets():
    J = M.sample("conflicting", 5)
    d_vac, _ = _f64("gradvac", J)
    d_pc, _ = _f64("pcgrad", J)
    P.assert_close(d_vac, d_pc, J, 1e-10, "first step = PCGrad")
    tx = mtl.aggregation.gradvac(granularity="leaf", num_tasks=5)
    jac = M.to_tree(J)
    _, state = jax.jit(tx.update)(jac, tx.init(M.params_like(jac)), M.params_like(jac))
    assert set(state.inner) == {"enc/w", "enc/b", "head"}
    with pytest.raises(ValueError, match="gradvac keeps per-task state.*num_tasks"):
        mtl.aggregation.gradvac().init(M.params_like(jac))


def test_nocl_per_block():
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(3, 6)).astype(np.float32)
    aligned = np.abs(rng.normal(size=(3, 4))).astype(np.float32)  # no conflict in this block
    jac = {"block1": shared, "block2": aligned}
    params = jax.tree.map(lambda x: np.zeros(x.shape[1:], np.float32), jac)
    tx = mtl.aggregation.nocl(granularity="leaf")
    out, _ = tx.update(jac, tx.init(params), params)
    np.testing.assert_allclose(out["block1"], R.nocl_ref(shared), atol=1e-7)
    np.testing.assert_allclose(out["block2"], aligned.mean(0), rtol=1e-6)
    for kind in M.KINDS:
        J = M.sample(kind, 5)
        d, _ = _f64("nocl", J)
        np.testing.assert_allclose(d, R.nocl_ref(J), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_excess_mtl_matches_reference_over_steps(warmup):
    k = 3
    Js = [M.sample("conflicting", k, seed=s) * (1 + s) for s in range(5)]
    expected = R.excess_mtl_ref(Js, robust_step_size=0.5, warmup_steps=warmup)
    tx = mtl.aggregation.excess_mtl(robust_step_size=0.5, warmup_steps=warmup, num_tasks=k)
    with jax.enable_x64(True):
        params = M.params_like(M.to_tree(Js[0], np.float64))
        state = tx.init(params)
        update = jax.jit(tx.update)
        for J, exp in zip(Js, expected, strict=True):
            out, state = update(M.to_tree(J, np.float64), state, params)
            P.assert_close(M.from_tree(out), exp, J, 1e-12, f"warmup={warmup}")
    assert mtl.aggregation.weights(state).shape == (k,)
    with pytest.raises(ValueError, match="excess_mtl keeps per-task state.*num_tasks"):
        mtl.aggregation.excess_mtl().init(params)


def test_ema_weights_recurrence():
    k, alpha = 4, 0.7
    Js = [M.sample("conflicting", k, seed=s) for s in range(3)]
    tx = mtl.aggregation.ema_weights("upgrad", alpha=alpha, num_tasks=k)
    average = np.full(k, 1.0 / k)
    with jax.enable_x64(True):
        params = M.params_like(M.to_tree(Js[0], np.float64))
        state = tx.init(params)
        update = jax.jit(tx.update)
        for J in Js:
            fresh = np.linalg.lstsq(J.T, R.upgrad_ref(J), rcond=None)[0]  # UPGrad's weights
            average = alpha * average + (1 - alpha) * fresh
            out, state = update(M.to_tree(J, np.float64), state, params)
            np.testing.assert_allclose(M.from_tree(out), average @ J, rtol=1e-10, atol=1e-13)
    frozen = mtl.aggregation.ema_weights("mean", alpha=1.0, num_tasks=k)
    out, _ = frozen.update(M.to_tree(Js[0]), frozen.init(params), params)
    np.testing.assert_allclose(M.from_tree(out), Js[0].mean(0), rtol=1e-5)
    with pytest.raises(ValueError, match=r"Unknown weighting 'nope'"):
        mtl.aggregation.ema_weights("nope", num_tasks=k)


def test_random_weighting_draws_softmax_normal_from_the_state_key():
    J = M.sample("normal", 5)
    d, state = _f64("random_weighting", J)
    key = jax.random.PRNGKey(0)
    _, sub = jax.random.split(key)
    (group_key,) = jax.random.split(sub, 1)
    with jax.enable_x64(True):
        z = np.asarray(jax.random.normal(group_key, (5,), dtype=jnp.float64))
    w = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(np.asarray(mtl.aggregation.weights(state)), w, rtol=1e-12)
    np.testing.assert_allclose(d, w @ J, rtol=1e-10)


NEW_AGGREGATORS = [
    "gradvac",
    "nash_mtl",
    "aligned_mtl",
    "upgrad",
    "dualproj",
    "config",
    "random_weighting",
    "fairgrad",
    "nocl",
    "excess_mtl",
    "ema_weights",
    "krum",
    "db_mtl",
    "moco",
]


@pytest.mark.parametrize("name", NEW_AGGREGATORS)
def test_selectable_by_name(name):
    tx = mtl.get_method(name, num_tasks=3).transform
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    state = tx.init(M.params_like(M.to_tree(M.sample("normal", 3))))
    assert mtl.aggregation.weights(state).shape == (3,)  # a fixed-shape state, usable in lax.scan
    with pytest.raises(ValueError, match=rf"Unknown hyper-parameter\(s\) \['bogus'\].*{name}"):
        mtl.get_method(name, bogus=1)


@pytest.mark.parametrize("name", ["gradvac", "excess_mtl", "db_mtl", "moco"])
def test_stateful_aggregators_chain_with_adam_in_a_scan(name):
    J = M.sample("conflicting", 3)
    jac = M.to_tree(J)
    params = M.params_like(jac)
    tx = optax.chain(mtl.get_method(name, num_tasks=3).transform, optax.adam(1e-3))

    def body(state, _):
        updates, state = tx.update(jac, state, params, task_losses=jnp.ones(3))
        return state, updates["head"]

    state, outs = jax.lax.scan(body, tx.init(params), None, length=3)
    assert np.all(np.isfinite(np.asarray(outs)))
    assert mtl.aggregation.weights(state).shape == (3,)


def test_bad_hyperparameters_get_clear_errors():
    with pytest.raises(ValueError, match="beta must be in"):
        mtl.aggregation.gradvac(beta=2.0)
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        mtl.aggregation.nash_mtl(max_norm=-1.0)
    with pytest.raises(ValueError, match="update_weights_every must be a positive integer"):
        mtl.aggregation.nash_mtl(update_weights_every=0)
    with pytest.raises(ValueError, match="robust_step_size must be > 0"):
        mtl.aggregation.excess_mtl(robust_step_size=0.0, num_tasks=2)
    with pytest.raises(ValueError, match="alpha must be in"):
        mtl.aggregation.ema_weights(alpha=1.5, num_tasks=2)
    with pytest.raises(ValueError, match="Unknown weighting 'pcgard'"):
        mtl.weighting.get_weighting("pcgard")


# ---------------------------------------------------------------------------------------------
# Issue 23: Krum, TrimmedMean, MGDA's normalisations, DB-MTL, MoCo.


def _steps(tx, Js, losses_seq, dtype=np.float64):
    """The updates of ``tx`` over a sequence of Jacobians and losses (one jitted update)."""
    params = M.params_like(M.to_tree(Js[0], dtype))
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for J, L in zip(Js, losses_seq, strict=True):
        out, state = update(M.to_tree(J, dtype), state, params, task_losses=jnp.asarray(L, dtype))
        outs.append(M.from_tree(out))
    return outs, state


@pytest.mark.parametrize("k", REF_KS)
def test_krum_matches_the_papers_scores(k):
    compared = 0
    for f in (0, 1, 3):
        for m in (1, 2, k):
            if k < f + 3 or m > k:
                continue
            tx = mtl.aggregation.krum(n_byzantine=f, n_selected=m, num_tasks=k)
            for kind in FULL_RANK_KINDS:
                for scale in M.SCALES:
                    J = scale * M.sample(kind, k)
                    with jax.enable_x64(True):
                        (d,), _ = _steps(tx, [J], [np.ones(k)])
                    P.assert_close(d, R.krum_ref(J, f, m), J, 1e-12, f"K={k} f={f} m={m} {kind}")
                    compared += 1
    if k == 2:  # TorchJD's check: K >= n_byzantine + 3
        assert compared == 0
        with pytest.raises(ValueError, match=r"n_byzantine \+ 3 = 3 tasks.*K=2"):
            mtl.aggregation.krum(num_tasks=2).init(M.params_like(M.to_tree(M.sample("normal", 2))))
    else:
        assert compared >= 9


def test_krum_errors_and_the_representation_path():
    J = M.sample("normal", 4)
    jac = M.to_tree(J)
    params = M.params_like(jac)
    with pytest.raises(ValueError, match=r"n_byzantine \+ 3 = 5 tasks .*; got K=4"):
        mtl.aggregation.krum(n_byzantine=2).update(jac, mtl.aggregation.krum().init(params), params)
    with pytest.raises(ValueError, match=r"n_selected=5 needs at least 5 tasks; got K=4"):
        mtl.aggregation.krum(n_selected=5, num_tasks=4).init(params)
    with pytest.raises(ValueError, match="n_byzantine must be an integer >= 0"):
        mtl.aggregation.krum(n_byzantine=-1)
    with pytest.raises(ValueError, match="n_selected must be an integer >= 1"):
        mtl.get_method("krum:n_selected=0")
    # krum_ub: Krum's choice among the representation gradients, applied to the Jacobian rows
    rep = np.random.default_rng(3).normal(size=(4, 6, 5))
    method = mtl.get_method("krum_ub:n_byzantine=1", num_tasks=4)
    with jax.enable_x64(True):
        out, state = method.transform.update(
            M.to_tree(J, np.float64),
            method.transform.init(params),
            M.params_like(M.to_tree(J, np.float64)),
            rep_grads=jnp.asarray(rep),
        )
    flat = rep.reshape(4, -1)
    chosen = int(np.argmax([np.allclose(R.krum_ref(flat, 1), row) for row in flat]))
    np.testing.assert_allclose(M.from_tree(out), J[chosen], rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(mtl.aggregation.weights(state)), np.eye(4)[chosen])


@pytest.mark.parametrize("k", REF_KS)
def test_trimmed_mean_matches_the_coordinate_wise_definition(k):
    for trim in range(0, (k - 1) // 2 + 1):
        tx = mtl.aggregation.trimmed_mean(trim_number=trim, num_tasks=k)
        for kind in M.KINDS:
            for scale in M.SCALES:
                J = scale * M.sample(kind, k)
                with jax.enable_x64(True):
                    (d,), _ = _steps(tx, [J], [np.ones(k)])
                P.assert_close(d, R.trimmed_mean_ref(J, trim), J, 1e-14, f"K={k} b={trim} {kind}")
    too_many = (k + 1) // 2  # 2 b + 1 > K
    with pytest.raises(
        ValueError, match=rf"needs at least .* = {2 * too_many + 1} tasks; got K={k}"
    ):
        mtl.aggregation.trimmed_mean(trim_number=too_many, num_tasks=k)


@pytest.mark.parametrize("k", REF_KS)
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_normalisations_follow_the_official_code(normalization, k):
    """Weights of the normalised gradients, applied to the raw ones (train_multi_task.py)."""
    losses = np.linspace(0.3, 2.0, k)
    tx = mtl.aggregation.mgda(normalization=normalization, num_tasks=k)
    for kind in FULL_RANK_KINDS:
        J = M.sample(kind, k)
        with jax.enable_x64(True):
            (d,), _ = _steps(tx, [J], [losses])
        expected = R.mgda_normalized_ref(J, losses, normalization)
        P.assert_close(d, expected, J, 1e-9, f"{normalization} K={k} {kind}")


def test_mgda_normalisation_errors_and_default():
    J = M.sample("conflicting", 3)
    jac = M.to_tree(J)
    params = M.params_like(jac)
    tx = mtl.aggregation.mgda(normalization="loss")
    with pytest.raises(ValueError, match="'loss' divides by the task losses: pass task_losses"):
        tx.update(jac, tx.init(params), params)
    with pytest.raises(ValueError, match=r"Unknown MGDA normalization 'L2'.*'l2'"):
        mtl.aggregation.mgda(normalization="L2")
    # "none" is the unnormalised problem, bit for bit
    plain, _ = P.run("mgda", J)
    none = mtl.aggregation.mgda(normalization="none", num_tasks=3)
    out, _ = jax.jit(none.update)(jac, none.init(params), params, task_losses=jnp.ones(3))
    np.testing.assert_array_equal(M.from_tree(out), plain)


def _loss_sequence(k: int, steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(k)
    return [rng.uniform(0.2, 3.0, size=k) for _ in range(steps)]


@pytest.mark.parametrize("k", REF_KS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_db_mtl_matches_libmtl_over_steps(k, dtype):
    Js = [M.sample("conflicting", k, seed=s) * (1 + s) for s in range(4)]
    losses = _loss_sequence(k, 4)
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    for beta, sigma in ((0.9, 0.0), (0.5, 0.5)):
        expected = R.db_mtl_ref(Js, losses, beta, sigma)
        tx = mtl.aggregation.db_mtl(beta=beta, beta_sigma=sigma, num_tasks=k)
        with jax.enable_x64(dtype == np.float64):
            outs, state = _steps(tx, Js, losses, dtype)
        for step, (d, e) in enumerate(zip(outs, expected, strict=True)):
            err = np.linalg.norm(d - e) / np.linalg.norm(e)
            assert err <= rtol, (beta, sigma, step, err)
    assert int(state.inner["global"].step) == 4
    with pytest.raises(ValueError, match="db_mtl keeps per-task state.*num_tasks"):
        mtl.aggregation.db_mtl().init(M.params_like(M.to_tree(Js[0])))


@pytest.mark.parametrize("k", REF_KS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moco_matches_libmtl_over_steps(k, dtype):
    Js = [M.sample("conflicting", k, seed=s) * (1 + s) for s in range(4)]
    losses = _loss_sequence(k, 4)
    cases = [
        dict(),  # LibMTL's defaults, softmax
        dict(beta=0.9, beta_sigma=0.0, gamma=0.5, gamma_sigma=0.0, rho=0.1),
        dict(gamma=2.0, weight_map="simplex"),  # the paper's projection, with a zero weight
    ]
    for case in cases:
        expected = R.moco_ref(Js, losses, **case)
        tx = mtl.aggregation.moco(**case, num_tasks=k)
        with jax.enable_x64(dtype == np.float64):
            outs, state = _steps(tx, Js, losses, dtype)
        # the SLSQP projection of the reference is exact to ~1e-7
        rtol = 1e-6 if "weight_map" in case else (1e-12 if dtype == np.float64 else 2e-6)
        rtol = max(rtol, 2e-6) if dtype == np.float32 else rtol
        for step, (d, e) in enumerate(zip(outs, expected, strict=True)):
            err = np.linalg.norm(d - e) / np.linalg.norm(e)
            assert err <= rtol, (case, step, err)
        lambd = np.asarray(mtl.aggregation.weights(state))
        np.testing.assert_allclose(lambd.sum(), 1.0, rtol=1e-5)
        assert np.all(lambd >= 0)
    with pytest.raises(ValueError, match="moco reads the task losses: pass task_losses"):
        tx = mtl.aggregation.moco(num_tasks=k)
        jac = M.to_tree(Js[0])
        tx.update(jac, tx.init(M.params_like(jac)), M.params_like(jac))
    with pytest.raises(ValueError, match=r"Unknown moco weight_map 'proj'"):
        mtl.aggregation.moco(weight_map="proj")


MIXED_SCALE_REFS = {
    "krum": (dict(n_byzantine=1), lambda J, L: R.krum_ref(J, 1)),
    "trimmed_mean": (dict(trim_number=1), lambda J, L: R.trimmed_mean_ref(J, 1)),
    "mgda": (dict(normalization="loss+"), lambda J, L: R.mgda_normalized_ref(J, L, "loss+")),
    "db_mtl": (dict(), lambda J, L: R.db_mtl_ref([J], [L])[0]),
    "moco": (dict(), lambda J, L: R.moco_ref([J], [L])[0]),
}


@pytest.mark.parametrize("name", sorted(MIXED_SCALE_REFS))
def test_new_methods_with_gradients_of_1e_minus_10_next_to_1e15(name):
    """Rows of norm ~1e-10 and ~1e15 in one Jacobian: float64 matches the reference, float32
    stays finite."""
    kwargs, ref = MIXED_SCALE_REFS[name]
    J = M.sample("normal", 5) * np.array([1e-10, 1e15, 1.0, 1e-10, 1e15])[:, None]
    L = np.array([1e-10, 1e15, 1.0, 0.5, 2.0])
    tx = getattr(mtl.aggregation, name)(**kwargs, num_tasks=5)
    with jax.enable_x64(True):
        (d,), _ = _steps(tx, [J], [L])
    expected = ref(J, L)
    assert np.linalg.norm(d - expected) <= 1e-10 * np.linalg.norm(expected), name
    (d32,), _ = _steps(tx, [J], [L], np.float32)
    assert np.all(np.isfinite(d32)), name
