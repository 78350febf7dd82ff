"""The two-objective toy of CAGrad / Nash-MTL / FAMO (:mod:`mtl_jax.testing.toy`) and its
experiment (:mod:`experiments.toy`).

The losses are checked against a NumPy transcription of the official code's formulas (CAGrad's
``toy.py``, Nash-MTL's ``experiments/toy/problem.py``), their gradients against central finite
differences of that transcription (and, at the clamps, against ``torch.clamp``'s rule written out
by hand); Pareto stationarity against a brute-force minimum over a grid of weights, and the
Pareto front against every point of a dense grid of parameters (none may dominate it). The runs
assert only what the full runs of ``python -m experiments.toy`` showed (docs/toy.md).
"""

from __future__ import annotations

import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.testing import toy

SCALES = (1.0, 0.1)


# ---------------------------------------------------------------------------------------------
# An independent NumPy reference, written from the official code's formulas.


def reference_losses(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``x[..., 2] -> [..., 2]`` in float64: torch.clamp(v, lo) is max(v, lo)."""
    x1, x2 = x[..., 0], x[..., 1]
    f1 = np.log(np.maximum(np.abs(0.5 * (-x1 - 7) - np.tanh(-x2)), 5e-6)) + 6
    f2 = np.log(np.maximum(np.abs(0.5 * (-x1 + 3) + np.tanh(-x2) + 2), 5e-6)) + 6
    c1 = np.maximum(np.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = np.maximum(np.tanh(-x2 * 0.5), 0)
    return np.stack([scale * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2], axis=-1)


def reference_jacobian(x: np.ndarray, scale: float = 1.0, h: float = 1e-6) -> np.ndarray:
    """Central differences of :func:`reference_losses` at ``x[2]``: ``[2 tasks, 2 params]``."""
    cols = []
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        cols.append((reference_losses(x + e, scale) - reference_losses(x - e, scale)) / (2 * h))
    return np.stack(cols, axis=-1)


def brute_force_stationarity(jac: np.ndarray) -> float:
    """``min_w |w g1 + (1 - w) g2|`` over 100,001 weights in [0, 1]."""
    w = np.linspace(0.0, 1.0, 100_001)[:, None]
    return float(np.min(np.linalg.norm(w * jac[0] + (1 - w) * jac[1], axis=-1)))


# ---------------------------------------------------------------------------------------------
# The losses and their gradients


@pytest.mark.parametrize("scale", SCALES)
def test_losses_match_the_formulas(scale):
    rng = np.random.default_rng(0)
    points = np.concatenate(
        [
            rng.uniform(-10, 10, size=(500, 2)),
            np.asarray(toy.CAGRAD_STARTS + toy.NASH_MTL_STARTS),
            [[7.0, -8.0], [-7.0, -8.0], [0.0, -8.3552], [3.0, 0.0]],
        ]
    )
    got = np.asarray(toy.losses(jnp.asarray(points, jnp.float32), scale))
    np.testing.assert_allclose(got, reference_losses(points, scale), rtol=2e-5, atol=2e-5)
    one = np.asarray(toy.losses(jnp.asarray(points[0], jnp.float32), scale))  # x[2] -> [2]
    np.testing.assert_allclose(one, got[0], rtol=1e-6)


def test_the_losses_say_what_shape_they_need():
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 2\]"):
        toy.losses(jnp.zeros(3))


@pytest.mark.parametrize("scale", SCALES)
def test_gradients_match_finite_differences_off_the_kinks(scale):
    rng = np.random.default_rng(1)
    points = rng.uniform(-10, 10, size=(60, 2))
    points = points[np.abs(points[:, 1]) > 0.05]  # off the switch x2 = 0
    jacobians = jax.jit(jax.vmap(jax.jacrev(lambda x: toy.losses(x, scale))))
    jac = jacobians(jnp.asarray(points, jnp.float32))
    want = np.stack([reference_jacobian(p, scale) for p in points])
    np.testing.assert_allclose(np.asarray(jac), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("x1", [0.0, -8.5, 9.0, 3.0])
def test_gradient_at_the_switch_passes_both_clamps(scale, x1):
    """At ``x2 = 0`` both ``c1 = max(tanh(x2/2), 0)`` and ``c2 = max(tanh(-x2/2), 0)`` are at
    their clamp; ``torch.clamp`` passes the gradient at equality, so ``dc1/dx2 = 1/2`` and
    ``dc2/dx2 = -1/2`` and (c1 = c2 = 0) ``dL/dx2 = (f - g) / 2``, ``dL/dx1 = 0``. A
    gradient-halving ``max`` would give ``(f - g) / 4`` -- the Nash-MTL start (0, 0) is here."""
    f1 = np.log(max(abs(0.5 * (-x1 - 7) - np.tanh(0.0)), 5e-6)) + 6
    f2 = np.log(max(abs(0.5 * (-x1 + 3) + np.tanh(0.0) + 2), 5e-6)) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * 64) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * 64) / 10 - 20
    want = np.array([[0.0, scale * 0.5 * (f1 - g1)], [0.0, 0.5 * (f2 - g2)]])
    jac = jax.jacrev(lambda x: toy.losses(x, scale))(jnp.asarray([x1, 0.0], jnp.float32))
    np.testing.assert_allclose(np.asarray(jac), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x2", [0.5, 2.0, 6.0])
def test_gradient_at_the_log_clamp_is_flat_in_the_argument(x2):
    """On the bottom of ``L1``'s valley ``|0.5 (-x1 - 7) - tanh(-x2)| < 5e-6`` and the clamp
    holds ``f1 = log(5e-6) + 6``: no gradient through it, ``dL1/dx2 = f1 dc1/dx2``."""
    x1 = np.float32(-7 + 2 * np.tanh(x2))  # 0.5 (-x1 - 7) = tanh(-x2) up to float32 rounding
    x = jnp.asarray([x1, x2], jnp.float32)
    residual = abs(0.5 * (-float(x1) - 7) - np.tanh(-x2))
    assert residual < 5e-6
    jac = np.asarray(jax.jacrev(toy.losses)(x))
    floor = np.log(5e-6) + 6
    dc1 = 0.5 * (1 - np.tanh(x2 / 2) ** 2)
    np.testing.assert_allclose(jac[0], [0.0, floor * dc1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The Pareto set and front


def test_pareto_set_runs_between_the_two_minima_near_the_papers_line():
    pareto = np.asarray(toy.pareto_set(201))
    assert pareto.shape == (201, 2)
    np.testing.assert_allclose(pareto[[0, -1], 0], [-7.0, 7.0], atol=1e-5)
    assert np.all(np.diff(pareto[:, 0]) > 0)
    # the papers draw the front as x2 = -8.3552 for x1 in [-7, 7]: our middle point
    np.testing.assert_allclose(pareto[100], [0.0, -8.3552], atol=2e-4)
    assert np.all((pareto[:, 1] < -8.35) & (pareto[:, 1] > -8.44))
    with pytest.raises(ValueError, match="num_points >= 2"):
        toy.pareto_set(1)


@pytest.mark.parametrize("scale", SCALES)
def test_pareto_set_points_are_stationary(scale):
    pareto = toy.pareto_set(21)
    got = jax.jit(jax.vmap(lambda x: toy.stationarity(x, scale)))(pareto)
    assert np.all(np.asarray(got) < 1e-4), got
    for x in np.asarray(pareto, np.float64):
        assert brute_force_stationarity(reference_jacobian(x, scale)) < 1e-4, x


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(
    "x",
    [
        (0.0, -7.5),  # below/above the set in x2
        (0.0, -9.5),
        (3.0, -8.0),
        (-8.0, -8.43),  # beyond the minima in x1
        (8.5, -8.43),
        (-8.5, -5.0),  # a CAGrad start
        (-5.0, 3.0),  # in the upper half-plane, off the valleys
        (9.0, 9.0),
    ],
)
def test_points_off_the_pareto_set_are_not_stationary(scale, x):
    x = np.asarray(x, np.float64)
    want = brute_force_stationarity(reference_jacobian(x, scale))
    assert want > 1e-3
    got = float(toy.stationarity(jnp.asarray(x, jnp.float32), scale))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("scale", SCALES)
def test_no_point_of_a_dense_grid_dominates_the_front(scale):
    front = np.asarray(toy.pareto_front(101, scale), np.float64)
    want = reference_losses(np.asarray(toy.pareto_set(101), np.float64), scale)
    np.testing.assert_allclose(front, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(front[:, 0]) < 0) and np.all(np.diff(front[:, 1]) > 0)
    grid = np.linspace(-10, 10, 201)
    points = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    values = reference_losses(points, scale)  # [P, 2]
    margin = 1e-4 * np.ptp(front, axis=0)
    dominated = np.all(values[:, None, :] < front[None, :, :] - margin, axis=-1)  # [P, F]
    assert not dominated.any(), points[np.flatnonzero(dominated.any(axis=1))[:5]]
    # ...while a grid point dominates a point just off the front (the check can fail)
    off = reference_losses(np.asarray([[0.0, -7.0]]), scale)[0]
    assert np.any(np.all(values < off - margin, axis=-1))


def test_distance_to_curve_matches_dense_sampling():
    rng = np.random.default_rng(2)
    curve = np.cumsum(rng.normal(size=(7, 2)), axis=0)
    points = rng.normal(scale=3, size=(40, 2))
    t = np.linspace(0, 1, 2_001)[:, None]
    dense = np.concatenate([a + t * (b - a) for a, b in itertools.pairwise(curve)])
    want = np.min(np.linalg.norm(points[:, None] - dense[None], axis=-1), axis=1)
    got = np.asarray(toy.distance_to_curve(jnp.asarray(points), jnp.asarray(curve)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match=r"\[N >= 2, 2\]"):
        toy.distance_to_curve(jnp.zeros((3, 2)), jnp.zeros((1, 2)))


# ---------------------------------------------------------------------------------------------
# Short runs of the experiment: what the full runs (docs/toy.md) showed, in fewer steps


@functools.cache
def _run(method: str, setup: str, steps: int):
    from experiments import toy as experiment

    trajectory = experiment.run_method(method, experiment.SETUPS[setup], steps, record_every=500)
    rows = experiment.summarize(method, trajectory, experiment.SETUPS[setup])
    return trajectory, {tuple(r["start"]): r for r in rows}


@pytest.mark.parametrize("method", ["mgda", "nash_mtl"])
def test_mgda_and_nash_mtl_reach_the_front_from_every_cagrad_start(method):
    """Full run: MGDA stays on the front from step 16,400 at the latest, Nash-MTL 12,700."""
    trajectory, rows = _run(method, "cagrad", 25_000)
    assert trajectory.x.shape == (3, 51, 2) and np.all(np.isfinite(trajectory.x))
    for start, row in rows.items():
        assert row["on_front"], (start, row)
        assert row["stationarity"] < 1e-2, (start, row)
        final = np.asarray(row["final_x"])
        assert -7.05 <= final[0] <= 7.05 and -8.5 < final[1] < -8.3, (start, final)


def test_the_mean_reaches_the_front_only_from_the_lower_start():
    """Linear scalarisation (the mean): on the front from (-8.5, -5) within 2,000 steps; from the
    two upper starts it enters the log valleys of the upper half-plane (x2 > 0) and is still
    there, far from the front, after 25,000 steps (and after 100,000: the slow test below)."""
    _, rows = _run("mean", "cagrad", 25_000)
    assert rows[(-8.5, -5.0)]["on_front"] and rows[(-8.5, -5.0)]["steps_to_front"] <= 2_000
    for start in [(-8.5, 7.5), (9.0, 9.0)]:
        assert not rows[start]["on_front"]
        assert rows[start]["front_distance"] > 0.5
        assert rows[start]["final_x"][1] > 1.0, rows[start]


def test_nash_mtl_reaches_the_front_from_every_nash_mtl_start_and_the_mean_does_not():
    """Nash-MTL's setup (L1 scaled by 0.1, 35,000 steps): Nash-MTL stays on the front from step
    12,700 at the latest; the mean never leaves the upper half-plane from (9, 9), and from the
    starts where it reaches the front it ends at the minimiser of its own loss
    ``0.1 L1 + L2``, ``x1 = -6.3 / 1.1`` (on the quadratics, ``0.1 (x1 - 7) + (x1 + 7) = 0``),
    next to the minimum of L2 (the larger loss)."""
    _, nash = _run("nash_mtl", "nash_mtl", 35_000)
    _, mean = _run("mean", "nash_mtl", 35_000)
    for start in toy.NASH_MTL_STARTS:
        assert nash[start]["on_front"], nash[start]
    assert not mean[(9.0, 9.0)]["on_front"] and mean[(9.0, 9.0)]["final_x"][1] > 1.0
    for start in [(0.0, 0.0), (-7.5, -0.5), (9.0, -1.0)]:
        assert mean[start]["on_front"], mean[start]
        np.testing.assert_allclose(mean[start]["final_x"][0], -6.3 / 1.1, atol=0.02)
    # Nash-MTL's end points are spread along the front, away from the mean's
    ends = np.asarray([nash[s]["final_x"][0] for s in toy.NASH_MTL_STARTS])
    assert np.all(ends > -5.0), ends


@pytest.mark.slow
def test_cagrad_reaches_the_minimum_of_the_mean_loss_from_every_start():
    """The papers' full 100,000 steps: CAGrad (c = 0.5 < 1) reaches the front from all three
    starts (stays on it from step 68,200 at the latest) at the minimiser of the average loss,
    ``x1 = 0`` (the two quadratics' ``x1`` terms cancel), as the CAGrad paper claims; the mean
    is still in the upper half-plane from (-8.5, 7.5) and (9, 9)."""
    _, cagrad_rows = _run("cagrad", "cagrad", 100_000)
    _, mean_rows = _run("mean", "cagrad", 100_000)
    for start in toy.CAGRAD_STARTS:
        assert cagrad_rows[start]["on_front"], cagrad_rows[start]
        assert cagrad_rows[start]["stationarity"] < 1e-2, cagrad_rows[start]
        np.testing.assert_allclose(cagrad_rows[start]["final_x"], [0.0, -8.3552], atol=0.02)
    for start in [(-8.5, 7.5), (9.0, 9.0)]:
        assert not mean_rows[start]["on_front"]
        assert mean_rows[start]["final_x"][1] > 1.0, mean_rows[start]


def test_famo_reaches_the_front_from_every_nash_mtl_start():
    """FAMO (gamma = 0, the log-losses' bounds -21 scale and -21, as FAMO's toy): on the front
    from all five starts after Nash-MTL's 35,000 steps (from step 16,900 at the latest)."""
    _, rows = _run("famo", "nash_mtl", 35_000)
    for start in toy.NASH_MTL_STARTS:
        assert rows[start]["on_front"], rows[start]


# ---------------------------------------------------------------------------------------------
# The command line


def test_the_command_writes_its_figures_and_tables(tmp_path, capsys):
    from experiments import toy as experiment

    out = str(tmp_path / "toy")
    argv = ["--out", out, "--setup", "nash_mtl", "--steps", "20", "--record-every", "10"]
    experiment.main([*argv, "--methods", "mean,famo"])
    names = sorted(os.listdir(out))
    assert names == [
        "toy_nash_mtl.json",
        "toy_nash_mtl.md",
        "toy_nash_mtl_losses.png",
        "toy_nash_mtl_params.png",
    ]
    with open(os.path.join(out, "toy_nash_mtl.json")) as f:
        record = json.load(f)
    assert record["setup"]["scale"] == 0.1
    assert [(r["method"], tuple(r["start"])) for r in record["rows"]] == [
        (m, s) for m in ("mean", "famo") for s in toy.NASH_MTL_STARTS
    ]
    assert all(r["steps"] == 20 for r in record["rows"])
    assert "| mean |" in capsys.readouterr().out
    for name in names:
        assert os.path.getsize(os.path.join(out, name)) > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "no_such_method"], "no_such_method"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_the_command_rejects_bad_arguments_with_one_message(tmp_path, capsys, extra, message):
    from experiments import toy as experiment

    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--out", str(tmp_path), "--setup", "cagrad", "--steps", "10", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
