"""Every aggregator against exactly the properties it claims (the README's "claimed properties").

The claims are the table :data:`CLAIMS`; each test below applies one property (a check of
``tests/_properties.py``) to every aggregator that claims it, in float32 through the optax
transform, on the matrix families of ``tests/_matrices.py``. Tolerances are per method: the
QP-based methods (UPGrad, DualProj) carry the float32 rounding of the K x K projections,
amplified by the conditioning of the passive Gram block (<= ~2e-5 relative on these samples).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mtl_jax as mtl
from tests import _matrices as M
from tests import _properties as P
from tests import _reference as R

KS = (2, 40)  # the float32 shapes every property test shares (K = 1 is tested on its own)
FAMILIES = ("normal", "conflicting", "rank_deficient")

# name -> {property: setting}. Non-conflicting modes: "always"; "k2" (two tasks only);
# "solvable" (when some direction improves every task: the bargaining methods' system has no
# solution otherwise); "independent" (linearly independent gradients); "feasible" (CAGrad: when a
# non-conflicting direction lies in the ball |d - g0| <= c |g0|, i.e. when the projection of g0
# onto the dual cone does, the update does not conflict).
CAGRAD_C = {"cagrad": 0.5, "cagrad_1": 1.0, "cagrad_2": 2.0}
# A Pareto-stationary point (the origin inside the hull of the gradients): d = 0 is optimal for
# c >= 1 (issue 11's peer-suite case).
STATIONARY = np.array([[2.0, 1.0], [-1.0, 0.5], [-1.0, -1.0]])
CLAIMS: dict[str, dict] = {
    "mean": dict(permutation=1e-6, homogeneous=(1.0, 1e-6), linear=1e-5, mean_when_agree=1e-6),
    "sum": dict(permutation=1e-6, homogeneous=(1.0, 1e-6), linear=1e-5),
    "linear": dict(homogeneous=(1.0, 1e-6), linear=1e-5),
    "pcgrad": dict(non_conflicting=("k2", 1e-5), homogeneous=(1.0, 5e-5), sum_when_agree=1e-5),
    "mgda": dict(non_conflicting=("always", 1e-5), permutation=2e-5, homogeneous=(1.0, 5e-5)),
    "cagrad": dict(non_conflicting=("feasible", 1e-5), permutation=2e-5, homogeneous=(1.0, 5e-5)),
    "cagrad_1": dict(non_conflicting=("feasible", 1e-5), permutation=2e-5, homogeneous=(1.0, 5e-5)),
    "cagrad_2": dict(non_conflicting=("feasible", 1e-5), permutation=2e-5, homogeneous=(1.0, 5e-5)),
    "imtl_g": dict(permutation=2e-5, homogeneous=(1.0, 5e-5)),
    "graddrop": dict(homogeneous=(1.0, 1e-5)),
    "gradvac": dict(homogeneous=(1.0, 5e-5), sum_when_agree=1e-5),
    "nash_mtl": dict(
        non_conflicting=("solvable", 1e-5),
        permutation=2e-5,
        homogeneous=(0.0, 2e-5),
        per_task_scale=2e-5,
    ),
    "aligned_mtl": dict(permutation=5e-5, homogeneous=(1.0, 5e-5)),
    "aligned_mtl_median": dict(homogeneous=(1.0, 5e-5)),
    "aligned_mtl_rmse": dict(homogeneous=(1.0, 5e-5)),
    "upgrad": dict(
        non_conflicting=("always", 5e-5),
        permutation=5e-5,
        homogeneous=(1.0, 5e-5),
        linear=5e-5,
        mean_when_agree=1e-6,
    ),
    "dualproj": dict(
        non_conflicting=("always", 5e-5),
        permutation=5e-5,
        homogeneous=(1.0, 5e-5),
        mean_when_agree=1e-6,
    ),
    "config": dict(
        non_conflicting=("independent", 1e-5),
        permutation=5e-5,
        homogeneous=(1.0, 5e-5),
        linear=5e-5,
    ),
    "random_weighting": dict(homogeneous=(1.0, 1e-6)),
    "fairgrad": dict(
        non_conflicting=("solvable", 1e-5),
        permutation=2e-5,
        homogeneous=(0.0, 2e-5),
        per_task_scale=2e-5,
    ),
    "fairgrad_half": dict(non_conflicting=("solvable", 1e-5), homogeneous=(1.0 / 3.0, 5e-5)),
    "fairgrad_3": dict(non_conflicting=("solvable", 1e-5), homogeneous=(-0.5, 5e-5)),
    "nocl": dict(permutation=1e-6, homogeneous=(1.0, 1e-6), mean_when_agree=1e-6),
    "excess_mtl": dict(permutation=1e-6, first_step_mean=1e-6),
    "ema_weights": dict(permutation=2e-5, homogeneous=(1.0, 5e-5)),
    # weights of the normalised gradients applied to the raw ones (the official code): neither
    # non-conflicting nor invariant to each task's scale, unlike plain MGDA / LibMTL's variant
    "mgda_l2": dict(permutation=2e-5, homogeneous=(1.0, 5e-5)),
    "krum": dict(permutation=1e-6, homogeneous=(1.0, 1e-6)),
    "krum_all": dict(permutation=1e-6, homogeneous=(1.0, 1e-6), linear=1e-5, mean_when_agree=1e-6),
    "trimmed_mean": dict(permutation=1e-6, homogeneous=(1.0, 1e-6)),
    # DB-MTL and MoCo: not homogeneous over 1e-8..1e8 (LibMTL's 1e-8 in |b| + 1e-8, |g| + 1e-8)
    "db_mtl": dict(permutation=1e-6, equal_norm_rows=1e-5),
    "moco": dict(permutation=1e-6, equal_norm_rows=1e-5),
    # SDMGrad, MoDo: rows given as both batches here (tests/_properties.py, same_batch_twice);
    # not homogeneous (SDMGrad's 1e-8 in s^2 + 1e-8; MoDo's raw gamma C), no conflict claim.
    # SDMGrad's permutation equivariance is tested for K <= 7 (tests/test_cross_batch.py): at
    # K = 40 its inner loop (lr = 5, 20 steps) does not converge and amplifies rounding ~1e5x
    # (a permutation moved d by 1.8% in float32, 5e-11 in float64)
    "sdmgrad": dict(),
    "modo": dict(permutation=1e-6),
}
# The methods that need more tasks than the shared shapes (KS, K = 1) give: TorchJD's checks
# (Krum: K >= n_byzantine + 3; TrimmedMean: K >= 2 trim_number + 1) raise a ValueError. Krum
# (n_byzantine = 1) is tested from K = 5: at K = n_byzantine + 3 a score is the distance to the
# one nearest gradient, so the two mutually nearest gradients always tie (the lower index wins).
MIN_TASKS = {"krum": 5, "krum_all": 3, "trimmed_mean": 3}


def task_counts(name: str, ks=KS) -> tuple[int, ...]:
    """``ks`` with every K below the method's minimum raised to it."""
    return tuple(sorted({max(k, MIN_TASKS.get(name, 1)) for k in ks}))


