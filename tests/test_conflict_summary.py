"""The conflict summary from log records: per-pair means and bin shares recounted by hand, Δm
against the single-task runs, the ranking's rank correlation, plots and the Markdown section."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments.conflict_summary import (
    bin_labels,
    conflict_summary,
    conflict_summary_section,
    plot_module_ranking,
    plot_pair_heatmap,
    spearman,
)
from experiments.tasks import TaskSpec

TASKS = (
    TaskSpec("a", "classification", 10),
    TaskSpec("b", "classification", 4),
    TaskSpec("c", "classification", 2),
)
MODULES = ["params/stem/conv", "params/stem/bn", "params/block1/conv1", "params/neck/fc"]


def _joint_records(label: str, seed: int, cos_per_step: np.ndarray, scores, acc) -> list[dict]:
    """Records of one joint run: two conflict records (the last one counts), a summary.

    ``cos_per_step``: ``[steps, 3]`` cosines of the pairs a-b, a-c, b-c."""
    steps = len(cos_per_step)
    bins = np.zeros((3, 5), int)
    for row in cos_per_step:
        for p, c in enumerate(row):
            b = 0 if c >= 0 else 1 if c >= -0.01 else 2 if c >= -0.02 else 3 if c >= -0.03 else 4
            bins[p, b] += 1
    half = {
        "kind": "conflict",
        "run": label,
        "seed": seed,
        "step": steps // 2,
        "steps": steps // 2,
        "pair_cos_sum": {"global": [99.0, 99.0, 99.0]},
        "pair_histogram": {"global": np.zeros((3, 5), int).tolist()},
    }
    last = {
        "kind": "conflict",
        "run": label,
        "seed": seed,
        "step": steps,
        "steps": steps,
        "pair_cos_sum": {"global": cos_per_step.sum(0).tolist()},
        "pair_histogram": {"global": bins.tolist()},
    }
    summary = {
        "kind": "summary",
        "run": label,
        "seed": seed,
        "step": steps,
        "tasks": ["a", "b", "c"],
        "test": {t: {"accuracy": v, "macro_f1": 0.5} for t, v in zip("abc", acc, strict=True)},
        "s_scores": dict(zip(MODULES, scores, strict=True)),
    }
    return [last, half, summary]  # out of order on purpose: the latest step wins


def _single_records(task: str, seed: int, acc: float) -> list[dict]:
    return [
        {
            "kind": "conflict",
            "run": f"single:{task}",
            "seed": seed,
            "step": 10,
            "steps": 10,
            "pair_cos_sum": {"global": []},
            "pair_histogram": {"global": []},
        },
        {
            "kind": "summary",
            "run": f"single:{task}",
            "seed": seed,
            "step": 10,
            "tasks": [task],
            "test": {task: {"accuracy": acc, "macro_f1": 0.5}},
            "s_scores": {"global": 0},
        },
    ]


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(0)
    cos = {s: rng.uniform(-0.05, 0.05, (8, 3)) + np.array([-0.03, 0.0, 0.01]) for s in (0, 1)}
    recs = [{"kind": "study", "study": "compare"}]
    recs += _joint_records("mean", 0, cos[0], [5, 9, 1, 3], (80.0, 60.0, 90.0))
    recs += _joint_records("mean", 1, cos[1], [6, 8, 2, 2], (82.0, 62.0, 88.0))
    for s in (0, 1):
        recs += _single_records("a", s, 90.0 + s)
        recs += _single_records("b", s, 50.0)
        recs += _single_records("c", s, 90.0)
    return recs, cos


def test_per_pair_means_and_bin_shares_recounted(records):
    recs, cos = records
    summary = conflict_summary(recs, TASKS)
    assert summary["pairs"] == ["a-b", "a-c", "b-c"]
    assert (
        summary["bins"]
        == bin_labels()
        == ["[0, 1]", "[-0.01, 0)", "[-0.02, -0.01)", "[-0.03, -0.02)", "[-1, -0.03)"]
    )
    for s in (0, 1):
        run = summary["runs"]["mean"][str(s)]
        for p, pair in enumerate(summary["pairs"]):
            assert run["pairs"][pair]["mean_cos"] == pytest.approx(cos[s][:, p].mean())
            shares = run["pairs"][pair]["bins"]
            assert sum(shares) == pytest.approx(1.0)
            assert shares[0] == pytest.approx(np.mean(cos[s][:, p] >= 0))
            assert shares[4] == pytest.approx(np.mean(cos[s][:, p] < -0.03))
    both = summary["methods"]["mean"]["pairs"]["a-b"]["mean_cos"]
    values = [cos[0][:, 0].mean(), cos[1][:, 0].mean()]
    assert both["mean"] == pytest.approx(np.mean(values))
    assert both["std"] == pytest.approx(np.std(values, ddof=1))
    assert both["min"] == pytest.approx(min(values))
    json.dumps(summary)  # written as conflict_summary.json


def test_delta_m_against_the_single_task_mean(records):
    summary = conflict_summary(records[0], TASKS)
    ref = summary["reference"]
    assert ref == {"a": {"accuracy": 90.5}, "b": {"accuracy": 50.0}, "c": {"accuracy": 90.0}}
    expected0 = np.mean([100 * (80 - 90.5) / 90.5, 100 * (60 - 50) / 50, 100 * (90 - 90) / 90])
    assert summary["runs"]["mean"]["0"]["delta_m"] == pytest.approx(expected0)
    assert summary["runs"]["single:a"]["0"]["delta_m"] is None
    assert "pairs" not in summary["methods"]["single:a"]
    assert summary["methods"]["mean"]["test"]["a"]["accuracy"] == pytest.approx(81.0)


def test_module_ranking_and_its_rank_correlation(records):
    mod = conflict_summary(records[0], TASKS)["methods"]["mean"]["modules"]
    # mean scores: stem/conv 5.5, stem/bn 8.5, block1/conv1 1.5, neck/fc 2.5
    assert mod["ranking"] == [
        "params/stem/bn",
        "params/stem/conv",
        "params/neck/fc",
        "params/block1/conv1",
    ]
    # seed 0 ranks [3, 4, 1, 2], seed 1 ranks [3, 4, 1.5, 1.5] (tie): Pearson of the ranks
    r0, r1 = np.array([3, 4, 1, 2.0]), np.array([3, 4, 1.5, 1.5])
    expected = np.sum((r0 - r0.mean()) * (r1 - r1.mean())) / np.sqrt(
        np.sum((r0 - r0.mean()) ** 2) * np.sum((r1 - r1.mean()) ** 2)
    )
    assert mod["spearman_mean"] == pytest.approx(expected)
    assert mod["top5_overlap_mean"] == pytest.approx(1.0)  # 4 modules: the same top set


def test_spearman_by_hand_and_degenerate():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="differ in length"):
        spearman([1, 2], [1, 2, 3])


def test_logs_without_per_pair_fields_give_none():
    recs = [
        {"kind": "conflict", "run": "mean", "seed": 0, "step": 4, "steps": 4},
        {
            "kind": "summary",
            "run": "mean",
            "seed": 0,
            "step": 4,
            "tasks": ["a", "b", "c"],
            "test": {t: {"accuracy": 50.0} for t in "abc"},
            "s_scores": {"params/x": 1},
        },
    ]
    summary = conflict_summary(recs, TASKS)
    assert summary["runs"]["mean"]["0"]["pairs"] is None
    assert "pairs" not in summary["methods"]["mean"]
    assert summary["reference"] == {}
    recs[1]["s_scores"] = {"global": 3}  # granularity "global": no per-module ranking
    assert "modules" not in conflict_summary(recs, TASKS)["methods"]["mean"]


def test_plots_and_section(records, tmp_path):
    summary = conflict_summary(records[0], TASKS)
    heat, bars = tmp_path / "pairs.png", tmp_path / "modules.png"
    plot_pair_heatmap(summary, str(heat))
    plot_module_ranking(summary, str(bars))
    assert heat.stat().st_size > 1000 and bars.stat().st_size > 1000
    with pytest.raises(ValueError, match="no module scores for 'pcgrad'"):
        plot_module_ranking(summary, str(bars), method="pcgrad")
    text = conflict_summary_section(summary)
    assert "| method | a-b | a-c | b-c | Δm% |" in text
    assert "stem/bn (8)" in text and "Spearman" in text
    assert f"{summary['methods']['mean']['pairs']['a-b']['mean_cos']['mean']:+.4f}" in text
