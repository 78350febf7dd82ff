"""The command line as a user meets it: every mistake ends with one clear message and exit status
2 (no traceback unless --verbose), and the work dir of a command with overrides is its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from experiments import config as config_lib
from experiments import run as run_lib
from tests._cli import ROOT, assert_one_error, run_command

TINY = [
    "--config.dataset.max_train_examples=256",
    "--config.dataset.max_test_examples=64",
    "--config.seeds=(0,)",
    "--config.methods=('mean',)",
    "--config.single_task=False",
    "--config.train.batch_size=64",
    "--config.report.progress=False",
    "--config.report.plots=False",
]


def test_a_work_dir_that_is_a_file_and_a_missing_report_dir(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    assert_one_error(run_command(f"--workdir={path}"), "is a file; give --workdir a directory")
    missing = tmp_path / "nothing_here"
    assert_one_error(
        run_command(f"--workdir={missing}", module="experiments.report"), "has no metrics.jsonl"
    )
    assert not missing.exists()  # the report command creates nothing


def test_a_non_finite_loss_is_one_message(tmp_path):
    proc = run_command(
        f"--workdir={tmp_path / 'w'}",
        *TINY,
        "--config.train.lr=1e12",
        "--config.train.optimizer=sgd",
        "--config.train.momentum=0.0",
        "--config.train.epochs=2",
    )
    assert_one_error(proc, r"Non-finite task loss at step \d+.*no checkpoint was written")


def test_ctrl_c_says_that_rerunning_resumes(tmp_path):
    workdir = tmp_path / "w"
    # pytest-xdist workers ignore SIGINT and a child inherits that: give the child the default
    # disposition (no preexec_fn: forking a JAX process can deadlock), so the run gets
    # KeyboardInterrupt as from a terminal's Ctrl-C
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.run",
                f"--workdir={workdir}",
                *TINY,
                "--config.train.epochs=200",
            ],
            cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 180
    log = workdir / "metrics.jsonl"
    while time.time() < deadline and not (log.exists() and '"kind": "train"' in log.read_text()):
        time.sleep(0.1)  # until training has started
    assert proc.poll() is None, "the run ended before the interrupt"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted. Rerunning the same command resumes" in stderr


def test_the_default_work_dir_depends_on_the_overrides():
    plain = run_lib.default_workdir(["experiments.run"])
    other = run_lib.default_workdir(["experiments.run", "--config.methods=('mgda',)"])
    again = run_lib.default_workdir(["experiments.run", "--config.methods=('mgda',)"])
    assert plain == os.path.join("workdirs", "default")
    assert other.startswith(os.path.join("workdirs", "default-")) and other == again
    assert run_lib.default_workdir(["x", "--config=experiments/configs/sparse_training.py"]) == (
        os.path.join("workdirs", "sparse_training")
    )
    switched = run_lib.default_workdir(
        ["x", "--config=experiments/configs/default.py:dataset=arrays"]
    )
    assert switched.startswith(os.path.join("workdirs", "default-")) and switched != other


def test_the_config_file_flag_goes_first_whatever_its_position():
    argv = ["run", "--config.seeds=(1,)", "--config", "c.py", "--workdir=w", "--config=d.py:x"]
    assert run_lib.config_first(argv) == [
        "run",
        "--config=d.py:x",
        "--config.seeds=(1,)",
        "--workdir=w",
    ]
    assert run_lib.config_first(["run", "--fresh"]) == [
        "run",
        f"--config={run_lib.DEFAULT_CONFIG}",
        "--fresh",
    ]


def test_an_override_before_the_config_file_applies_and_a_too_small_search_split_is_one_message(
    tmp_path,
):
    """Overrides before ``--config FILE`` (absl alone stops with a fatal flags error) reach the
    study; the CoNAL search's split too small for one batch is a config error (exit 2)."""
    proc = run_command(
        "--config.train.batch_size=128",
        "--config",
        "experiments/configs/conal.py",
        f"--workdir={tmp_path / 'w'}",
        "--config.dataset.max_train_examples=256",
        "--config.seeds=(0,)",
        "--config.report.progress=False",
    )
    assert_one_error(proc, r"each needs at least one batch of train.batch_size=128")


def test_a_distributed_run_without_a_coordinator_is_one_message(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            f"--workdir={tmp_path / 'w'}",
            "--config.parallel.distributed=True",
        ],
        cwd=ROOT,
        env=dict(env_free, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert_one_error(proc, r"jax.distributed.initialize failed.*JAX_COORDINATOR_ADDRESS")


def test_a_work_dir_refuses_a_dropped_seed_and_names_the_fix(tmp_path):
    """Seeds may only grow in a work dir (tests/test_add_seed.py runs the growth end to end)."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    stored = config_lib.load_config(run_lib.DEFAULT_CONFIG)
    stored.seeds = (0, 1)
    stored.methods = ("mean",)
    stored.single_task = False
    stored.dataset.max_train_examples, stored.dataset.max_test_examples = 256, 64
    stored.train.batch_size = 64
    (workdir / "config.json").write_text(stored.to_json_best_effort(indent=2))
    proc = run_command(f"--workdir={workdir}", *TINY)  # TINY has seeds (0,)
    assert_one_error(proc, r"drops seeds \[1\]\. Seeds may only be added")