NAMES = sorted(CLAIMS)
RANDOMISED = {
    "pcgrad": lambda seed: mtl.aggregation.pcgrad(seed=seed, num_tasks=5),
    "graddrop": lambda seed: mtl.aggregation.graddrop(seed=seed, num_tasks=5),
    "gradvac": lambda seed: mtl.aggregation.gradvac(seed=seed, num_tasks=5),
    "random_weighting": lambda seed: mtl.aggregation.random_weighting(seed=seed, num_tasks=5),
    "ema_weights": lambda seed: mtl.aggregation.ema_weights(
        "random_weighting", seed=seed, num_tasks=5
    ),
}


def claiming(prop: str) -> list[str]:
    return [name for name in NAMES if prop in CLAIMS[name]]


def test_every_registered_aggregator_has_claims():
    registered = set(mtl.aggregation.AGGREGATORS)
    assert registered <= set(CLAIMS), sorted(registered - set(CLAIMS))


@pytest.mark.parametrize("name", NAMES)
def test_finite_on_degenerate_input(name):
    """Zero rows, K = 1, parallel/opposite and rank-deficient gradients, scales 1e-8..1e8."""
    P.assert_finite_on_every_sample(name, ks=task_counts(name, (1, *KS)))


@pytest.mark.parametrize("name", claiming("non_conflicting"))
def test_non_conflicting(name):
    mode, rtol = CLAIMS[name]["non_conflicting"]
    checked = 0
    stationary = np.pad(STATIONARY, ((0, 0), (0, M.P - 2)))
    samples = [(k, kind) for k in KS for kind in M.KINDS] + [(3, "stationary")]
    for k, kind in samples:
        if mode == "k2" and k != 2:
            continue
        for scale in M.SCALES:
            J = scale * (stationary if kind == "stationary" else M.sample(kind, k))
            if mode == "solvable" and not P.has_common_ascent(J):
                continue
            if mode == "independent" and np.linalg.matrix_rank(J) < k:
                continue
            if mode == "feasible" and not _cagrad_can_avoid_conflict(J, CAGRAD_C[name]):
                continue
            P.assert_non_conflicting(name, J, rtol, f"K={k} {kind} x{scale:g}")
            checked += 1
    assert checked >= 6


