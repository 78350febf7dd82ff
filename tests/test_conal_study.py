"""The conal study: the exact retrain step of a tree architecture (against a per-task reference
written out by hand), its all-shared case against the standard run, the study end to end at a tiny
size (phases, artifacts, conal_summary.json, per-task parameter shapes, resume), and its configs."""

from __future__ import annotations

import json
import os
import tempfile
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import config as config_lib
from experiments import run as run_lib
from experiments import runner as runner_lib
from experiments.config import ConfigError
from experiments.data.tfds_io import DataUnavailableError
from experiments.logs import JsonlLog
from experiments.models import default_model_config
from experiments.models.base import ClassifierHead
from experiments.phases import Artifacts
from experiments.studies import conal as conal_study
from experiments.studies import validate
from experiments.tasks import TaskSpec
from mtl_jax import conal

CONFIG = os.path.join(os.path.dirname(run_lib.__file__), "configs", "conal.py")


def _config(setup: str | None = None):
    return config_lib.load_config(CONFIG + (f":{setup}" if setup else ""))


# ---------------------------------------------------------------------------------------------
# The retrain step: every parameter gets the gradients of exactly the tasks that use it.


class _DenseTanh(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        return jnp.tanh(nn.Dense(self.width, name="fc")(x))


def _reference_losses(params, arch, x, ys):
    """Each task's loss written out from scratch: its trunk blocks, its own copies, its head
    (tanh(x W + b) per block, softmax cross-entropy), no library code."""
    out = []
    branches = arch.branches()
    for t, p in enumerate(arch.branch_points):
        h = x
        for b in range(p):
            w = params["trunk"][b]["fc"]
            h = jnp.tanh(h @ w["kernel"] + w["bias"])
        if p < arch.num_blocks:
            c = next(i for i, (_, ts) in enumerate(branches) if t in ts)
            for w in params["branches"][c]:
                h = jnp.tanh(h @ w["fc"]["kernel"] + w["fc"]["bias"])
        head = params["heads"][f"t{t}"]["pred"]
        logits = h @ head["kernel"] + head["bias"]
        logp = jax.nn.log_softmax(logits)
        out.append(-jnp.mean(jnp.take_along_axis(logp, ys[t][:, None], axis=1)))
    return out


def _tasks(k, num_classes=3):
    return tuple(TaskSpec(f"t{t}", "classification", num_classes) for t in range(k))


def _tree(arch, width=5, num_classes=3):
    blocks = tuple(conal.linen_block(_DenseTanh(width), f"b{b}") for b in range(arch.num_blocks))
    tasks = _tasks(arch.num_tasks, num_classes)
    model = types.SimpleNamespace(heads={t.name: ClassifierHead(num_classes) for t in tasks})
    tree = conal_study.tree_model(blocks, arch, model, tasks)
    key = jax.random.PRNGKey(3)
    x = jax.random.normal(key, (8, 4))
    shapes = [x]
    inits = []
    for b, block in enumerate(blocks):
        inits.append(block.init(jax.random.fold_in(key, b), shapes[-1]))
        shapes.append(block.apply(*inits[-1], shapes[-1], False)[0])

    def fresh(b, salt):
        return block_init(blocks[b], jax.random.fold_in(key, 100 * salt + b), shapes[b])

    def block_init(block, k, inp):
        return block.init(k, inp)[0]

    params = {
        "trunk": [fresh(b, 1) for b in range(arch.trunk_depth)],
        "branches": [
            [fresh(b, 2 + c) for b in range(p, arch.num_blocks)]
            for c, (p, _) in enumerate(tree.branches)
        ],
        "heads": {
            t.name: model.heads[t.name].init(jax.random.fold_in(key, 999 + i), shapes[-1])["params"]
            for i, t in enumerate(tasks)
        },
    }
    state = {
        "trunk": [{} for _ in range(arch.trunk_depth)],
        "branches": [[{} for _ in range(p, arch.num_blocks)] for p, _ in tree.branches],
    }
    ys = [
        jax.random.randint(jax.random.fold_in(key, 50 + t), (8,), 0, num_classes) for t in range(3)
    ]
    batch = {"image": x, **{f"t{t}": ys[t] for t in range(3)}}
    return tree, params, state, batch, ys


@pytest.mark.parametrize(
    "branch_points, grouped",
    [
        ((2, 0, 3), False),
        ((3, 3, 3), False),
        ((0, 0, 0), False),
        ((1, 2, 1), False),
        ((1, 1, 3), True),
        ((0, 2, 0), True),
    ],
    ids=str,
)
def test_retrain_step_updates_each_parameter_with_the_tasks_that_use_it(branch_points, grouped):
    """CoNAL (one branch per task) and CoNAL-Pro groups (one branch shared by its tasks, updated
    with the mean of their gradients under ``mean``)."""
    arch = conal.Architecture(branch_points, 3, grouped=grouped)
    tree, params, state, batch, ys = _tree(arch)
    init, step = conal_study.make_retrain(tree, _tasks(3), "mean", {}, optax.sgd(1.0), 1, seed=0)
    new, out = jax.jit(step)(init(params, state), batch)

    grads = [
        jax.grad(lambda p, t=t: _reference_losses(p, arch, batch["image"], ys)[t])(params)
        for t in range(3)
    ]
    losses = _reference_losses(params, arch, batch["image"], ys)
    np.testing.assert_allclose(out["losses"], np.array(losses), rtol=1e-5, atol=1e-6)
    for b in range(arch.trunk_depth):
        users = [t for t, p in enumerate(branch_points) if p > b]
        expected = jax.tree.map(lambda *g: sum(g) / len(g), *[grads[t]["trunk"][b] for t in users])
        got = jax.tree.map(lambda a, n: a - n, params["trunk"][b], new.params["trunk"][b])
        jax.tree.map(lambda e, g: np.testing.assert_allclose(g, e, atol=1e-6), expected, got)
    for c, (_, ts) in enumerate(tree.branches):
        assert grouped or len(ts) == 1  # CoNAL: one task per branch, which gets its own gradient
        expected = jax.tree.map(lambda *g: sum(g) / len(g), *[grads[t]["branches"][c] for t in ts])
        got = jax.tree.map(lambda a, n: a - n, params["branches"][c], new.params["branches"][c])
        jax.tree.map(lambda e, g: np.testing.assert_allclose(g, e, atol=1e-6), expected, got)
    for t in range(3):
        name = f"t{t}"
        got = jax.tree.map(lambda a, n: a - n, params["heads"][name], new.params["heads"][name])
        jax.tree.map(
            lambda e, g: np.testing.assert_allclose(g, e, atol=1e-6), grads[t]["heads"][name], got
        )
    # the shapes of the retrained model follow the architecture
    assert len(new.params["trunk"]) == max(branch_points)
    assert [len(br) for br in new.params["branches"]] == [3 - p for p, _ in tree.branches]


def test_retrain_units_group_trunk_blocks_by_their_tasks():
    tree, *_ = _tree(conal.Architecture((2, 0, 3), 3))
    assert tree.units() == [
        ((0, 2), "trunk", [0, 1]),
        ((2,), "trunk", [2]),
        ((1,), "branch", 0),
        ((0,), "branch", 1),
    ]


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics: every stream keeps its own, and precise BN recomputes them.

_MOMENTUM, _EPS = 0.9, 1e-5


class _DenseBN(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.width, name="fc")(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=_MOMENTUM, epsilon=_EPS, name="bn"
        )(x)
        return jnp.tanh(x)


def _bn_tree(arch, width=4, num_classes=3):
    """A tree of Dense -> BatchNorm -> tanh blocks whose parameters (and BN scale/bias) differ per
    copy; running statistics start at mean 0, variance 1."""
    blocks = tuple(conal.linen_block(_DenseBN(width), f"b{b}") for b in range(arch.num_blocks))
    tasks = _tasks(arch.num_tasks, num_classes)
    model = types.SimpleNamespace(heads={t.name: ClassifierHead(num_classes) for t in tasks})
    tree = conal_study.tree_model(blocks, arch, model, tasks)
    key = jax.random.PRNGKey(7)
    x = jnp.zeros((2, 3))
    shapes = [x]
    for block in blocks:
        shapes.append(block.apply(*block.init(key, shapes[-1]), shapes[-1], False)[0])

    def copy(b, salt):
        p, s = blocks[b].init(jax.random.fold_in(key, 100 * salt + b), shapes[b])
        bn = {
            "scale": 1.0 + jax.random.uniform(jax.random.fold_in(key, 7 * salt + b), (width,)),
            "bias": jax.random.normal(jax.random.fold_in(key, 11 * salt + b), (width,)),
        }
        return {**p, "bn": bn}, s

    trunk = [copy(b, 1) for b in range(arch.trunk_depth)]
    branches = [
        [copy(b, 2 + c) for b in range(p, arch.num_blocks)]
        for c, (p, _) in enumerate(tree.branches)
    ]
    params = {
        "trunk": [v[0] for v in trunk],
        "branches": [[v[0] for v in br] for br in branches],
        "heads": {
            t.name: model.heads[t.name].init(jax.random.fold_in(key, 999 + i), shapes[-1])["params"]
            for i, t in enumerate(tasks)
        },
    }
    state = {"trunk": [v[1] for v in trunk], "branches": [[v[1] for v in br] for br in branches]}
    return tree, params, state


def _stream_statistics(x, layers):
    """Reference, from the definition: the batch mean and biased variance of every BatchNorm input
    along one stream of Dense -> BN (batch statistics) -> tanh layers; NumPy only."""
    h, out = np.asarray(x, np.float64), []
    for layer in layers:
        pre = h @ np.asarray(layer["fc"]["kernel"]) + np.asarray(layer["fc"]["bias"])
        mean, var = pre.mean(axis=0), pre.var(axis=0)
        out.append((mean, var))
        normed = (pre - mean) / np.sqrt(var + _EPS)
        h = np.tanh(normed * np.asarray(layer["bn"]["scale"]) + np.asarray(layer["bn"]["bias"]))
    return out


def _streams(tree, params, x):
    """``{("trunk", b) | ("branch", c, i): (mean, var)}`` of the batch ``x``, every stream on its
    own input: the trunk on x, branch c on the trunk's output at its branch point."""
    trunk = _stream_statistics(x, params["trunk"])
    out = {("trunk", b): s for b, s in enumerate(trunk)}
    h = [np.asarray(x, np.float64)]
    for layer in params["trunk"]:  # the trunk's features s_1..s_D
        pre = h[-1] @ np.asarray(layer["fc"]["kernel"]) + np.asarray(layer["fc"]["bias"])
        normed = (pre - pre.mean(0)) / np.sqrt(pre.var(0) + _EPS)
        h.append(
            np.tanh(normed * np.asarray(layer["bn"]["scale"]) + np.asarray(layer["bn"]["bias"]))
        )
    for c, (p, _) in enumerate(tree.branches):
        for i, s in enumerate(_stream_statistics(h[p], params["branches"][c])):
            out[("branch", c, i)] = s
    return out


def _stored(state, where):
    leaf = (
        state["trunk"][where[1]] if where[0] == "trunk" else state["branches"][where[1]][where[2]]
    )
    return np.asarray(leaf["batch_stats"]["bn"]["mean"]), np.asarray(
        leaf["batch_stats"]["bn"]["var"]
    )


def test_retrain_keeps_every_streams_own_running_statistics():
    """Tasks 0 and 1 branch at different points (their copies of block 1 see x-derived features of
    different layers; task 0's copy of block 0 sees x itself): after one step every stream's
    running statistics are the EMA of the batch statistics of its own input, nothing averaged."""
    arch = conal.Architecture((0, 1, 2), 2)
    tree, params, state = _bn_tree(arch)
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (16, 3)) + 2.0
    ys = {f"t{t}": jax.random.randint(jax.random.PRNGKey(10 + t), (16,), 0, 3) for t in range(3)}
    init, step = conal_study.make_retrain(tree, _tasks(3), "mean", {}, optax.sgd(0.0), 1, seed=0)
    new, _ = jax.jit(step)(init(params, state), {"image": x, **ys})
    expected = _streams(tree, params, x)
    assert len(expected) == 2 + 2 + 1  # trunk b0 b1, task 0's b0 b1, task 1's b1
    for where, (mean, var) in expected.items():
        got_mean, got_var = _stored(new.model_state, where)
        np.testing.assert_allclose(got_mean, (1 - _MOMENTUM) * mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_var, _MOMENTUM + (1 - _MOMENTUM) * var, rtol=1e-4)
    # the two copies of block 1 really see different inputs
    assert not np.allclose(expected[("branch", 0, 1)][0], expected[("branch", 1, 0)][0], atol=0.1)
    # the train-mode forward of the evaluation updates the same statistics
    _, applied = tree.apply(params, state, x, True)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        applied,
        new.model_state,
    )


