"""The runner's instance-wise objectives (``config.train.objectives = "instances"``, issue 24):
every (sample, task) pair of the batch is an objective, weighed by the Gramian engine, and one
update moves encoder and heads.

The references are written from the definitions, independently of the engine: the gradient of
the mean per-sample loss (``mean``), and UPGrad (Quinton & Rey 2024, eq. 5, by NNLS in float64:
``tests/_reference.upgrad_ref``) on the per-pair Jacobian rows ``jax.vmap(jax.jacrev(...))`` of
every parameter. One SGD step with learning rate 1 and no momentum makes the runner's update
the negative aggregated gradient.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import studies
from experiments import train as train_lib
from experiments.configs import iwrm as iwrm_config
from experiments.logs import JsonlLog
from tests import _matrices as M
from tests._cli import apply_overrides, assert_one_error, run_command, snapshot
from tests._reference import upgrad_ref

IWRM_CONFIG = "experiments/configs/iwrm.py"
BATCH = 8  # K = 8 samples x 2 tasks = 16 objectives


def tiny_config(**train):
    config = config_lib.base_config("multi_digits", "mlp")
    config.seeds = (0,)
    config.methods = ("mean", "upgrad")
    config.dataset.max_train_examples = 128
    config.dataset.max_test_examples = 64
    config.model.hidden_sizes = (16,)
    config.model.head_hidden = 8
    config.train.objectives = "instances"
    config.train.epochs = 2
    config.train.batch_size = BATCH
    config.train.eval_batch_size = 64
    config.train.optimizer = "sgd"
    config.train.lr = 1.0
    config.train.momentum = 0.0
    config.train.log_every_steps = 4
    config.report.progress = False
    for k, v in train.items():
        config.train[k] = v
    return config


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    studies.validate(config)
    data = data_lib.make_dataset(config.dataset)
    model = models_lib.make_model(config.model, data.tasks, data.input_shape)
    batch = next(data_lib.batches(data.train, BATCH, seed=0, epoch=0, shuffle=True))
    return config, data, model, batch


def one_step(setup, method: str):
    """``(state before, state after)`` of one runner step of ``method``."""
    config, data, model, batch = setup
    spec = train_lib.RunSpec(label=method, method=method, seed=0)
    problem = train_lib.build_problem(config, data.tasks, data.tasks, model, spec, 16)
    params, model_state = train_lib.initial_params(model, data.tasks, data.input_shape, 0)
    state = train_lib.init_state(problem, params, model_state)
    step = jax.jit(train_lib.make_train_step(problem))
    after, outputs = step(state, {k: batch[k] for k in ("image", *[t.name for t in data.tasks])})
    return problem, state, after, outputs


def pair_losses_ref(model, tasks, params, x, labels):
    """``[B, T]``: softmax cross-entropy of each (sample, task) pair, written from the models'
    Linen modules directly (not through the runner's loss functions)."""
    z = model.encoder.apply({"params": params["encoder"]}, x, train=True)
    cols = []
    for t in tasks:
        logits = model.heads[t.name].apply({"params": params["heads"][t.name]}, z, train=True)
        cols.append(optax.softmax_cross_entropy_with_integer_labels(logits, labels[t.name]))
    return jnp.stack(cols, axis=1)


def update_of(before, after):
    """The step's parameter change (SGD, lr 1: minus the aggregated gradient)."""
    return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), after, before)


