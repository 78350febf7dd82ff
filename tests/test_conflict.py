"""Conflict metrics against hand-computed values and a NumPy recount."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl
from tests import _matrices as M


def _cos(J):
    n = np.linalg.norm(J, axis=1)
    return (J @ J.T) / np.outer(n, n)


def test_pairwise_cosines_and_incidence_hand_computed():
    J = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]])
    G = jnp.asarray(J @ J.T, jnp.float32)
    cos = np.asarray(mtl.conflict.pairwise_cosines(G))
    np.testing.assert_allclose(cos, [-1 / np.sqrt(2), 0.0, 1 / np.sqrt(2)], rtol=1e-6)
    assert float(mtl.conflict.conflict_incidence(G)) == pytest.approx(100 / 3)
    assert float(mtl.conflict.conflict_incidence(G, threshold=0.5)) == pytest.approx(200 / 3)
    assert float(mtl.conflict.mean_pairwise_cosine(G)) == pytest.approx(0.0, abs=1e-7)


def test_single_task_has_no_pairs():
    G = jnp.ones((1, 1))
    assert mtl.conflict.pairwise_cosines(G).shape == (0,)
    assert float(mtl.conflict.conflict_incidence(G)) == 0.0


def test_recon_histogram_bins_edges_included_once():
    cos = jnp.array([1.0, 0.5, 0.0, -0.005, -0.01, -0.015, -0.02, -0.025, -0.03, -0.5, -1.0])
    counts = np.asarray(mtl.conflict.cosine_histogram(cos))
    # [0, 1] | [-0.01, 0) | [-0.02, -0.01) | [-0.03, -0.02) | [-1, -0.03)
    np.testing.assert_array_equal(counts, [3, 2, 2, 2, 2])
    assert counts.sum() == cos.shape[0]
    with pytest.raises(ValueError, match="descending"):
        mtl.conflict.cosine_histogram(cos, edges=(0.0, 1.0))


def test_magnitude_similarity():
    G = jnp.diag(jnp.array([1.0, 4.0, 0.0]))
    S = np.asarray(mtl.conflict.magnitude_similarity(G))
    assert S[0, 1] == pytest.approx(2 * 1 * 2 / (1 + 4))
    assert S[0, 0] == pytest.approx(1.0) and np.isfinite(S).all()


def test_tracker_counts_match_numpy_recount():
    k, steps, severity = 4, 6, -0.1
    tracker = mtl.ConflictTracker(num_tasks=k, granularity=mtl.gramian.by_module, severity=severity)
    tree0 = M.to_tree(M.sample("normal", k))
    state = tracker.init(M.params_like(tree0))
    assert set(state.severe) == {"global", "enc", "head"}
    update = jax.jit(tracker.update)
    expected = {"global": 0, "enc": 0, "head": 0}
    expected_conflicts = 0
    rows, cols = np.triu_indices(k, 1)
    for s in range(steps):
        J = M.sample("conflicting" if s % 2 else "normal", k, seed=s)
        state = update(state, M.to_tree(J))
        parts = {"global": J, "enc": J[:, :14], "head": J[:, 14:]}
        for g, part in parts.items():
            expected[g] += int(np.sum(_cos(part)[rows, cols] < severity))
        expected_conflicts += int(np.sum(_cos(J)[rows, cols] < 0))
        np.testing.assert_allclose(
            state.last_incidence["global"], 100 * np.mean(_cos(J)[rows, cols] < 0), rtol=1e-6
        )
    assert int(state.steps) == steps
    assert {g: int(v) for g, v in state.severe.items()} == expected
    mean_inc = tracker.mean_incidence(state)["global"]
    assert float(mean_inc) == pytest.approx(100 * expected_conflicts / (steps * 6))
    assert int(state.histogram["global"].sum()) == steps * 6
    ranking = tracker.ranking(state)
    assert [g for g, _ in ranking] == sorted(["enc", "head"], key=lambda g: -expected[g])
    assert tracker.s_scores(state) == {"enc": expected["enc"], "head": expected["head"]}


def test_tracker_validates_inputs():
    with pytest.raises(ValueError, match="severity"):
        mtl.ConflictTracker(num_tasks=2, severity=0.5)
    tracker = mtl.ConflictTracker(num_tasks=3)
    tree = M.to_tree(M.sample("normal", 2))
    state = tracker.init(M.params_like(tree))
    with pytest.raises(ValueError, match="K=3"):
        tracker.update(state, tree)


def _numpy_bins(c: float) -> int:
    """Recon's bin of one cosine by hand: 0 = [0, 1], 1 = [-0.01, 0), ..., 4 = [-1, -0.03)."""
    for b, low in enumerate((0.0, -0.01, -0.02, -0.03)):
        if c >= low:
            return b
    return 4