def test_recomputed_statistics_are_each_streams_mean_batch_statistics():
    """Precise BN: per stream, the mean over the batches of the batch mean and of the (biased)
    batch variance of its own input, whatever the running statistics were and the momentum."""
    arch = conal.Architecture((0, 2, 1), 2)
    tree, params, state = _bn_tree(arch)
    state = jax.tree.map(lambda a: a + 5.0, state)  # stale statistics: must not matter
    batches = [
        {"image": (1.0 + i) * jax.random.normal(jax.random.PRNGKey(20 + i), (8, 3)) - i}
        for i in range(3)
    ]
    got = conal.recompute_tree_statistics(tree, params, state, [b["image"] for b in batches])
    per_batch = [_streams(tree, params, b["image"]) for b in batches]
    for where in per_batch[0]:
        mean = np.mean([s[where][0] for s in per_batch], axis=0)
        var = np.mean([s[where][1] for s in per_batch], axis=0)
        got_mean, got_var = _stored(got, where)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_var, var, rtol=1e-4, atol=1e-5)


def test_bn_modes_train_mode_normalises_with_the_test_batch():
    """``evaluate_bn_modes``: "stored" with the given statistics, "recomputed" with those of the
    training batches; on a model whose statistics are exactly one batch's, evaluated on that batch,
    the three agree."""
    arch = conal.Architecture((1, 0), 1)
    tree, params, state = _bn_tree(arch)
    x = jax.random.normal(jax.random.PRNGKey(3), (32, 3))
    ys = jax.random.randint(jax.random.PRNGKey(4), (32,), 0, 3)
    exact = conal.recompute_tree_statistics(tree, params, state, [x])
    test = [{"image": np.asarray(x[i]), "t0": int(ys[i]), "t1": int(ys[i])} for i in range(32)]
    modes = conal_study.evaluate_bn_modes(tree, _tasks(2), params, exact, test, 32, [x])
    assert modes["batches"] == 1
    for mode in ("train_mode", "recomputed"):
        for t in ("t0", "t1"):
            assert modes[mode][t]["accuracy"] == pytest.approx(modes["stored"][t]["accuracy"])
    stale = jax.tree.map(lambda a: a + 3.0, exact)
    modes = conal_study.evaluate_bn_modes(tree, _tasks(2), params, stale, test, 32, [x])
    logits = tree.predict(params, stale, x)
    for t in ("t0", "t1"):
        acc = 100.0 * float(np.mean(np.argmax(np.asarray(logits[t]), -1) == np.asarray(ys)))
        assert modes["stored"][t]["accuracy"] == pytest.approx(acc)