def test_mean_is_the_gradient_of_the_mean_pair_loss(setup):
    """(1) With ``mean`` (w = 1/(B T) on every pair) the instance-wise step of encoder AND heads
    is the ordinary gradient step on the mean over samples and tasks of the loss."""
    _, data, model, batch = setup
    _, state, after, outputs = one_step(setup, "mean")
    x = jnp.asarray(batch["image"])
    labels = {t.name: jnp.asarray(batch[t.name]) for t in data.tasks}
    loss_fn = lambda p: jnp.mean(pair_losses_ref(model, data.tasks, p, x, labels))
    grad = jax.grad(loss_fn)(state.params)
    got = update_of(state.params, after.params)
    for g, u in zip(jax.tree.leaves(grad), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(u, -np.asarray(g), rtol=1e-5, atol=1e-7)
    pair = pair_losses_ref(model, data.tasks, state.params, x, labels)
    np.testing.assert_allclose(outputs["losses"], np.mean(pair, axis=0), rtol=1e-6)
    np.testing.assert_allclose(outputs["weights"], [0.5, 0.5], rtol=1e-6)  # per-task totals


def test_upgrad_update_matches_the_jacobian_reference(setup):
    """(2) UPGrad on the [B T, B T] Gram matrix of every parameter's per-pair gradients: the
    encoder's and the heads' updates equal ``upgrad_ref`` of the explicit per-pair Jacobian
    (rows in the order b T + t), float32 against float64."""
    _, data, model, batch = setup
    _, state, after, outputs = one_step(setup, "upgrad")
    x = jnp.asarray(batch["image"])
    labels = {t.name: jnp.asarray(batch[t.name]) for t in data.tasks}

    def sample_losses(params, xi, yi):  # one sample -> [T]
        one = {k: v[None] for k, v in yi.items()}
        return pair_losses_ref(model, data.tasks, params, xi[None], one)[0]

    jac = jax.vmap(jax.jacrev(sample_losses), in_axes=(None, 0, 0))(state.params, x, labels)
    leaves, treedef = jax.tree.flatten(jac)  # leaves [B, T, *leaf]
    rows = np.concatenate(
        [np.asarray(leaf, np.float64).reshape(BATCH * len(data.tasks), -1) for leaf in leaves], 1
    )  # J [B T, P]: row b T + t
    d = upgrad_ref(rows)
    sizes = np.cumsum([int(np.prod(leaf.shape[2:])) for leaf in leaves])[:-1]
    ref = jax.tree.unflatten(
        treedef,
        [c.reshape(leaf.shape[2:]) for c, leaf in zip(np.split(d, sizes), leaves, strict=True)],
    )
    got = update_of(state.params, after.params)
    scale = float(np.max(np.abs(d)))
    for r, u in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(u, -r, rtol=1e-3, atol=1e-4 * scale)
    assert np.all(rows @ d >= -1e-6 * scale * np.linalg.norm(rows, axis=1).max())  # no conflict
    assert outputs["weights"].shape == (len(data.tasks),)


def test_a_stateful_weighting_gets_a_state_for_every_objective(setup):
    """GradVac keeps a [K, K] state: K = B T objectives, threaded through the encoder chain."""
    problem, state, after, _ = one_step(setup, "gradvac")
    k = BATCH * len(setup[1].tasks)
    assert problem.instance_wise.num_objectives == k
    assert state.opt_state[0][0].targets.shape == (k, k)
    assert np.any(np.asarray(after.opt_state[0][0].targets) != 0)  # updated by the step


def test_a_resumed_instance_wise_run_is_bit_identical(tmp_path, setup):
    """Checkpoints hold the weighting's state: killed after 5 steps and resumed, the run ends
    where the uninterrupted one does."""
    _, data, model, _ = setup
    config = tiny_config(checkpoint_every_steps=2, lr=0.05)
    spec = train_lib.RunSpec(label="gradvac", method="gradvac", seed=0)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    full_log = JsonlLog(os.path.join(full, "metrics.jsonl"))
    summary = train_lib.train_run(config, data, model, spec, full, full_log, progress=False)
    assert summary["info"]["objectives"] == {
        "mode": "instances",
        "count": 2 * BATCH,
        "samples": BATCH,
        "tasks": 2,
    }
    cut_log = JsonlLog(os.path.join(cut, "metrics.jsonl"))
    out = train_lib.train_run(
        config, data, model, spec, cut, cut_log, progress=False, stop_after_steps=5
    )
    assert out["kind"] == "interrupted"
    train_lib.train_run(config, data, model, spec, cut, cut_log, progress=False)
    final = [
        next(r for r in log.records() if r["kind"] == "summary") for log in (full_log, cut_log)
    ]
    assert final[0]["test"] == final[1]["test"]
    strip = lambda rs: [
        {k: v for k, v in r.items() if "seconds" not in k} for r in rs if r["kind"] == "train"
    ]
    assert strip(full_log.records()) == strip(cut_log.records())
    a, b = (
        train_lib.load_final_params(train_lib.Artifacts(d), spec.run_id)[0] for d in (full, cut)
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(M.plain(x), M.plain(y))


@pytest.mark.slow
def test_the_iwrm_config_learns_and_a_rerun_resumes(tmp_path):
    """(3) The shipped config from the command line, shortened: the loss falls, the test
    accuracy beats chance, the report says the objectives were instance-wise, and rerunning the
    same command resumes (the finished runs are not trained again)."""
    workdir = tmp_path / "w"
    args = (
        f"--config={IWRM_CONFIG}",
        f"--workdir={workdir}",
        "--config.seeds=(0,)",
        # the shipped config's methods less exact UPGrad (its step: test (2); it diverges late)
        "--config.methods=('mean', 'upgrad:reg_eps=1e-4')",
        "--config.dataset.max_train_examples=1024",
        "--config.dataset.max_test_examples=256",
        "--config.train.epochs=4",
        "--config.report.plots=False",
        "--config.report.progress=False",
    )
    proc = run_command(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    summaries = {r["run"]: r for r in records if r["kind"] == "summary"}
    assert set(summaries) == {"mean", "upgrad:reg_eps=1e-4"}
    for run, summary in summaries.items():
        assert summary["info"]["objectives"]["count"] == 64, run
        train = [
            sum(r["loss"].values()) for r in records if r["kind"] == "train" and r["run"] == run
        ]
        first, last = train[0], np.mean(train[-3:])  # one batch each: the last three averaged
        assert last < 0.85 * first, (run, first, last)
        assert min(summary["test"][t]["accuracy"] for t in ("left", "right")) > 15.0, (
            run
        )  # 10: chance
    assert "Instance-wise objectives" in (workdir / "report.md").read_text()
    before = len(records)
    again = run_command(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    after = (workdir / "metrics.jsonl").read_text().splitlines()
    assert not any(json.loads(line)["kind"] == "train" for line in after[before:])


REFUSALS = [  # (id, overrides, the error line's pattern)
    ("bad_value", ("--config.train.objectives=samples",), r"config.train.objectives='samples'"),
    ("loss_only", ("--config.methods=('uw',)",), r"'uw'.*objectives='instances' cannot run"),
    ("graddrop", ("--config.methods=('graddrop',)",), r"'graddrop'.*cannot run"),
    ("cross_batch", ("--config.methods=('sdmgrad',)",), r"'sdmgrad'.*cannot run"),
    ("upper_bound", ("--config.methods=('upgrad_ub',)",), r"'upgrad_ub'.*cannot run"),
    ("linear", ("--config.methods=('linear',)",), r"'linear.*cannot run"),
    ("granularity", ("--config.methods=('upgrad:granularity=\"leaf\"',)",), r"drop granularity"),
    ("study", ("--config.study=sparse_training",), r"runs the 'compare' study only"),
    (
        "batch_norm",  # two pools: the 12 x 12 canvas is too small for small_cnn's default four
        (f"--config={IWRM_CONFIG}:model=small_cnn", "--config.model.channels=(16,32)"),
        r"keeps state \['batch_stats'\]",
    ),
]


#: Refused through the command line (exit 2, one line, nothing written); the others are the same
#: config checks, called in-process (studies.validate: what the command line calls first).
CLI_REFUSALS = ("bad_value", "batch_norm")


@pytest.mark.parametrize(
    "name,overrides,pattern", [r for r in REFUSALS if r[0] in CLI_REFUSALS], ids=CLI_REFUSALS
)
def test_what_instance_wise_objectives_refuse_on_the_command_line(
    tmp_path, name, overrides, pattern
):
    """(4) One ``error:`` line naming the key and the fix, exit 2, nothing written."""
    workdir = tmp_path / "w"
    args = (
        [f"--config={IWRM_CONFIG}", *overrides] if "--config=" not in overrides[0] else [*overrides]
    )
    proc = run_command(*args, f"--workdir={workdir}", "--config.report.progress=False")
    assert_one_error(proc, pattern)
    assert snapshot(str(workdir)) is None


@pytest.mark.parametrize(
    "overrides,pattern",
    [r[1:] for r in REFUSALS if r[0] not in CLI_REFUSALS],
    ids=[r[0] for r in REFUSALS if r[0] not in CLI_REFUSALS],
)
def test_what_instance_wise_objectives_refuse(overrides, pattern):
    """(4) The config check names the key or method and the fix."""
    config = iwrm_config.get_config()
    apply_overrides(config, overrides)
    with pytest.raises(config_lib.ConfigError, match=pattern):
        studies.validate(config)
