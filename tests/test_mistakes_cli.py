"""Every mistake a user makes on the command line, one row each: one ``error:`` line naming the
problem and the fix, exit status 2, no traceback, and the work dir as it was before.

A new mistake is one row of :data:`MISTAKES`: an id, the command's arguments (a function of the
test's temporary directory, which it may fill: a data file, a work dir), a regex the one
``error:`` line must match, and the work dir the command names (checked untouched). The library's
own mistakes (a loss of the wrong shape, a mask of the wrong dtype, ...) are the table of
``tests/test_mistakes_library.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import pytest

from experiments import config as config_lib
from experiments import workdir as workdir_lib
from tests._cli import apply_overrides, assert_one_error, read_only, run_command, snapshot

DEFAULT_CONFIG = "experiments/configs/default.py"
TINY = (
    "--config.dataset.max_train_examples=128",
    "--config.dataset.max_test_examples=32",
    "--config.seeds=(0,)",
    "--config.methods=('mean',)",
    "--config.single_task=False",
    "--config.train.batch_size=32",
    "--config.train.epochs=1",
    "--config.report.progress=False",
    "--config.report.plots=False",
)


# ---------------------------------------------------------------------------------------------
# Inputs the rows build in the test's temporary directory.


def npz(tmp, name: str = "data.npz", **overrides) -> str:
    """An ``arrays`` data file (two tasks, 8x8 images), with ``overrides`` replacing or (None)
    removing arrays."""
    rng = np.random.default_rng(0)
    arrays: dict = {}
    for split, n in (("train", 64), ("test", 16)):
        arrays[f"{split}_image"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_digit"] = rng.integers(0, 3, n).astype(np.int64)
        arrays[f"{split}_parity"] = rng.integers(0, 2, n).astype(np.int32)
    for key, value in overrides.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    path = os.path.join(tmp, name)
    np.savez(path, **arrays)  # an object array is pickled into the file
    return path


def arrays_args(path: str) -> list[str]:
    return [f"--config={DEFAULT_CONFIG}:dataset=arrays", f"--config.dataset.path={path}"]


def workdir_in(tmp) -> str:
    return os.path.join(tmp, "wd")


def prepared_workdir(tmp, *args: str) -> str:
    """A work dir holding the ``config.json`` the command ``args`` writes (what a finished run of
    it holds first), made by running the command's own config preparation."""
    workdir = workdir_in(tmp)
    config = config_lib.load_config(DEFAULT_CONFIG)
    apply_overrides(config, args)
    workdir_lib.prepare_workdir(config, workdir)
    return workdir


# ---------------------------------------------------------------------------------------------
# The table.


@dataclasses.dataclass(frozen=True)
class Mistake:
    id: str
    args: Callable[[str], list[str]]  # tmp dir -> arguments (after --workdir)
    error: str  # regex of the one error line
    module: str = "experiments.run"
    read_only: bool = False  # run with the work dir (or its parent, for a new one) read-only
    prepare: Callable[[str], object] | None = None  # fills tmp before the snapshot


