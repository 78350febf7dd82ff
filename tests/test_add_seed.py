"""Seeds may grow in a finished work dir: only the added seeds train and the report covers all;
any other change (a removed seed included) is refused with a message that names it."""

from __future__ import annotations

import json
import os

import pytest

from experiments import config as config_lib
from experiments import runner as runner_lib
from experiments import workdir as workdir_lib
from experiments.config import ConfigError
from experiments.studies import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, arg: str = ""):
    path = os.path.join(ROOT, "experiments", "configs", f"{name}.py")
    return config_lib.load_config(f"{path}:{arg}" if arg else path)


def _tiny(seeds: tuple[int, ...]):
    """The default config, 1 epoch on 256 examples, one method, no plots."""
    config = _load("default")
    config.seeds = seeds
    config.methods = ("mean",)
    config.single_task = False
    config.dataset.max_train_examples = 256
    config.dataset.max_test_examples = 64
    config.train.epochs = 1
    config.train.batch_size = 64
    config.report.progress = False
    config.report.plots = False
    return config


def _records(workdir, kind: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def _as_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def test_the_same_config_adds_nothing_and_added_seeds_are_returned(tmp_path):
    stored = _as_json(_tiny((0,)))
    assert workdir_lib.check_config_change(stored, _as_json(_tiny((0,))), str(tmp_path)) == []
    assert workdir_lib.check_config_change(stored, _as_json(_tiny((0, 2, 1))), str(tmp_path)) == [
        2,
        1,
    ]
    neutral = _tiny((0,))
    neutral.report.plots, neutral.parallel.devices = True, 1  # plots and devices: same results
    assert workdir_lib.check_config_change(stored, _as_json(neutral), str(tmp_path)) == []


def test_a_work_dir_written_before_a_later_key_still_resumes(tmp_path):
    """``train.objectives`` came later; its default reproduces the runs made without it."""
    stored = _as_json(_tiny((0,)))
    del stored["train"]["objectives"]
    assert workdir_lib.check_config_change(stored, _as_json(_tiny((0,))), str(tmp_path)) == []
    instances = _tiny((0,))
    instances.train.objectives = "instances"
    with pytest.raises(workdir_lib.ConfigMismatchError, match=r"train\.objectives"):
        workdir_lib.check_config_change(stored, _as_json(instances), str(tmp_path))


def test_a_removed_seed_or_another_key_is_refused_by_name(tmp_path):
    stored = _as_json(_tiny((0, 1)))
    with pytest.raises(workdir_lib.ConfigMismatchError, match=r"drops seeds \[1\].*keep \[0, 1\]"):
        workdir_lib.check_config_change(stored, _as_json(_tiny((0, 2))), str(tmp_path))
    other = _tiny((0, 1, 2))
    other.train.lr = 0.5
    with pytest.raises(workdir_lib.ConfigMismatchError, match=r"changed: train\.lr\).*--fresh"):
        workdir_lib.check_config_change(stored, _as_json(other), str(tmp_path))


def test_adding_a_seed_to_a_finished_work_dir_trains_only_that_seed(tmp_path):
    workdir = str(tmp_path / "w")
    runner_lib.run_study(_tiny((0,)), workdir)
    first_starts = _records(workdir, "start")
    assert [(r["run"], r["seed"]) for r in first_starts] == [("mean", 0)]
    first_train, first_summaries = _records(workdir, "train"), _records(workdir, "summary")

    report = runner_lib.run_study(_tiny((0, 1)), workdir)

    starts = _records(workdir, "start")
    assert [(r["run"], r["seed"]) for r in starts] == [("mean", 0), ("mean", 1)]
    train = _records(workdir, "train")
    assert [r for r in train if r["seed"] == 0] == first_train  # seed 0 did not train again
    assert any(r["seed"] == 1 for r in train)
    summaries = _records(workdir, "summary")
    assert summaries[0] == first_summaries[0] and [r["seed"] for r in summaries] == [0, 1]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["seeds"] == [0, 1]
    assert "seeds [0, 1]" in report
    assert "| mean | 2 |" in report  # the table's "seeds" column: both seeds

    # Rerunning the grown config trains nothing; dropping a seed is refused.
    runner_lib.run_study(_tiny((0, 1)), workdir)
    assert len(_records(workdir, "start")) == 2
    with pytest.raises(workdir_lib.ConfigMismatchError, match=r"drops seeds \[0\]"):
        runner_lib.run_study(_tiny((1,)), workdir)


def test_a_study_switch_on_a_study_config_drops_the_other_studys_section():
    """``--config.study=compare`` on top of the recon config: the ``recon`` section belongs to
    another study; it is dropped (not an unknown-key error) and the rest validates."""
    config = _load("recon")
    config.study = "compare"
    assert runner_lib.drop_other_study_sections(config) == ["recon"]
    assert "recon" not in config
    validate(config)
    config.unknown_section = 1  # a key of no study is still an error
    with pytest.raises(ConfigError, match="unknown_section"):
        validate(config)