def _cagrad_can_avoid_conflict(J: np.ndarray, c: float) -> bool:
    """Some ``d`` with ``J d >= 0`` lies in ``|d - g0| <= c |g0|`` (NNLS projection of g0)."""
    g0 = J.mean(axis=0)
    nearest = R.dualproj_ref(J)  # the point of the dual cone nearest to g0
    return bool(np.linalg.norm(nearest - g0) <= c * np.linalg.norm(g0) * (1 - 1e-6))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["cagrad_1", "cagrad_2"])
def test_cagrad_is_not_conflicting_at_a_pareto_stationary_point(name, dtype):
    """Issue 11: J = [[2, 1], [-1, 0.5], [-1, -1]], c in {1, 2}: d = 0 is feasible and optimal;
    the update was (0, -0.167) (J d = (-0.168, -0.084, 0.168)) with weights ~1e6."""
    with jax.enable_x64(dtype == np.float64):
        J = np.pad(STATIONARY, ((0, 0), (0, M.P - 2)))
        d, state = P.run(name, J, dtype=dtype)
        w = np.asarray(mtl.aggregation.weights(state))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.linalg.norm(d) <= tol * 3, d[:2]
    assert np.min(J @ d) >= -tol * 5, J @ d
    assert np.max(np.abs(w)) < 10, w


@pytest.mark.parametrize("name", claiming("permutation"))
def test_permutation_equivariance(name):
    rng = np.random.default_rng(0)
    for k in task_counts(name):
        for kind in FAMILIES:
            P.assert_permutation_equivariant(
                name, M.sample(kind, k), rng, CLAIMS[name]["permutation"]
            )


@pytest.mark.parametrize("name", claiming("homogeneous"))
def test_documented_scaling(name):
    """``A(a J) = a^degree A(J)``: degree 1 for most methods, 0 for Nash-MTL, (1-a)/(1+a) for FairGrad."""
    degree, rtol = CLAIMS[name]["homogeneous"]
    for k in task_counts(name):
        for kind in ("normal", "conflicting"):
            P.assert_homogeneous(name, M.sample(kind, k), degree, rtol)


@pytest.mark.parametrize("name", claiming("linear"))
def test_linear_under_scaling(name):
    rng = np.random.default_rng(1)
    for k in task_counts(name):
        P.assert_linear_under_scaling(name, M.sample("conflicting", k), rng, CLAIMS[name]["linear"])


@pytest.mark.parametrize("name", claiming("per_task_scale"))
def test_invariant_to_each_tasks_scale(name):
    rng = np.random.default_rng(2)
    for k in KS:
        for kind in ("normal", "conflicting"):
            J = M.sample(kind, k)
            P.assert_per_task_scale_invariant(name, J, rng, CLAIMS[name]["per_task_scale"])


@pytest.mark.parametrize("name", claiming("mean_when_agree"))
def test_mean_when_all_tasks_agree(name):
    for k in task_counts(name):
        for kind in ("aligned", "parallel"):
            J = M.sample(kind, k)
            assert np.all(J @ J.T >= 0)
            P.assert_equals(name, J, J.mean(axis=0), CLAIMS[name]["mean_when_agree"], "mean")


@pytest.mark.parametrize("name", claiming("sum_when_agree"))
def test_sum_when_all_tasks_agree(name):
    for k in task_counts(name):
        for kind in ("aligned", "parallel"):
            J = M.sample(kind, k)
            P.assert_equals(name, J, J.sum(axis=0), CLAIMS[name]["sum_when_agree"], "sum")


@pytest.mark.parametrize("name", claiming("first_step_mean"))
def test_first_step_is_the_mean(name):
    for k in task_counts(name):
        J = M.sample("conflicting", k)
        P.assert_equals(name, J, J.mean(axis=0), CLAIMS[name]["first_step_mean"], "first step")


