"""The relatedness benchmark (MMoE's synthetic tasks, Ma et al. KDD 2018 sec. 4.1, in groups):
the paper's two-task construction and the K-task cosines against NumPy written from the
definitions, balanced quantile labels, determinism, independent train/test draws, the registry
API, and a one-epoch run of the benchmark's config."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.data import check_example, default_dataset_config, make_dataset
from experiments.data import relatedness as rel

SMALL = {"num_train": 600, "num_test": 900, "input_dim": 12}


def _generate(**overrides):
    kwargs = {k: v for k, v in rel.DEFAULTS.items() if not k.startswith("max_")}
    kwargs.update(SMALL)
    kwargs.update(overrides)
    return rel.generate(**kwargs)


def _cosines(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


@pytest.mark.parametrize("rho", [-1.0, -0.5, 0.0, 0.3, 0.9, 1.0])
def test_two_tasks_are_the_papers_w1_w2(rho):
    """Paper, step 2: w1 = c u1, w2 = c (rho u1 + sqrt(1 - rho^2) u2), u1 _|_ u2 unit vectors."""
    dim, c = 7, 2.5
    got = rel.task_vectors(rel.task_gram((0, 1), 1.0, rho), dim, c, np.random.default_rng(11))
    # the same orthonormal pair, drawn independently: QR of the same Gaussian draw
    gaussian = np.random.default_rng(11).standard_normal((dim, 2))
    q, r = np.linalg.qr(gaussian)
    u = q * np.sign(np.diag(r))
    u1, u2 = u[:, 0], u[:, 1]
    assert abs(u1 @ u2) < 1e-12 and np.allclose([u1 @ u1, u2 @ u2], 1.0)
    w1 = c * u1
    w2 = c * (rho * u1 + np.sqrt(1.0 - rho**2) * u2)
    np.testing.assert_allclose(got, np.stack([w1, w2]), atol=1e-12)
    np.testing.assert_allclose(w1 @ w2 / (c * c), rho, atol=1e-12)


def test_k_tasks_have_the_within_and_across_group_cosines():
    groups, rho_in, rho_out = (0, 0, 1, 2, 1), 0.8, -0.2
    expected = np.array(  # written out by hand from the groups
        [
            [1.0, 0.8, -0.2, -0.2, -0.2],
            [0.8, 1.0, -0.2, -0.2, -0.2],
            [-0.2, -0.2, 1.0, -0.2, 0.8],
            [-0.2, -0.2, -0.2, 1.0, -0.2],
            [-0.2, -0.2, 0.8, -0.2, 1.0],
        ]
    )
    np.testing.assert_allclose(rel.task_gram(groups, rho_in, rho_out), expected)
    vectors = rel.task_vectors(expected, 9, 1.7, np.random.default_rng(0))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.7, atol=1e-12)
    np.testing.assert_allclose(_cosines(vectors), expected, atol=1e-12)
    # rho_in = 1 is singular (equal vectors): the semi-definite factorisation still realises it
    singular = rel.task_gram((0, 0, 0, 1), 1.0, 0.0)
    vectors = rel.task_vectors(singular, 6, 1.0, np.random.default_rng(1))
    np.testing.assert_allclose(_cosines(vectors), singular, atol=1e-12)


def test_scores_are_the_papers_step_4():
    """y_k = w_k . x + sum_{i=1}^m sin(alpha_i w_k . x + beta_i) (+ noise), alpha_i = i,
    beta_i = (i - 1)^2, computed here with explicit loops."""
    draw = _generate(noise_std=0.0, num_sines=3, groups=(0, 1, 1), rho_in=0.5, rho_out=0.1)
    x, w = draw.train_x[:20], draw.vectors
    expected = np.zeros((20, 3))
    for n in range(20):
        for k in range(3):
            z = float(np.dot(w[k], x[n]))
            expected[n, k] = z + sum(np.sin(i * z + (i - 1) ** 2) for i in (1, 2, 3))
    np.testing.assert_allclose(draw.train_scores[:20], expected, atol=1e-10)
    noisy = _generate(noise_std=0.7, num_sines=3, groups=(0, 1, 1), rho_in=0.5, rho_out=0.1)
    residual = noisy.train_scores - draw.train_scores  # same x and w, only the noise differs
    assert abs(residual.std() - 0.7) < 0.05 and abs(residual.mean()) < 0.05


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_quantile_labels_are_balanced(num_classes):
    # train: exact up to ties; test: up to the sampling error of the training quantiles
    # and of the test set (n = 10,000 each: a binary share has std 0.007; allowed 0.04, the
    # seed-0 draw is off by 0.026 for three tasks that share one projection)
    draw = _generate(num_classes=num_classes, num_train=10_000, num_test=10_000)
    for scores, slack in ((draw.train_scores, 2), (draw.test_scores, 0.04 * 10_000)):
        labels = draw.labels(scores)
        assert labels.dtype == np.int32 and labels.min() >= 0
        for k in range(labels.shape[1]):
            counts = np.bincount(labels[:, k], minlength=num_classes)
            assert counts.size == num_classes
            assert np.abs(counts - len(labels) / num_classes).max() <= slack, counts
    # the test set is cut at the *training* quantiles, by the score's rank
    k, t = 1, draw.thresholds[1]
    np.testing.assert_array_equal(
        draw.labels(draw.test_scores)[:, k], (draw.test_scores[:, k][:, None] > t).sum(axis=1)
    )


def test_related_labels_correlate_more_than_independent_ones():
    """The paper's Figure 2: the label correlation grows with the cosine."""
    corr = [
        np.corrcoef(_generate(groups=(0, 1), rho_out=rho, noise_std=0.1).train_scores.T)[0, 1]
        for rho in (-0.9, 0.0, 0.5, 0.9)
    ]
    assert corr[0] < -0.5 and abs(corr[1]) < 0.15 and corr[1] < corr[2] < corr[3]