# ---------------------------------------------------------------------------------------------
# The mlp backbone as blocks.


def test_mlp_blocks_are_the_mlp_encoder_exactly():
    from experiments.models.mlp import MLPEncoder

    cfg = types.SimpleNamespace(hidden_sizes=(16, 8))
    builder, exact = conal_study.BLOCK_MODELS["mlp"]
    blocks = builder(cfg, (1, 32, 1))
    assert exact and [b.name for b in blocks] == ["fc0", "fc1"]
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 1, 32, 1))
    variables = MLPEncoder((16, 8)).init(jax.random.PRNGKey(1), x)
    h = x
    for b in blocks:
        own = b.init(jax.random.PRNGKey(2), h)["params"]
        assert jax.tree.map(np.shape, own) == jax.tree.map(np.shape, variables["params"][b.name])
        h = b.apply({"params": variables["params"][b.name]}, h)
    assert h.shape == (5, 8)
    # reference from the definition: flatten, (x W + b) -> ReLU per layer
    ref = np.asarray(x).reshape(5, -1)
    for name in ("fc0", "fc1"):
        w = variables["params"][name]
        ref = np.maximum(ref @ np.asarray(w["kernel"]) + np.asarray(w["bias"]), 0.0)
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The study end to end.


def _tiny_config():
    config = _config()
    config.seeds = (0,)
    config.single_task = False  # Δm against the all-shared model
    config.dataset.num_train = 400
    config.dataset.num_test = 100
    config.dataset.max_train_examples = 256
    config.dataset.max_test_examples = 64
    config.train.epochs = 1
    config.train.batch_size = 64
    config.conal.search_epochs = 2
    config.conal.alpha_every = 1
    config.conal.val_fraction = 0.25
    config.report.progress = False
    config.report.plots = True
    return config


