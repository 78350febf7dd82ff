"""The recon study end to end at a tiny size: search -> select -> branch -> retrain, artifacts by
name, per-task copies of the chosen layers' parameters and per-task statistics in every BatchNorm
of the retrained model, and recon_summary.json."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from experiments import config as config_lib
from experiments import run as run_lib
from experiments import runner as runner_lib
from experiments.config import ConfigError
from experiments.logs import JsonlLog
from experiments.phases import Artifacts
from experiments.studies import study_config
from experiments.train import load_final_params
from mtl_jax import sharing as sharing_lib


@pytest.mark.slow
def test_recon_study_branches_the_chosen_layers_and_reports(tmp_path):
    config = config_lib.load_config(
        os.path.join(os.path.dirname(run_lib.__file__), "configs", "recon.py")
    )
    config.seeds = (0,)
    config.recon.methods = ("mean",)
    config.recon.controls = ("rsl",)
    config.recon.k = 3
    config.single_task = False
    config.dataset.max_train_examples = 128
    config.dataset.max_test_examples = 64
    config.train.epochs = 1
    config.train.batch_size = 64
    config.report.progress = False
    config.report.plots = False
    workdir = str(tmp_path / "recon")
    report = runner_lib.run_study(config, workdir)
    artifacts = Artifacts(workdir)
    assert artifacts.is_done("select__seed0")  # a phase that computes: its done.json
    records = JsonlLog(os.path.join(workdir, "metrics.jsonl")).records()
    finished = {(r["run"], r["seed"]) for r in records if r["kind"] == "summary"}
    assert {("search", 0), ("mean", 0), ("mean+recon", 0)} <= finished  # runs: their summary
    layers = artifacts.load_json("select__seed0", "layers")
    scores = layers["scores"]
    # the top 3 by S-conflict score, ties in the parameters' order
    order = sorted(scores, key=lambda n: (-scores[n], list(scores).index(n)))
    assert layers["recon"] == order[:3] and len(layers["rsl"]) == 3

    params, state = load_final_params(artifacts, "mean+recon__seed0")
    base_params, base_state = load_final_params(artifacts, "mean__seed0")
    num_tasks = 3  # digit, rotation, thickness
    chosen = set(layers["recon"])
    for collection, tree, base in (
        ("params", params["encoder"], base_params["encoder"]),
        (
            "batch_stats",
            state["encoder"].get("batch_stats", {}),
            base_state["encoder"].get("batch_stats", {}),
        ),
    ):
        for (path, leaf), (_, base_leaf) in zip(
            jax.tree_util.tree_flatten_with_path(tree)[0],
            jax.tree_util.tree_flatten_with_path(base)[0],
            strict=True,
        ):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            layer = sharing_lib.layer_key(f"{collection}/{name}")
            # a per-task copy of the chosen layers' parameters, and per-task statistics in every
            # BatchNorm (each stream is evaluated with its own, never with their average)
            if layer in chosen or collection == "batch_stats":
                assert np.shape(leaf) == (num_tasks, *np.shape(base_leaf)), (collection, name)
            else:
                assert np.shape(leaf) == np.shape(base_leaf), (collection, name)

    with open(os.path.join(workdir, "recon_summary.json")) as f:
        summary = json.load(f)
    mean = summary["methods"]["mean"]
    assert set(mean) == {"base", "recon", "rsl"}
    assert mean["recon"]["total_params"]["mean"] > mean["base"]["total_params"]["mean"]
    for variant in mean.values():
        assert 0.0 <= variant["below_severe"]["mean"] <= 100.0
    assert np.isfinite(mean["recon"]["reduction_severe"]["mean"])
    assert "## Recon" in report and "| mean | recon |" in report


def test_a_budget_below_the_top_layer_is_an_error_not_an_unbranched_recon_run(tmp_path):
    """When no layer fits within recon.budget nothing is chosen, and the study must say so
    instead of training a "+recon" model with no branched layer."""
    config = study_config("recon", "relatedness", "mlp")
    config.conflict.granularity = "module"  # as in configs/recon.py
    config.model.hidden_sizes = (16, 2)  # fc0: 32 x 16 + 16 = 528 parameters, fc1: 34
    config.model.head_hidden = 0
    config.seeds = (0,)
    config.recon.methods = ("mean",)
    config.recon.controls = ()
    config.recon.k = 1
    config.recon.budget = 10  # smaller than either layer
    config.single_task = False
    config.dataset.max_train_examples = 200
    config.dataset.max_test_examples = 100
    config.train.epochs = 1
    config.train.batch_size = 100
    config.report.progress = False
    config.report.plots = False
    workdir = str(tmp_path / "recon")
    with pytest.raises(ConfigError, match=r"selected no layer.*recon\.budget=10"):
        runner_lib.run_study(config, workdir)
    records = JsonlLog(os.path.join(workdir, "metrics.jsonl")).records()
    assert not [r for r in records if r["kind"] == "summary" and r["run"] == "mean+recon"]
    assert not Artifacts(workdir).has("mean+recon__seed0", "final")
