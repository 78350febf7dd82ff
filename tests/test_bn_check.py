"""``experiments.bn_check`` on a tiny work dir: every finished run evaluated with (A) stored,
(B) batch and (C) recomputed BatchNorm statistics; a run that recomputed its statistics before
saving them (``eval.recompute_bn_batches``) has A equal to C on the same batches."""

from __future__ import annotations

import json
import os

import pytest

from experiments import bn_check
from experiments import train as train_lib
from experiments import workdir as workdir_lib
from experiments.logs import JsonlLog
from tests.test_train import _setup, tiny_bn_config

RECOMPUTE = 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A plain and a branched (Recon) run of the tiny BN model, both recomputing statistics."""
    config = tiny_bn_config(RECOMPUTE)
    workdir = str(tmp_path_factory.mktemp("bn") / "work")
    workdir_lib.prepare_workdir(config, workdir)
    data, model = _setup(config)
    log = JsonlLog(os.path.join(workdir, "metrics.jsonl"))
    for spec in (
        train_lib.RunSpec(label="mean", method="mean", seed=0),
        train_lib.RunSpec(
            label="mean+recon", method="mean", seed=0, branch_fn=lambda: ["block2/conv1"]
        ),
    ):
        train_lib.train_run(config, data, model, spec, workdir, log, progress=False)
    return workdir


def test_bn_check_writes_and_prints_a_b_c_for_every_run(workdir):
    result = bn_check.bn_check(workdir, batches=RECOMPUTE, verbose=False)
    with open(os.path.join(workdir, "bn_check.json")) as f:
        assert json.load(f)["runs"].keys() == result["runs"].keys()
    assert set(result["runs"]) == {"mean__seed0", "mean+recon__seed0"} and not result["skipped"]
    assert result["runs"]["mean+recon__seed0"]["per_task"]
    assert not result["runs"]["mean__seed0"]["per_task"]
    for run in result["runs"].values():
        for mode in bn_check.MODES:
            assert set(run[mode]) == {"digit", "rotation", "thickness"}
            assert all(0.0 <= v <= 100.0 for v in run[mode].values())
    text = bn_check.report(result, ["digit", "rotation", "thickness"])
    assert "| mean+recon__seed0 |" in text and "digit A / B / C" in text


def test_stored_statistics_equal_recomputed_ones_after_the_runner_recomputes(workdir):
    """The runner recomputed on the first RECOMPUTE training batches; C recomputes on the same
    ones, so the stored statistics (A) give the same accuracy, per-task ones included."""
    result = bn_check.bn_check(workdir, batches=RECOMPUTE, verbose=False)
    records = list(JsonlLog(os.path.join(workdir, "metrics.jsonl")).records())
    for run_id, run in result["runs"].items():
        for task, value in run["A"].items():
            assert abs(value - run["C"][task]) < 1.0, (run_id, task, run["A"], run["C"])
        summary = next(
            r for r in records if r["kind"] == "summary" and f"{r['run']}__seed0" == run_id
        )
        assert summary["test"]["digit"]["accuracy"] == pytest.approx(run["A"]["digit"])


def test_bn_check_needs_a_work_dir_with_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        bn_check.bn_check(str(tmp_path), batches=1)