def _record_kinds(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["kind"] for line in f if line.strip()]


@pytest.mark.slow
def test_conal_study_end_to_end_and_resume(tmp_path):
    config = _tiny_config()
    workdir = str(tmp_path / "conal")
    report = runner_lib.run_study(config, workdir)
    artifacts = Artifacts(workdir)
    phases = [
        "search__seed0",
        "discretise__seed0",
        "mean+conal__seed0",
        "mean__seed0",
        "mean+private__seed0",
    ]
    assert artifacts.is_done("discretise__seed0")  # a phase that computes: its done.json
    assert artifacts.has("search__seed0", "search")  # the search: its artifact
    records = JsonlLog(os.path.join(workdir, "metrics.jsonl")).records()
    finished = {(r["run"], r["seed"]) for r in records if r["kind"] == "summary"}
    assert finished == {("mean+conal", 0), ("mean", 0), ("mean+private", 0)}  # runs: summaries
    for phase in phases:  # completion is recorded once: no done.json beside a run's own record
        assert artifacts.is_done(phase) == (phase == "discretise__seed0"), phase

    found = artifacts.load_json("search__seed0", "search")
    steps_per_epoch = 192 // 64  # 256 examples, 64 held out for the architecture
    assert found["steps"] == 2 * steps_per_epoch
    assert found["trajectory"]["steps"] == list(range(1, 2 * steps_per_epoch + 1))
    assert np.shape(found["trajectory"]["alpha_softmax"]) == (6, 3, 6)  # [T, K, P]
    np.testing.assert_allclose(np.sum(found["alpha_softmax"], axis=1), 1.0, rtol=1e-5)

    arch_json = artifacts.load_json("discretise__seed0", "architecture")
    bps = tuple(arch_json["branch_points"])
    assert bps == conal.discretise(np.asarray(found["alpha"]))
    assert os.path.exists(
        os.path.join(artifacts.phase_dir("discretise__seed0"), "architecture.png")
    )
    sizes = arch_json["block_sizes"]
    assert arch_json["param_counts"]["all_private"] == 3 * sum(sizes)

    # the retrained model has the discretised architecture: trunk blocks 0..max(p)-1, and per
    # branching task its own copies of blocks p..4 with the shapes of the trunk's blocks
    final = artifacts.load_arrays("mean+conal__seed0", "final")
    params = final["params"]
    assert len(params["trunk"]) == max(bps)
    arch = conal.Architecture(bps, 5)
    assert len(params["branches"]) == len(arch.branches())
    private = artifacts.load_arrays("mean+private__seed0", "final")["params"]
    assert private["trunk"] == [] and len(private["branches"]) == 3
    for c, (p, _) in enumerate(arch.branches()):
        copies = params["branches"][c]
        assert len(copies) == 5 - p
        for i, b in enumerate(range(p, 5)):
            ref = jax.tree.map(np.shape, private["branches"][0][b])
            assert jax.tree.map(np.shape, copies[i]) == ref
    encoder_count = sum(np.size(x) for x in jax.tree.leaves([params["trunk"], params["branches"]]))
    assert encoder_count == arch_json["param_counts"]["learned"]

    with open(os.path.join(workdir, "conal_summary.json")) as f:
        summary = json.load(f)
    seed = summary["seeds"]["0"]
    assert seed["branch_points"] == dict(zip(("digit", "rotation", "thickness"), bps, strict=True))
    assert set(seed["alpha_softmax"]) == {"digit", "rotation", "thickness"}
    for t, w in seed["alpha_softmax"].items():  # E[p] under the final softmax
        assert seed["expected_branch_point"][t] == pytest.approx(np.dot(w, np.arange(6)))
        assert seed["argmax_margin"][t] == pytest.approx(np.sort(w)[-1] - np.sort(w)[-2])
    models = seed["models"]["mean"]
    assert set(models) == {"conal", "shared", "private"}
    assert models["conal"]["encoder_params"] == arch_json["param_counts"]["learned"]
    assert models["shared"]["encoder_params"] == arch_json["param_counts"]["all_shared"]
    assert models["private"]["encoder_params"] == arch_json["param_counts"]["all_private"]
    for row in models.values():
        assert set(row["test"]) == {"digit", "rotation", "thickness"}
        assert np.isfinite(row["delta_m"])
    assert models["shared"]["delta_m"] == 0.0  # the reference without single-task runs
    assert summary["delta_m_reference"] == "the all-shared model of the same seed"
    assert summary["stability"]["digit"]["of"] == 1
    assert "## CoNAL" in report and "| mean | learned |" in report
    assert os.path.exists(os.path.join(workdir, "plots", "conal_tree_seed0.png"))
    assert os.path.exists(os.path.join(workdir, "plots", "conal_alpha_seed0.png"))

    # resume: a second run does no work (no new training, search or start records)
    before = _record_kinds(workdir)
    runner_lib.run_study(config, workdir)
    assert _record_kinds(workdir) == before