@pytest.mark.parametrize("name", claiming("equal_norm_rows"))
def test_every_task_contributes_with_the_same_norm(name):
    """DB-MTL rescales every (EMA, log-loss) row to the largest norm; MoCo's first step weighs
    rows of norm ``beta L_k``: with equal losses, the first update is ``c sum_k g_k / |g_k|``."""
    for k in task_counts(name):
        J = M.sample("conflicting", k)
        units = J / np.linalg.norm(J, axis=1, keepdims=True)
        d, state = P.run(name, J)
        if name == "db_mtl":  # (1 - beta) max|g| sum_k g_k / |g_k|
            expected = 0.1 * np.max(np.linalg.norm(J, axis=1)) * units.sum(axis=0)
        else:  # beta sum_k lambda_k g_k / |g_k|, lambda = softmax(1/K - gamma Y Y^T / K)
            w = np.asarray(mtl.aggregation.weights(state), np.float64)
            expected = 0.5 * w @ units
        P.assert_close(d, expected, J, CLAIMS[name]["equal_norm_rows"], f"{name} K={k}")


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_eager_agree(name):
    for kind in ("conflicting", "zero_rows"):
        P.assert_jit_matches_eager(name, M.sample(kind, task_counts(name, (2,))[0]), 1e-5)


@pytest.mark.parametrize("name", sorted(RANDOMISED))
def test_reproducible_for_a_seed(name):
    P.assert_seed_reproducible(RANDOMISED[name], M.sample("conflicting", 5))


# Single task: the update is a positive multiple of the gradient (which one is documented).
SINGLE_TASK_FACTOR = {
    "cagrad": lambda g: 1.5,  # g0 + c |g0| g0 / |g0|
    "cagrad_1": lambda g: 2.0,
    "cagrad_2": lambda g: 3.0,
    "nash_mtl": lambda g: 1.0 / np.linalg.norm(g),  # g / |g| (norm sqrt(K) = 1, not clipped)
    "nash_mtl_unclipped": lambda g: 1.0 / np.linalg.norm(g),
    "fairgrad": lambda g: 1.0 / np.linalg.norm(g),  # w = 1/|g|
    "fairgrad_half": lambda g: np.linalg.norm(g) ** (-2 * 0.5 / 1.5),  # |g|^2 w = w^-2
    "fairgrad_3": lambda g: np.linalg.norm(g) ** (-2 * 3 / 4),  # |g|^2 w = w^(-1/3)
    "ema_weights": lambda g: 1.0,  # 0.9 * 1 + 0.1 * 1
    "linear": lambda g: 0.5,
    "db_mtl": lambda g: 0.1,  # (1 - beta) g / L, L = 1
    "moco": lambda g: 0.5 / np.linalg.norm(g),  # beta L g / |g|, L = 1
}


@pytest.mark.parametrize("name", NAMES)
def test_single_task(name):
    J = M.sample("normal", 1)
    if name in MIN_TASKS:
        with pytest.raises(ValueError, match=r"needs at least .* tasks.*got K=1"):
            P.run(name, J)
        return
    d, _ = P.run(name, J)
    factor = SINGLE_TASK_FACTOR.get(name, lambda g: 1.0)(J[0])
    np.testing.assert_allclose(d, factor * J[0], rtol=2e-5, atol=1e-6 * np.abs(factor * J[0]).max())


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_input_gives_an_all_nan_update_and_keeps_the_state(name):
    """The documented behaviour of every aggregator (mtl_jax/aggregation/): a non-finite
    gradient or loss makes the whole update NaN; the method's own state is not poisoned."""
    k = task_counts(name, (2,))[0]
    J = M.sample("conflicting", k)
    _, clean_state = P.run(name, J)
    for bad_jac, bad_losses in ((np.nan, None), (None, np.inf)):
        Jb = J.copy()
        losses = np.ones(k)
        if bad_jac is not None:
            Jb[1, 3] = bad_jac
        if bad_losses is not None:
            losses[0] = bad_losses
        d, state = P.run(name, Jb, losses=losses, state=clean_state)
        assert np.all(np.isnan(d)), name
        d_next, _ = P.run(name, J, state=state)
        assert np.all(np.isfinite(d_next)), f"{name}: the state was poisoned"
