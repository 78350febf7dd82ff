"""The issue-5 studies end to end at tiny sizes: sparse training, and the leaf combinations on
mocked plant_leaves."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import config as config_lib
from experiments import run as run_lib
from experiments import runner as runner_lib
from experiments import studies
from experiments.logs import JsonlLog


def _summaries(workdir):
    return {
        (r["run"], r["seed"]): r
        for r in JsonlLog(os.path.join(workdir, "metrics.jsonl")).records()
        if r["kind"] == "summary"
    }


@pytest.mark.slow
def test_sparse_training_study(tmp_path):
    config = studies.study_config("sparse_training", "multi_digits", "mlp")
    config.seeds = (0,)
    config.sparse.methods = ("mean", "pcgrad")
    config.sparse.controls = ("random", "reverse")
    config.sparse.fraction = 0.5
    config.dataset.max_train_examples = 256
    config.dataset.max_test_examples = 64
    config.train.epochs = 2
    config.train.batch_size = 64
    config.report.progress = False
    config.report.plots = False
    workdir = str(tmp_path / "st")
    report = runner_lib.run_study(config, workdir)
    summaries = _summaries(workdir)
    assert set(summaries) == {
        (label, 0)
        for label in ("mean", "mean+st", "pcgrad", "pcgrad+st", "mean+st:random", "mean+st:reverse")
    }
    fractions = []
    for label in ("mean+st", "pcgrad+st", "mean+st:random", "mean+st:reverse"):
        info = summaries[(label, 0)]["info"]
        assert info["frozen_unchanged"] is True
        fractions.append(info["trainable_encoder_params"])
    assert len(set(fractions)) == 1  # the controls train exactly as many weights as PSN
    assert 0.45 <= summaries[("mean+st", 0)]["info"]["trainable_encoder_fraction"] <= 0.7
    assert "## Sparse training" in report and "| pcgrad | st |" in report and "| yes |" in report


def test_sparse_training_rejects_unknown_controls():
    config = studies.study_config("sparse_training", "multi_digits", "mlp")
    config.sparse.controls = ("random", "magnitude")
    with pytest.raises(config_lib.ConfigError, match=r"Unknown sparse.controls \['magnitude'\]"):
        studies.validate(config)


@pytest.mark.slow
def test_leaf_combinations_on_mocked_plant_leaves(tmp_path):
    config = config_lib.load_config(
        os.path.join(run_lib.os.path.dirname(run_lib.__file__), "configs", "leaf_combinations.py")
    )
    config.seeds = (0,)
    config.dataset.image_size = 8
    config.model.channels = (4, 4)
    config.model.feature_dim = 8
    config.combinations.modulation_blocks = (1,)
    config.combinations.stage1_epochs = 1
    config.combinations.finetune_epochs = 1
    config.combinations.stage2_epochs = 1
    config.train.batch_size = 8
    config.report.progress = False
    workdir = str(tmp_path / "leaf")
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        report = runner_lib.run_study(config, workdir)
    summaries = _summaries(workdir)
    combos = [
        "baseline",
        "LaSS",
        "Modulation",
        "Modulation+LaSS",
        "PCGrad",
        "PCGrad+LaSS",
        "PCGrad+Modulation",
        "PCGrad+Modulation+LaSS",
    ]
    for label in combos:
        s = summaries[(label, 0)]
        assert set(s["test"]) == {"species", "health"}
        assert 0.0 <= s["test"]["species"]["macro_f1"] <= 1.0
        if "LaSS" in label:
            sub = s["info"]["subnetwork"]
            assert len(sub["kept"]) == 2 and all(
                0.6 <= f <= 0.8 for f in sub["fraction"]
            )  # 30% pruned
            assert (label + "/finetune:species", 0) in summaries
    # the modulation scales are per-task copies: [K=2, C] in the encoder of the modulated runs
    records = list(JsonlLog(os.path.join(workdir, "metrics.jsonl")).records())
    starts = {r["run"]: r for r in records if r["kind"] == "start"}
    assert starts["Modulation"]["encoder_params"] == starts["baseline"]["encoder_params"] + 2 * 4
    assert "## Leaf combinations" in report and "| PCGrad+LaSS |" in report
    assert os.path.getsize(os.path.join(workdir, "plots", "leaf_combinations.png")) > 5_000
    assert np.isfinite(summaries[("PCGrad+Modulation+LaSS", 0)]["test"]["health"]["accuracy"])