@pytest.mark.slow
def test_retrain_of_the_all_shared_tree_is_the_standard_run(tmp_path):
    """The retrain step on the all-shared architecture (same blocks, same initialisation, same
    batches, aggregator then optimizer) reproduces the standard train step's losses."""
    config = _tiny_config()
    config.train.log_every_steps = 1
    config.train.epochs = 2
    config.report.plots = False
    from experiments.studies.base import train_phase
    from experiments.train import RunSpec

    ctx = _context(config, str(tmp_path))
    data, log = ctx.data, ctx.log
    train_phase(ctx, RunSpec(label="std", method="mean", seed=0)).run(ctx.artifacts)
    arch = conal.Architecture((5, 5, 5), 5)
    conal_study.retrain_run(ctx, "tree", "mean", 0, arch, "tree__seed0", ctx.artifacts, {})
    losses = {}
    for r in log.records():
        if r.get("kind") == "train":
            losses.setdefault(r["run"], []).append([r["loss"][t.name] for t in data.tasks])
    assert len(losses["tree"]) == len(losses["std"]) == 2 * 4  # 256 examples, batches of 64
    np.testing.assert_allclose(losses["tree"], losses["std"], rtol=2e-4)


@pytest.mark.slow
def test_precise_bn_retrain_evaluates_and_saves_recomputed_statistics(tmp_path):
    """``eval.recompute_bn_batches``: the reported metrics are those of the recomputed
    statistics (the "recomputed" column of the A/B/C evaluation, same batches), the saved
    statistics are the recomputation of the saved weights, and the summary records it."""
    config = _tiny_config()
    config.eval.recompute_bn_batches = 2
    config.conal.bn_modes_batches = 2
    ctx = _context(config, str(tmp_path))
    arch = conal.Architecture((2, 0, 5), 5)
    summary = conal_study.retrain_run(ctx, "tree", "mean", 0, arch, "t__seed0", ctx.artifacts, {})
    assert summary["info"]["bn_statistics"] == "recomputed"
    modes = ctx.artifacts.load_json("t__seed0", "bn_modes")
    assert set(modes) == {"stored", "train_mode", "recomputed", "batches"}
    for t in ctx.data.tasks:
        assert summary["test"][t.name]["accuracy"] == pytest.approx(
            modes["recomputed"][t.name]["accuracy"]
        )
    final = ctx.artifacts.load_arrays("t__seed0", "final")
    blocks, _ = conal_study._blocks_for(ctx)
    tree = conal_study.tree_model(blocks, arch, ctx.model, ctx.data.tasks)
    batches = conal_study.statistics_batches(ctx.data.train, 64, 0, 2)
    again = conal.recompute_tree_statistics(tree, final["params"], final["model_state"], batches)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        again,
        final["model_state"],
    )


