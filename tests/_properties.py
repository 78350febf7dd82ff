"""Reusable property checks for aggregators (TorchJD's ``_asserts.py`` idea, for optax transforms).

Every check runs an aggregator (by name, through its optax transform, on Jacobians split across
three pytree leaves, see ``tests/_matrices.py``) and asserts one property. Each test module applies
to each aggregator exactly the properties it claims (``tests/test_methods_properties.py``).

Aggregators are built by :data:`FACTORIES` (``K -> transform``, with ``num_tasks=K`` so that
stateful methods work); transforms and their jitted ``update`` are cached per (name, K), so a
shape compiles once per dtype for the whole test session.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linprog

import mtl_jax as mtl
from tests import _matrices as M


def same_batch_twice(tx):
    """A cross-batch aggregator (SDMGrad, MoDo) fed the rows given as both of its row sets
    (``paired_rows = [J, J]``, the single-batch method), so that the checks here, which pass one
    row set, run it; tests/test_cross_batch.py tests two independent ones."""

    def update(jac, state, params=None, **inputs):
        inputs.setdefault("paired_rows", jax.tree.map(lambda x: jnp.stack([x, x]), jac))
        return tx.update(jac, state, params, **inputs)

    return optax.GradientTransformationExtraArgs(tx.init, update)


FACTORIES: dict[str, Callable[[int], object]] = {
    "mean": lambda k: mtl.aggregation.mean(num_tasks=k),
    "sum": lambda k: mtl.aggregation.sum_(num_tasks=k),
    "linear": lambda k: mtl.aggregation.linear(np.linspace(0.5, 2.0, k), num_tasks=k),
    "pcgrad": lambda k: mtl.aggregation.pcgrad(seed=0, num_tasks=k),
    "mgda": lambda k: mtl.aggregation.mgda(num_tasks=k),
    "cagrad": lambda k: mtl.aggregation.cagrad(num_tasks=k),
    "cagrad_1": lambda k: mtl.aggregation.cagrad(c=1.0, num_tasks=k),
    "cagrad_2": lambda k: mtl.aggregation.cagrad(c=2.0, num_tasks=k),
    "imtl_g": lambda k: mtl.aggregation.imtl_g(num_tasks=k),
    "graddrop": lambda k: mtl.aggregation.graddrop(seed=0, num_tasks=k),
    "gradvac": lambda k: mtl.aggregation.gradvac(seed=0, num_tasks=k),
    "nash_mtl": lambda k: mtl.aggregation.nash_mtl(num_tasks=k),
    "nash_mtl_unclipped": lambda k: mtl.aggregation.nash_mtl(max_norm=0.0, num_tasks=k),
    "aligned_mtl": lambda k: mtl.aggregation.aligned_mtl(num_tasks=k),
    "aligned_mtl_median": lambda k: mtl.aggregation.aligned_mtl(scale_mode="median", num_tasks=k),
    "aligned_mtl_rmse": lambda k: mtl.aggregation.aligned_mtl(scale_mode="rmse", num_tasks=k),
    "upgrad": lambda k: mtl.aggregation.upgrad(num_tasks=k),
    "dualproj": lambda k: mtl.aggregation.dualproj(num_tasks=k),
    "config": lambda k: mtl.aggregation.conflict_free(num_tasks=k),
    "random_weighting": lambda k: mtl.aggregation.random_weighting(seed=0, num_tasks=k),
    "fairgrad": lambda k: mtl.aggregation.fairgrad(num_tasks=k),
    "fairgrad_half": lambda k: mtl.aggregation.fairgrad(alpha=0.5, num_tasks=k),
    "fairgrad_2": lambda k: mtl.aggregation.fairgrad(alpha=2.0, num_tasks=k),
    "fairgrad_3": lambda k: mtl.aggregation.fairgrad(alpha=3.0, num_tasks=k),
    "nocl": lambda k: mtl.aggregation.nocl(num_tasks=k),
    "excess_mtl": lambda k: mtl.aggregation.excess_mtl(num_tasks=k),
    "ema_weights": lambda k: mtl.aggregation.ema_weights(num_tasks=k),
    "mgda_l2": lambda k: mtl.aggregation.mgda(normalization="l2", num_tasks=k),
    "krum": lambda k: mtl.aggregation.krum(n_byzantine=1, num_tasks=k),
    "krum_all": lambda k: mtl.aggregation.krum(n_selected=k, num_tasks=k),
    "trimmed_mean": lambda k: mtl.aggregation.trimmed_mean(trim_number=1, num_tasks=k),
    "db_mtl": lambda k: mtl.aggregation.db_mtl(num_tasks=k),
    "moco": lambda k: mtl.aggregation.moco(num_tasks=k),
    "sdmgrad": lambda k: same_batch_twice(mtl.aggregation.sdmgrad(num_tasks=k)),
    "modo": lambda k: same_batch_twice(mtl.aggregation.modo(num_tasks=k)),
}


@functools.cache
def transform(name: str, k: int):
    return FACTORIES[name](k)


@functools.cache
def jitted_update(name: str, k: int):
    return jax.jit(transform(name, k).update)


def run(name: str, J: np.ndarray, *, jit: bool = True, dtype=np.float32, losses=None, state=None):
    """Runs aggregator ``name`` on ``J[K, P]`` (as a 3-leaf tree): ``(d[P] float64, state)``.

    ``losses`` default to ones (no method here reads them unless configured to).
    """
    k = J.shape[0]
    tx = transform(name, k)
    jac = M.to_tree(J, dtype)
    params = M.params_like(jac)
    state = tx.init(params) if state is None else state
    update = jitted_update(name, k) if jit else tx.update
    # Always pass losses (ones by default) so that every call shares one compiled variant.
    losses = np.ones(k) if losses is None else losses
    out, state = update(jac, state, params, task_losses=jnp.asarray(losses, dtype))
    return M.from_tree(out), state


def row_scale(J: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(J, axis=1))) if J.size else 0.0


def assert_close(actual, expected, J, rtol, what=""):
    """``|actual - expected| <= rtol * (K max_k |g_k|)``, the natural scale of any aggregate."""
    scale = J.shape[0] * row_scale(J)
    err = np.linalg.norm(np.asarray(actual) - np.asarray(expected))
    assert err <= rtol * scale + 1e-300, f"{what}: error {err:.3e} > {rtol:.0e} x {scale:.3e}"


def ascent_margin(J: np.ndarray) -> float:
    """Gordan: ``max_{|d|_inf <= 1} min_k cos-like g_k . d / |g_k|`` over the non-zero rows, by LP.

    Positive iff some ``d`` improves every task with a non-zero gradient (``J d > 0`` on them);
    0 when a non-negative combination of them vanishes (no solution to Nash-MTL's system).
    """
    rows = J[np.linalg.norm(J, axis=1) > 0]
    if rows.shape[0] == 0:
        return 0.0
    k, p = rows.shape
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    c = np.zeros(p + 1)
    c[-1] = -1.0
    a_ub = np.hstack([-unit, np.ones((k, 1))])
    bounds = [(-1.0, 1.0)] * p + [(None, 1.0)]
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(k), bounds=bounds, method="highs")
    return float(-res.fun) if res.status == 0 else 0.0


def has_common_ascent(J: np.ndarray, margin: float = 0.05) -> bool:
    """Some direction improves every task with a non-zero gradient, by at least ``margin``.

    The margin keeps out nearly degenerate problems, whose bargaining solution float32 cannot
    resolve (their exactness is tested in float64).
    """
    return ascent_margin(J) > margin


# ---------------------------------------------------------------------------------------------
# The properties.


def assert_finite_on_every_sample(name: str, ks=(1, 2, 5, 40)) -> None:
    """Finite update and weights for every family (zero rows, rank deficiency, ...) and scale."""
    for k, kind, scale, J in M.all_samples(ks=ks):
        d, state = run(name, J)
        assert np.all(np.isfinite(d)), f"{name}: non-finite output for K={k} {kind} x{scale:g}"
        w = mtl.aggregation.weights(state)
        if w is not None:
            assert np.all(np.isfinite(np.asarray(w))), f"{name}: non-finite weights K={k} {kind}"


def assert_non_conflicting(name: str, J: np.ndarray, rtol: float, what: str = "") -> None:
    """``g_k . d >= -rtol (|d| + max|g|) |g_k|`` for every task (float32 rounding allowance)."""
    d, _ = run(name, J)
    dots = J @ d
    tol = rtol * (np.linalg.norm(d) + row_scale(J)) * np.linalg.norm(J, axis=1)
    assert np.all(dots >= -tol - 1e-300), f"{name} {what}: conflicting, min g.d = {dots.min():.3e}"


def assert_permutation_equivariant(name: str, J: np.ndarray, rng, rtol: float) -> None:
    """Permuting the tasks does not change the update."""
    perm = rng.permutation(J.shape[0])
    d, _ = run(name, J)
    dp, _ = run(name, J[perm])
    assert_close(dp, d, J, rtol, f"{name} permutation")


def assert_homogeneous(name: str, J: np.ndarray, degree: float, rtol: float) -> None:
    """``A(a J) = a^degree A(J)`` for ``a`` in 1e-8 .. 1e8 (the documented scaling of the method)."""
    d, _ = run(name, J)
    for a in (1e-8, 1e-3, 1e3, 1e8):
        da, _ = run(name, a * J)
        assert_close(da / a**degree, d, J, rtol, f"{name} scaling by {a:g}")


def assert_linear_under_scaling(name: str, J: np.ndarray, rng, rtol: float) -> None:
    """TorchJD's property: ``c -> A(diag(c) J)`` is linear on positive ``c``."""
    for _ in range(3):
        c1, c2 = rng.uniform(0.1, 2.0, size=(2, J.shape[0]))
        a, b = rng.uniform(0.1, 2.0, size=2)
        x1, _ = run(name, c1[:, None] * J)
        x2, _ = run(name, c2[:, None] * J)
        x, _ = run(name, (a * c1 + b * c2)[:, None] * J)
        assert_close(x, a * x1 + b * x2, J, rtol, f"{name} linear under scaling")


def assert_per_task_scale_invariant(name: str, J: np.ndarray, rng, rtol: float) -> None:
    """``A(diag(c) J) = A(J)`` for positive ``c``: the update ignores each task's gradient scale."""
    d, _ = run(name, J)
    for _ in range(3):
        c = 10.0 ** rng.uniform(-3, 3, size=J.shape[0])
        dc, _ = run(name, c[:, None] * J)
        assert_close(dc, d, J, rtol, f"{name} per-task scaling")


def assert_equals(name: str, J: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    d, _ = run(name, J)
    assert_close(d, expected, J, rtol, f"{name} {what}")


def assert_jit_matches_eager(name: str, J: np.ndarray, rtol: float) -> None:
    d_jit, _ = run(name, J, jit=True)
    d_eager, _ = run(name, J, jit=False)
    assert_close(d_eager, d_jit, J, rtol, f"{name} jit vs eager")


def assert_seed_reproducible(make: Callable[[int], object], J: np.ndarray, steps: int = 3) -> None:
    """Same seed: identical updates at every step; another seed: different updates.

    The seed only enters the initial state, so one jitted ``update`` serves every seed.
    """
    jac = M.to_tree(J)
    params = M.params_like(jac)
    update = jax.jit(make(0).update)

    def trajectory(seed):
        state = make(seed).init(params)
        outs = []
        for _ in range(steps):
            out, state = update(jac, state, params)
            outs.append(M.from_tree(out))
        return outs

    first, again, other = trajectory(0), trajectory(0), trajectory(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(first, other, strict=True))
    assert not np.allclose(first[0], first[1]), "a fresh draw at every step"