MISTAKES = [
    Mistake(
        "a model whose pools do not fit the data's images",
        lambda t: [f"--config={DEFAULT_CONFIG}:model=small_cnn"],
        r"model 'small_cnn' on data set 'multi_digits': .*too small for 4 2x2 max-pools",
    ),
    Mistake(
        "arrays without a path",
        lambda t: [f"--config={DEFAULT_CONFIG}:dataset=arrays"],
        r"needs --config\.dataset\.path=<file\.npz>",
    ),
    Mistake(
        "arrays path that does not exist",
        lambda t: arrays_args(os.path.join(t, "nope.npz")),
        r"nope\.npz' does not exist or is not a file; give --config\.dataset\.path",
    ),
    Mistake(
        "arrays file with a pickled object array",
        lambda t: arrays_args(npz(t, train_digit=np.array([[1], [2, 3]] * 32, dtype=object))),
        r"array 'train_digit' holds Python objects .* save it as a numeric array",
    ),
    Mistake(
        "arrays label arrays of different lengths",
        lambda t: arrays_args(npz(t, train_parity=np.zeros(60, np.int32))),
        r"split 'train'.*differ in length: .*'parity': 60.*same leading length",
    ),
    Mistake(
        "arrays task with train_ but no test_",
        lambda t: arrays_args(npz(t, test_parity=None)),
        r"every task needs a train_<task> and a test_<task> array; missing \['test_parity'\]",
    ),
    Mistake(
        "arrays float class labels [N]",
        lambda t: arrays_args(npz(t, train_digit=np.zeros(64), test_digit=np.zeros(16))),
        r"Task 'digit': targets of dtype float64 .* Class labels must be integers",
    ),
    Mistake(
        "arrays negative class labels",
        lambda t: arrays_args(npz(t, train_digit=np.arange(64) % 3 - 1)),
        r"array train_digit: task 'digit' has labels in \[-1, 1\].*class index in \[0, 2\]",
    ),
    Mistake(
        "arrays labels >= the given class count",
        lambda t: arrays_args(npz(t, num_classes_digit=np.int64(2))),
        r"task 'digit' has labels in \[0, 2\].*class index in \[0, 1\] \(num_classes=2\)",
    ),
    Mistake(
        "non-positive learning rate",
        lambda t: ["--config.train.lr=-0.001"],
        r"train\.lr.*-0\.001",
    ),
    Mistake("zero epochs", lambda t: ["--config.train.epochs=0"], r"train\.epochs.*0"),
    Mistake(
        "negative conflict probe period",
        lambda t: ["--config.conflict.every=-1"],
        r"config\.conflict\.every=-1; the conflict probe's period is an integer >= 1",
    ),
    Mistake(
        "zero batch size",
        lambda t: ["--config.train.batch_size=0"],
        r"config\.train\.batch_size=0; use a positive integer",
    ),
    Mistake(
        "training split smaller than one batch",
        lambda t: ["--config.dataset.max_train_examples=64", "--config.train.batch_size=128"],
        r"has 64 examples, fewer than one batch \(config\.train\.batch_size=128\); lower",
    ),
    Mistake(
        "a seed given twice",
        lambda t: ["--config.seeds=(0, 1, 0)"],
        r"config\.seeds=\(0, 1, 0\) repeats \[0\]; give each seed once",
    ),
    Mistake(
        "hyper-parameter of the wrong type",
        lambda t: ["--config.methods=('cagrad:c=abc',)"],
        r"cagrad: hyper-parameter 'c' must be a number .*got 'abc' \(str\)\. E\.g\. 'cagrad:c=0\.5'",
    ),
    Mistake(
        "a method that cannot take the data's number of tasks",
        lambda t: ["--config.methods=('trimmed_mean',)"],
        r"On the 2 tasks of 'multi_digits': trimmed_mean .* needs at least .* 3 tasks; got K=2",
    ),
    Mistake(
        "unknown config key",
        lambda t: ["--config.train.learning_rate=0.1"],
        r"config\.train has no 'learning_rate'; valid keys: \[.*'lr'",
    ),
    Mistake(
        "misspelt config section",
        lambda t: ["--config.trian.lr=0.1"],
        r"config has no 'trian'.*'train'",
    ),
    Mistake(
        "--fresh with a mistake deletes nothing",
        lambda t: ["--fresh", *arrays_args(os.path.join(t, "nope.npz"))],
        r"nope\.npz' does not exist",
        prepare=lambda t: prepared_workdir(t, *TINY),
    ),
    Mistake(
        "read-only parent of a new work dir",
        lambda t: [*TINY],
        r"work dir '.*wd' cannot be written \((Read-only file system|Permission denied|Operation "
        r"not permitted)",
        read_only=True,
    ),
    Mistake(
        "read-only work dir holding a run",
        lambda t: [*TINY],
        r"work dir '.*wd' cannot be written .* Give --workdir a writable directory",
        read_only=True,
        prepare=lambda t: prepared_workdir(t, *TINY),
    ),
    Mistake(
        "report on a read-only work dir",
        lambda t: [],
        r"cannot be written .*the report writes report\.md.*cp -r",
        module="experiments.report",
        read_only=True,
        prepare=lambda t: (
            prepared_workdir(t, *TINY),
            open(os.path.join(workdir_in(t), "metrics.jsonl"), "w").close(),
        ),
    ),
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
def test_mistake(mistake: Mistake, tmp_path):
    tmp = str(tmp_path)
    if mistake.prepare:
        mistake.prepare(tmp)
    workdir = workdir_in(tmp)
    before = snapshot(workdir)
    args = [f"--workdir={workdir}", *mistake.args(tmp)]
    if mistake.read_only:
        # the work dir when it exists, else its parent (where a new one would be created)
        with read_only(workdir if os.path.isdir(workdir) else tmp):
            proc = run_command(*args, module=mistake.module)
    else:
        proc = run_command(*args, module=mistake.module)
    assert_one_error(proc, mistake.error)
    assert snapshot(workdir) == before, "the failed command changed the work dir"


def test_help_exits_zero():
    for module in ("experiments.run", "experiments.report"):
        proc = run_command("--help", module=module)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "--workdir" in proc.stdout


@pytest.mark.slow
def test_a_finished_run_in_a_read_only_work_dir(tmp_path):
    """The rows above hold a work dir's config.json; here a run has really finished: rerunning it
    and rebuilding its report on the read-only work dir are one error each, and change nothing."""
    workdir = str(tmp_path / "wd")
    done = run_command(f"--workdir={workdir}", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    before = snapshot(workdir)
    assert any(p.endswith("report.md") for p in before)
    with read_only(workdir):
        assert_one_error(run_command(f"--workdir={workdir}", *TINY), r"cannot be written")
        report = run_command(f"--workdir={workdir}", module="experiments.report")
        assert_one_error(report, r"cannot be written .*cat|cannot be written .*report\.md")
    assert snapshot(workdir) == before