def test_same_split_seed_same_arrays_other_seed_other_arrays():
    a, b, c = _generate(), _generate(), _generate(split_seed=1)
    for field in ("vectors", "train_x", "test_x", "train_scores", "test_scores", "thresholds"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert not np.array_equal(getattr(a, field), getattr(c, field))


def test_train_and_test_inputs_are_independent_draws():
    draw = _generate(num_train=900, num_test=900)
    train, test = draw.train_x, draw.test_x
    assert not np.isclose(train[:, None, :], test[None, :, :]).all(axis=-1).any()
    # N(0, I) inputs; the cross-correlation of the two sets is at the level of chance
    np.testing.assert_allclose(train.mean(), 0.0, atol=0.05)
    np.testing.assert_allclose(train.std(), 1.0, atol=0.05)
    cross = np.corrcoef(train.ravel(), test.ravel())[0, 1]
    assert abs(cross) < 4 / np.sqrt(train.size)


def test_builds_through_the_registry_with_the_runners_shapes():
    config = default_dataset_config("relatedness")
    config.update(groups=(0, 0, 1), num_train=200, num_test=50, input_dim=10, num_classes=3)
    data = make_dataset(config)
    assert data.task_names == ("t0", "t1", "t2")
    assert [(t.kind, t.num_classes) for t in data.tasks] == [("classification", 3)] * 3
    assert data.input_shape == (1, 10, 1) and data.val is None
    assert (len(data.train), len(data.test)) == (200, 50)
    check_example(data.train[0], data.tasks, "relatedness")
    check_example(data.test[0], data.tasks, "relatedness")
    np.testing.assert_allclose(
        np.asarray(data.info["task_cosines"]), [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    )
    json.dumps(data.info)
    capped = make_dataset({"name": "relatedness", "max_train_examples": 30, "max_test_examples": 7})
    assert (len(capped.train), len(capped.test)) == (30, 7)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rho_in": 1.5}, "rho_in is a cosine"),
        ({"groups": (0, 1, 2), "rho_out": -0.9}, "no 3 vectors have these cosines"),
        ({"groups": (0, 1, 2, 3), "input_dim": 3}, "input_dim >= 4"),
        ({"num_classes": 1}, "num_classes >= 2"),
    ],
)
def test_bad_settings_say_what_to_change(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_dataset({"name": "relatedness", "num_train": 50, "num_test": 10, **overrides})


@pytest.mark.slow
def test_the_benchmark_config_trains_one_epoch(tmp_path):
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        "experiments/configs/relatedness.py",
        "--config.train.epochs=1",
        "--config.seeds=(0,)",
        "--workdir",
        str(tmp_path / "rel"),
    ]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "rel" / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train" and r["run"] == "mean"]
    assert train and all(np.isfinite(list(r["loss"].values())).all() for r in train)
    evals = [r for r in records if r["kind"] == "eval" and r["run"] == "mean"]
    accuracy = np.mean([m["accuracy"] for m in evals[-1]["metrics"].values()])
    assert accuracy > 55.0  # chance is 50% (balanced binary labels, 5,000 test examples)
    assert (tmp_path / "rel" / "report.md").exists()
