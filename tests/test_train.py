"""The train loop, the runner and the reports, end to end on a tiny embedded-benchmark config."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import loop as loop_lib
from experiments import models as models_lib
from experiments import run as run_lib
from experiments import runner as runner_lib
from experiments import studies
from experiments import train as train_lib
from experiments import workdir as workdir_lib
from experiments.logs import JsonlLog
from experiments.phases import Artifacts
from tests import _matrices as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train):
    config = config_lib.base_config("multi_digits", "mlp")
    config.seeds = (0,)
    config.methods = ("mean", "pcgrad")
    config.dataset.max_train_examples = 384
    config.dataset.max_test_examples = 128
    config.train.epochs = 2
    config.train.batch_size = 64
    config.train.eval_batch_size = 128
    config.train.log_every_steps = 2
    config.report.progress = False
    for k, v in train.items():
        config.train[k] = v
    return config


def _setup(config):
    studies.validate(config)
    data = data_lib.make_dataset(config.dataset)
    model = models_lib.make_model(config.model, data.tasks, data.input_shape)
    return data, model


def _final_state(config, data, model, spec, workdir):
    steps_per_epoch = data_lib.num_batches(data.train, config.train.batch_size)
    problem = train_lib.build_problem(config, data.tasks, data.tasks, model, spec, steps_per_epoch)
    params, model_state = train_lib.initial_params(model, data.tasks, data.input_shape, spec.seed)
    template = train_lib.init_state(problem, params, model_state)
    manager = loop_lib.checkpoint_manager(
        os.path.join(Artifacts(workdir).phase_dir(spec.run_id), "checkpoints")
    )
    return loop_lib.restore_checkpoint(manager, template)


def _strip_timing(records):
    out = []
    for r in records:
        r = dict(r)
        for key in ("seconds_per_step", "probe_seconds", "wall_seconds"):
            r.pop(key, None)
        out.append(r)
    return out


def test_resume_after_interruption_is_bit_identical(tmp_path):
    config = tiny_config(checkpoint_every_steps=2)
    data, model = _setup(config)
    spec = train_lib.RunSpec(label="pcgrad", method="pcgrad", seed=0)

    full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
    full_log = JsonlLog(os.path.join(full_dir, "metrics.jsonl"))
    train_lib.train_run(config, data, model, spec, full_dir, full_log, progress=False)

    cut_log = JsonlLog(os.path.join(cut_dir, "metrics.jsonl"))
    # stop after 5 steps: the last checkpoint is at step 4, step 5's records must be dropped
    out = train_lib.train_run(
        config, data, model, spec, cut_dir, cut_log, progress=False, stop_after_steps=5
    )
    assert out["kind"] == "interrupted"
    train_lib.train_run(config, data, model, spec, cut_dir, cut_log, progress=False)

    a = _final_state(config, data, model, spec, full_dir)
    b = _final_state(config, data, model, spec, cut_dir)
    assert int(a.step) == int(b.step) == 2 * data_lib.num_batches(data.train, 64)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(M.plain(x), M.plain(y))
    assert _strip_timing(full_log.records()) == _strip_timing(cut_log.records())


def test_same_seed_gives_bit_identical_runs(tmp_path):
    config = tiny_config()
    data, model = _setup(config)
    spec = train_lib.RunSpec(label="mean", method="mean", seed=3)
    states = []
    for name in ("a", "b"):
        workdir = str(tmp_path / name)
        train_lib.train_run(
            config,
            data,
            model,
            spec,
            workdir,
            JsonlLog(os.path.join(workdir, "m.jsonl")),
            progress=False,
        )
        states.append(_final_state(config, data, model, spec, workdir))
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(M.plain(x), M.plain(y))


def test_non_finite_loss_stops_the_run_without_checkpointing_it(tmp_path):
    config = tiny_config(lr=1e12, optimizer="sgd", momentum=0.0)
    data, model = _setup(config)
    spec = train_lib.RunSpec(label="mean", method="mean", seed=0)
    workdir = str(tmp_path / "nan")
    with pytest.raises(train_lib.NonFiniteLossError, match="Non-finite task loss at step"):
        train_lib.train_run(
            config,
            data,
            model,
            spec,
            workdir,
            JsonlLog(os.path.join(workdir, "m.jsonl")),
            progress=False,
        )
    state = _final_state(config, data, model, spec, workdir)
    if state is not None:  # any checkpoint written holds finite parameters
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_run_study_writes_every_report_file_and_resumes_from_the_log(tmp_path):
    config = tiny_config()
    config.single_task = True
    workdir = str(tmp_path / "study")
    report = runner_lib.run_study(config, workdir)
    for name in ("config.json", "metrics.jsonl", "report.md"):
        assert os.path.exists(os.path.join(workdir, name))
    for name in ("losses", "test_metrics", "conflict_incidence", "cos_histogram", "weights"):
        assert os.path.getsize(os.path.join(workdir, "plots", f"{name}.png")) > 10_000
    assert "| mean |" in report and "| pcgrad |" in report and "| Δm% |" in report
    records = list(JsonlLog(os.path.join(workdir, "metrics.jsonl")).records())
    summaries = [r for r in records if r["kind"] == "summary"]
    assert {r["run"] for r in summaries} == {"mean", "pcgrad", "single:left", "single:right"}
    for r in summaries:
        for task in r["tasks"]:
            assert 0.0 <= r["test"][task]["accuracy"] <= 100.0  # percent
    # a second call finds every run finished and only rebuilds the report
    before = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
    assert runner_lib.run_study(config, workdir) == report
    assert os.path.getsize(os.path.join(workdir, "metrics.jsonl")) == before


def test_workdir_of_another_config_is_refused(tmp_path):
    config = tiny_config()
    workdir = str(tmp_path / "w")
    workdir_lib.prepare_workdir(config, workdir)
    config.train.lr = 0.5
    with pytest.raises(workdir_lib.ConfigMismatchError, match="different config"):
        workdir_lib.prepare_workdir(config, workdir)
    workdir_lib.prepare_workdir(config, workdir, fresh=True)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["lr"] == 0.5


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c.__setattr__("methods", ("pcgard",)),
            "Unknown method 'pcgard'; valid names: aggregators .*'pcgrad'.*loss-only methods .*'uw'.*'mgda_ub'",
        ),
        (
            lambda c: c.__setattr__("methods", ("cagrad:alpha=0.4",)),
            r"hyper-parameter\(s\) \['alpha'\]",
        ),
        (
            lambda c: c.dataset.__setattr__("name", "imagenet"),
            "Unknown dataset 'imagenet'.*valid datasets",
        ),
        (lambda c: c.model.__setattr__("name", "vit"), "Unknown model 'vit'.*valid models"),
        (lambda c: c.train.__setattr__("optimizer", "lion"), "Unknown optimizer 'lion'"),
        (lambda c: c.train.__setattr__("lr", -0.001), r"train.lr=-0.001; .* must be > 0"),
        (lambda c: c.train.__setattr__("epochs", 0), r"train.epochs=0; train at least 1 epoch"),
        (
            lambda c: c.__setattr__("methods", ("cagrad:c=abc",)),
            r"cagrad: hyper-parameter 'c' must be a number .*got 'abc'",
        ),
        (lambda c: c.conflict.__setattr__("granularity", "layer"), "granularity 'layer'"),
    ],
)
def test_config_errors_list_valid_names(mutate, message):
    config = tiny_config()
    with config.unlocked():
        mutate(config)
    with pytest.raises(config_lib.ConfigError, match=message):
        studies.validate(config)


def test_unknown_keys_are_errors():
    config = tiny_config()
    with config.unlocked():
        config.train.learning_rate = 0.1
    with pytest.raises(
        config_lib.ConfigError, match=r"Unknown config key\(s\) \['learning_rate'\] in config.train"
    ):
        studies.validate(config)
    message = run_lib.unknown_override(tiny_config(), ["--config.train.learning_rate=0.1"])
    assert re.search(r"config.train has no 'learning_rate'; valid keys: \[.*'lr'", message)
    assert (
        run_lib.unknown_override(tiny_config(), ["--config.train.lr=0.1", "--config.seeds=(1,)"])
        is None
    )


@pytest.mark.slow
def test_study_killed_inside_a_later_phase_resumes_it_bit_identically(tmp_path):
    """A real SIGKILL of ``python -m experiments.run`` inside the third phase of a multi-phase
    study (sparse training: pretrain -> pcgrad -> pcgrad+st, the later ones starting from the
    pretrain phase's ``final`` artifact); the rerun skips the finished phases, resumes the killed
    one from its checkpoint and ends bit-identical to an uninterrupted run."""
    config_file = os.path.join(ROOT, "experiments", "configs", "sparse_training.py")
    args = [
        f"--config={config_file}",
        "--config.dataset.max_train_examples=384",
        "--config.dataset.max_test_examples=128",
        "--config.seeds=(0,)",
        "--config.sparse.methods=('pcgrad',)",
        "--config.sparse.controls=()",
        "--config.sparse.pretrain_epochs=1",
        "--config.train.epochs=6",
        "--config.train.batch_size=64",
        "--config.train.checkpoint_every_steps=2",
        "--config.report.progress=False",
        "--config.report.plots=False",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    killed_dir, full_dir = str(tmp_path / "killed"), str(tmp_path / "full")
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", f"--workdir={killed_dir}", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = "pcgrad+st__seed0"
    artifacts = Artifacts(killed_dir)
    ckpt_dir = os.path.join(artifacts.phase_dir(target), "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the study ended before the kill; it was not interrupted"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # really killed, not finished
    finished = {
        r["run"]
        for r in JsonlLog(os.path.join(killed_dir, "metrics.jsonl")).records()
        if r["kind"] == "summary"
    }
    assert finished == {"pretrain", "pcgrad"}  # a run's completion: its summary record
    assert not artifacts.has(target, train_lib.FINAL)
    for workdir in (killed_dir, full_dir):
        subprocess.run(
            [sys.executable, "-m", "experiments.run", f"--workdir={workdir}", *args],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def summaries(workdir):
        out = {}
        for r in JsonlLog(os.path.join(workdir, "metrics.jsonl")).records():
            if r["kind"] == "summary":
                for key in ("seconds_per_step", "probe_seconds", "wall_seconds"):
                    r.pop(key)
                out[r["run"]] = r
        return out

    assert set(summaries(killed_dir)) == {"pretrain", "pcgrad", "pcgrad+st"}
    assert summaries(killed_dir) == summaries(full_dir)
    a = train_lib.load_final_params(Artifacts(killed_dir), target)
    b = train_lib.load_final_params(Artifacts(full_dir), target)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(M.plain(x), M.plain(y))


def test_a_config_argument_switches_the_data_set_or_model_to_its_defaults():
    config = config_lib.load_config(f"{run_lib.DEFAULT_CONFIG}:dataset=arrays,model=lenet")
    # the default config's multi_digits keys do not stay behind
    assert config.dataset.to_dict() == data_lib.default_dataset_config("arrays").to_dict()
    assert config.model.to_dict() == models_lib.default_model_config("lenet").to_dict()
    assert config.methods == config_lib.load_config(run_lib.DEFAULT_CONFIG).methods
    recon = config_lib.load_config("experiments/configs/recon.py:embedded,model=mlp")
    assert recon.study == "recon" and recon.model.name == "mlp"
    with pytest.raises(config_lib.ConfigError, match=r"Unknown dataset 'nope'; valid datasets"):
        config_lib.load_config(f"{run_lib.DEFAULT_CONFIG}:dataset=nope")
    with pytest.raises(config_lib.ConfigError, match=r"Unknown config argument 'optimizer'"):
        config_lib.load_config(f"{run_lib.DEFAULT_CONFIG}:optimizer=sgd")
    # the old way (setting the name) keeps the old keys: validation says how to switch
    stale = tiny_config()
    stale.dataset.name = "arrays"
    with pytest.raises(config_lib.ConfigError, match=r"switch datasets in the config argument"):
        studies.validate(stale)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics: per-task in per-task encoders, recomputed on request.


def tiny_bn_config(recompute: int = 0):
    """A tiny BatchNorm model (small_resnet) on the embedded conflict benchmark, one epoch."""
    config = config_lib.base_config("digit_transforms", "small_resnet")
    config.seeds = (0,)
    config.methods = ("mean",)
    config.model.widths = (4, 4, 8)
    config.model.strides = (2, 2, 2)
    config.model.feature_dim = 8
    config.dataset.max_train_examples = 192
    config.dataset.max_test_examples = 128
    config.train.epochs = 1
    config.train.batch_size = 64
    config.train.eval_batch_size = 128
    config.train.log_every_steps = 1
    config.report.progress = False
    config.report.plots = False
    config.eval.recompute_bn_batches = recompute
    return config


def _batch_statistics(x: np.ndarray, kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance over (B, H, W) of a 3x3/1 convolution with zero padding 1 (the
    stem's conv, PyTorch's padding), written out in NumPy: the statistics its BatchNorm sees."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("bhwc,cf->bhwf", padded[:, i : i + h, j : j + w], kernel[i, j])
    return out.mean(axis=(0, 1, 2)), out.var(axis=(0, 1, 2))


def _train_tiny(config, spec, workdir):
    data, model = _setup(config)
    log = JsonlLog(os.path.join(workdir, "metrics.jsonl"))
    train_lib.train_run(config, data, model, spec, workdir, log, progress=False)
    params, state = train_lib.load_final_params(Artifacts(workdir), spec.run_id)
    return data, list(log.records()), params, state


def test_recompute_bn_option_recomputes_the_statistics_and_records_it(tmp_path):
    spec = train_lib.RunSpec(label="mean", method="mean", seed=0)
    data, _, params_off, state_off = _train_tiny(tiny_bn_config(0), spec, str(tmp_path / "off"))
    _, records, params_on, state_on = _train_tiny(tiny_bn_config(1), spec, str(tmp_path / "on"))
    for a, b in zip(jax.tree.leaves(params_off), jax.tree.leaves(params_on), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # only statistics change
    stem_on = state_on["encoder"]["batch_stats"]["stem"]["bn"]
    stem_off = state_off["encoder"]["batch_stats"]["stem"]["bn"]
    # one batch: the recomputed statistics are that batch's (the first training batch)
    x = next(data_lib.batches(data.train, 64, seed=0, epoch=0, shuffle=True))["image"]
    kernel = np.asarray(params_on["encoder"]["stem"]["conv"]["kernel"], np.float64)
    mean, var = _batch_statistics(np.asarray(x, np.float64), kernel)
    np.testing.assert_allclose(np.asarray(stem_on["mean"]), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stem_on["var"]), var, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(stem_off["mean"]), mean, rtol=1e-3)  # the EMA differs

    start = next(r for r in records if r["kind"] == "start")
    summary = next(r for r in records if r["kind"] == "summary")
    evals = [r for r in records if r["kind"] == "eval"]
    assert start["info"]["recompute_bn_batches"] == 1
    assert summary["info"]["recompute_bn_batches"] == 1
    assert evals[-1]["recompute_bn_batches"] == 1 and summary["test"] == evals[-1]["metrics"]
    assert "recompute_bn_batches" not in evals[0]  # the epoch's evaluation: stored statistics


def test_branched_encoder_keeps_per_task_statistics_in_every_batchnorm(tmp_path):
    spec = train_lib.RunSpec(
        label="mean+recon", method="mean", seed=0, branch_fn=lambda: ["block2/conv1"]
    )
    _, _, params, state = _train_tiny(tiny_bn_config(0), spec, str(tmp_path / "branched"))
    stats = state["encoder"]["batch_stats"]
    num_tasks = 3
    for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
        assert np.shape(leaf)[0] == num_tasks, jax.tree_util.keystr(path)
    # before the branch every stream sees the same activations: identical rows
    for leaf in jax.tree.leaves(stats["stem"]) + jax.tree.leaves(stats["block1"]):
        np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[1])
    # after it (block2's bn1 follows the branched conv1; block3 is shared): each stream's own
    for leaf in (stats["block2"]["bn1"]["mean"], stats["block3"]["bn1"]["mean"]):
        assert not np.allclose(np.asarray(leaf)[0], np.asarray(leaf)[1])
    assert np.shape(params["encoder"]["block2"]["conv1"]["kernel"])[0] == num_tasks
    assert np.ndim(params["encoder"]["block3"]["conv1"]["kernel"]) == 4  # shared weights


def test_per_task_state_copies_shared_leaves_and_keeps_per_task_ones():
    template = {"bn": {"mean": jax.ShapeDtypeStruct((4,), np.float32)}}
    state, spec = train_lib.per_task_state({"bn": {"mean": np.arange(4.0)}}, template, 3)
    np.testing.assert_array_equal(np.asarray(state["bn"]["mean"]), np.tile(np.arange(4.0), (3, 1)))
    assert spec["bn"]["mean"] == "copied"
    kept, _ = train_lib.per_task_state({"bn": {"mean": np.ones((3, 4))}}, template, 3)
    np.testing.assert_array_equal(np.asarray(kept["bn"]["mean"]), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"\['bn'\]\['mean'\].*shape \(2, 4\)"):
        train_lib.per_task_state({"bn": {"mean": np.ones((2, 4))}}, template, 3)


@pytest.mark.parametrize("value", [-1, 2.5, True, "3"])
def test_recompute_bn_batches_must_be_a_non_negative_int(value):
    import ml_collections

    config = tiny_bn_config()
    config.eval = ml_collections.ConfigDict({"recompute_bn_batches": value})
    with pytest.raises(config_lib.ConfigError, match=r"eval\.recompute_bn_batches.*non-negative"):
        studies.validate(config)
