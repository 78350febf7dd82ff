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
    cos = np.asarray(mtl.pairwise_cosines(G))
    np.testing.assert_allclose(cos, [-1 / np.sqrt(2), 0.0, 1 / np.sqrt(2)], rtol=1e-6)
    assert float(mtl.conflict_incidence(G)) == pytest.approx(100 / 3)
    assert float(mtl.conflict_incidence(G, threshold=0.5)) == pytest.approx(200 / 3)
    assert float(mtl.mean_pairwise_cosine(G)) == pytest.approx(0.0, abs=1e-7)


def test_single_task_has_no_pairs():
    G = jnp.ones((1, 1))
    assert mtl.pairwise_cosines(G).shape == (0,)
    assert float(mtl.conflict_incidence(G)) == 0.0


def test_recon_histogram_bins_edges_included_once():
    cos = jnp.array([1.0, 0.5, 0.0, -0.005, -0.01, -0.015, -0.02, -0.025, -0.03, -0.5, -1.0])
    counts = np.asarray(mtl.cosine_histogram(cos))
    # [0, 1] | [-0.01, 0) | [-0.02, -0.01) | [-0.03, -0.02) | [-1, -0.03)
    np.testing.assert_array_equal(counts, [3, 2, 2, 2, 2])
    assert counts.sum() == cos.shape[0]
    with pytest.raises(ValueError, match="descending"):
        mtl.cosine_histogram(cos, edges=(0.0, 1.0))


def test_magnitude_similarity():
    G = jnp.diag(jnp.array([1.0, 4.0, 0.0]))
    S = np.asarray(mtl.magnitude_similarity(G))
    assert S[0, 1] == pytest.approx(2 * 1 * 2 / (1 + 4))
    assert S[0, 0] == pytest.approx(1.0) and np.isfinite(S).all()


def test_tracker_counts_match_numpy_recount():
    k, steps, severity = 4, 6, -0.1
    tracker = mtl.ConflictTracker(num_tasks=k, granularity=mtl.by_module, severity=severity)
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
