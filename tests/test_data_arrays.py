"""Your own data without editing the package: the ``arrays`` data set (.npz) and a data set
registered from a config file (built with the Multi-MNIST construction from two item pools)."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import runner as runner_lib
from experiments.logs import JsonlLog
from experiments.tasks import TaskSpec


def _write_npz(path, n_train=96, n_test=32, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 3, size=n)
        images = np.zeros((n, 8, 8), np.uint8)
        for i, c in enumerate(labels):  # class c: a bright row at 2c, learnable
            images[i, 2 * int(c)] = 255
        arrays[f"{split}_image"] = images
        arrays[f"{split}_row"] = labels.astype(np.int64)
        arrays[f"{split}_parity"] = (labels % 2).astype(np.int32)
    np.savez(path, **arrays)


def test_arrays_dataset_reads_tasks_kinds_and_splits(tmp_path):
    path = str(tmp_path / "mine.npz")
    _write_npz(path)
    config = data_lib.default_dataset_config("arrays")
    config.path = path
    data = data_lib.make_dataset(config)
    assert data.tasks == (
        TaskSpec("parity", "classification", 2),
        TaskSpec("row", "classification", 3),
    )
    assert (len(data.train), len(data.test), data.input_shape) == (96, 32, (8, 8, 1))
    example = data.train[0]
    assert example["image"].dtype == np.float32 and example["image"].max() == 1.0
    config.tasks = "row"
    assert data_lib.make_dataset(config).task_names == ("row",)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c, p: setattr(c, "path", ""), "needs --config.dataset.path"),
        (lambda c, p: setattr(c, "path", p + ".missing"), "does not exist"),
        (lambda c, p: setattr(c, "tasks", "colour"), r"missing \['train_colour', 'test_colour'\]"),
    ],
)
def test_arrays_dataset_errors_name_the_fix(tmp_path, mutate, message):
    path = str(tmp_path / "mine.npz")
    _write_npz(path)
    config = data_lib.default_dataset_config("arrays")
    config.path = path
    mutate(config, path)
    with pytest.raises(ValueError, match=message):
        data_lib.make_dataset(config)


CONFIG_FILE = textwrap.dedent(
    '''
    """A user's config: two pools of 8x8 items (their own arrays) -> the Multi-MNIST construction."""
    import numpy as np

    from experiments.config import base_config
    from experiments.data import ArraySource, register_dataset
    from experiments.data.multi_mnist import composite_dataset


    def pool(n, seed):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, size=n)
        images = np.zeros((n, 8, 8), np.uint8)
        for i, c in enumerate(labels):
            images[i, :, 2 * int(c)] = 255
        return ArraySource({"image": images, "label": labels})


    def build(*, name, num_train, num_test, max_train_examples, max_test_examples):
        return composite_dataset(
            name=name, left_train=pool(200, 0), right_train=pool(200, 1), left_test=pool(50, 2),
            right_test=pool(50, 3), num_train=num_train, num_test=num_test, max_shift=2,
            left_classes=4, right_classes=4,
        )


    register_dataset(
        "my_pairs", build,
        {"num_train": 256, "num_test": 64, "max_train_examples": 0, "max_test_examples": 0},
    )


    def get_config():
        config = base_config("my_pairs", "mlp")
        config.methods = ("mean",)
        config.train.epochs = 2
        config.train.batch_size = 64
        config.report.progress = False
        config.report.plots = False
        return config
    '''
)


def test_a_config_file_registers_its_own_data_set(tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text(CONFIG_FILE)
    config = config_lib.load_config(str(path))
    config = config_lib.load_config(str(path))  # loading twice (registering again) is fine
    workdir = str(tmp_path / "w")
    runner_lib.run_study(config, workdir)
    (summary,) = [
        r
        for r in JsonlLog(os.path.join(workdir, "metrics.jsonl")).records()
        if r["kind"] == "summary"
    ]
    assert set(summary["test"]) == {"left", "right"}
    assert data_lib.DATASETS["my_pairs"].defaults["num_train"] == 256
    with pytest.raises(ValueError, match="already registered"):
        data_lib.register_dataset("multi_digits", lambda **kw: None, {})