# ---------------------------------------------------------------------------------------------
# Configs.


@pytest.mark.slow
def test_relatedness_config_runs_conal_pro_on_mlp_blocks(tmp_path):
    config = _config("relatedness")
    assert config.model.name == "mlp" and config.conal.pro
    assert len(config.dataset.groups) == 6
    validate(config)
    config.seeds = (0,)
    config.single_task = False
    config.conal.search_epochs = 1
    config.train.epochs = 1
    config.dataset.num_train = 500  # 400 for the weights, 100 (one batch) for the architecture
    config.dataset.num_test = 200
    config.report.progress = False
    config.report.plots = False
    runner_lib.run_study(config, str(tmp_path))
    with open(tmp_path / "conal_summary.json") as f:
        seed = json.load(f)["seeds"]["0"]
    assert seed["block_names"] == ["fc0", "fc1"] and len(seed["group_labels"]) == 6
    models = seed["models"]["mean"]
    assert set(models) == {"conal", "shared", "private"}
    assert models["private"]["encoder_params"] == 6 * models["shared"]["encoder_params"]
    assert "bn_modes" not in models["conal"]  # no BatchNorm in the mlp: nothing to compare


def test_unknown_conal_keys_and_bad_methods_are_rejected():
    config = _config()
    validate(config)
    with config.unlocked():
        config.conal.serach_epochs = 3
    with pytest.raises(ConfigError, match=r"serach_epochs.*valid keys.*search_epochs"):
        validate(config)
    config = _config()
    config.conal.methods = ("uw",)
    with pytest.raises(ConfigError, match="gradient aggregators"):
        validate(config)
    config = _config()
    config.conal.retrain_task_map = "loop"
    with pytest.raises(ConfigError, match=r"conal.retrain_task_map must be one of"):
        validate(config)
    config = _config()
    with config.unlocked():
        config.model = default_model_config("lenet")
    with pytest.raises(ConfigError, match="block sequence"):
        validate(config)