def test_per_pair_sums_and_histograms_match_numpy_recount():
    k, steps = 3, 7
    tracker = mtl.ConflictTracker(num_tasks=k, granularity=mtl.gramian.by_module, pair_groups="all")
    tree0 = M.to_tree(M.sample("normal", k))
    state0 = tracker.init(M.params_like(tree0))
    default = mtl.ConflictTracker(num_tasks=k, granularity=mtl.gramian.by_module).init(
        M.params_like(tree0)
    )
    assert set(default.pair_cos_sum) == set(default.pair_histogram) == {"global"}
    with pytest.raises(ValueError, match="pair_groups must be 'global'"):
        mtl.ConflictTracker(num_tasks=k, pair_groups="enc")
    assert state0.pair_cos_sum["global"].shape == (3,)
    assert state0.pair_histogram["enc"].shape == (3, 5)
    assert state0.pair_histogram["enc"].dtype == jnp.int32
    update = jax.jit(tracker.update)
    state = state0
    rows, cols = np.triu_indices(k, 1)
    sums = {g: np.zeros(3) for g in ("global", "enc", "head")}
    hists = {g: np.zeros((3, 5), int) for g in sums}
    for s in range(steps):
        J = M.sample("conflicting" if s % 2 else "normal", k, seed=10 + s)
        state = update(state, M.to_tree(J))
        for g, part in {"global": J, "enc": J[:, :14], "head": J[:, 14:]}.items():
            cos = _cos(part)[rows, cols]
            sums[g] += cos
            for p, c in enumerate(cos):
                hists[g][p, _numpy_bins(c)] += 1
    # structure, shapes and dtypes are those of init
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    jax.tree.map(
        lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(), state, state0
    )
    for g in sums:
        np.testing.assert_allclose(state.pair_cos_sum[g], sums[g], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(state.pair_histogram[g], hists[g])
        np.testing.assert_array_equal(state.pair_histogram[g].sum(0), state.histogram[g])
        np.testing.assert_allclose(
            tracker.mean_pair_cosines(state)[g], sums[g] / steps, rtol=1e-5, atol=1e-6
        )
    assert (np.asarray(state.pair_histogram["global"]).sum(1) == steps).all()


def test_per_pair_fields_with_one_task_and_before_any_step():
    tracker = mtl.ConflictTracker(num_tasks=1)
    state = tracker.init({"w": jnp.zeros(3)})
    # no pairs: no per-pair arrays at all (a zero-size array cannot be checkpointed)
    assert state.pair_cos_sum == {} and state.pair_histogram == {}
    assert all(np.size(x) > 0 for x in jax.tree.leaves(state))
    updated = jax.jit(tracker.update)(state, {"w": jnp.ones((1, 3))})
    assert jax.tree.structure(updated) == jax.tree.structure(state)
    assert tracker.mean_pair_cosines(updated) == {}
    two = mtl.ConflictTracker(num_tasks=2)
    fresh = two.init({"w": jnp.zeros(3)})
    np.testing.assert_array_equal(two.mean_pair_cosines(fresh)["global"], [0.0])


def test_pair_bin_one_hot_edges():
    cos = jnp.array([1.0, 0.0, -0.01, -0.02, -0.03, -1.0, -0.005])
    onehot = np.asarray(mtl.conflict.pair_bin_one_hot(cos))
    np.testing.assert_array_equal(onehot.argmax(1), [0, 0, 1, 2, 3, 4, 1])
    assert (onehot.sum(1) == 1).all()