def test_gpu_configs_validate_and_stop_at_the_missing_data():
    with tempfile.TemporaryDirectory() as d:
        config = _config("celeb_a")
        assert config.conal.pro and config.dataset.name == "celeb_a"
        config.dataset.data_dir = d
        config.dataset.download = False
        validate(config)
        with pytest.raises(DataUnavailableError, match="celeb_a"):
            runner_lib.run_study(config, os.path.join(d, "wd1"))
        config = _config("nyuv2")
        config.dataset.root = os.path.join(d, "nyuv2")
        validate(config)
        with pytest.raises(FileNotFoundError, match=r"(?s)not found.*nyuv2\.zip"):
            runner_lib.run_study(config, os.path.join(d, "wd2"))


def test_segnet_blocks_chain_to_the_segnet_feature_shape():
    config = _config("nyuv2")
    modules = conal_study.BLOCK_MODELS["segnet"][0](config.model, (32, 32, 3))
    x = jnp.zeros((1, 32, 32, 3))
    for m in modules:
        variables = jax.eval_shape(lambda x, m=m: m.init(jax.random.PRNGKey(0), x, False), x)
        x = jax.eval_shape(lambda v, x, m=m: m.apply(v, x, False), variables, x)
    assert x.shape == (1, 32, 32, int(config.model.filters[0]))


def _context(config, workdir):
    from experiments import data as data_lib
    from experiments import models as models_lib
    from experiments.studies.base import StudyContext

    data = data_lib.make_dataset(config.dataset)
    model = models_lib.make_model(config.model, data.tasks, data.input_shape)
    log = JsonlLog(os.path.join(workdir, "metrics.jsonl"))
    return StudyContext(config, data, model, workdir, log, progress=False)


@pytest.mark.slow
def test_conal_pro_search_decides_every_task_into_groups(tmp_path):
    config = _tiny_config()
    config.conal.pro = True
    config.conal.pro_steps_per_stage = 1
    ctx = _context(config, str(tmp_path))
    for phase in (conal_study._search_phase(ctx, 0), conal_study._discretise_phase(ctx, 0)):
        ctx.artifacts.mark_done(phase.name, phase.run(ctx.artifacts))
    found = ctx.artifacts.load_json("search__seed0", "search")
    assert found["steps"] >= 1 and len(found["stages"]) >= 1
    decided = sorted(t for stage in found["stages"] for g in stage["decided"] for t in g)
    assert decided == [0, 1, 2]  # every task decided exactly once
    arch = conal_study.load_architecture(ctx.artifacts, 0)
    assert arch.grouped and arch.branch_points == tuple(found["branch_points"])
    for p, tasks in arch.branches():  # a group's tasks share their branch point
        assert {arch.branch_points[t] for t in tasks} == {p}
