"""Data-parallel and FSDP training in the experiment runner (experiments/parallel.py): on 4 virtual
CPU devices the real runner (``train_run``) gives the 1-device losses and parameters, within
float tolerance, for stateful and randomised aggregators, sparse training, a Recon-branched model
and FSDP; 2 processes x 2 devices through ``jax.distributed`` match one device too."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import config as config_lib
from experiments import parallel
from experiments import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The pure rules (one device, in process).


@pytest.mark.parametrize(
    "shape, devices, min_size, expected",
    [
        ((256, 64), 4, 1024, P("data", None)),  # the largest divisible dimension
        ((64, 256), 4, 1024, P(None, "data")),
        ((6, 64, 64), 4, 1, P(None, "data", None)),  # a tie: the first of the largest
        ((3, 3, 8, 16), 4, 1, P(None, None, None, "data")),
        ((255, 8), 4, 1, P(None, "data")),  # 255 is larger but not divisible
        ((64,), 4, 1024, P()),  # smaller than min_size: replicated
        ((3, 5, 7), 4, 1, P()),  # nothing divisible: replicated
        ((), 4, 0, P()),  # a scalar
        ((1024, 1024), 1, 1, P()),  # one device
    ],
)
def test_fsdp_spec_shards_the_largest_divisible_dimension(shape, devices, min_size, expected):
    assert parallel.fsdp_spec(shape, devices, min_size) == expected


def test_jacobian_rows_follow_their_parameter_on_the_trailing_dimensions():
    param, row = np.zeros((8, 12)), np.zeros((3, 8, 12))  # a parameter, its rows [K, ...]
    one = parallel.make_layout(1, fsdp=True, fsdp_min_size=1)
    assert parallel.jacobian_spec(row, param, one) == P(None, None, None)  # one device
    four = type("FourDevices", (), {"fsdp": True, "num_devices": 4, "fsdp_min_size": 1})()
    assert parallel.jacobian_spec(row, param, four) == P(None, None, "data")
    assert parallel.jacobian_spec(param, param, four) == P(None, "data")  # a per-task copy


def test_batch_not_divisible_by_the_devices_names_both_numbers_and_the_fix():
    with pytest.raises(ValueError) as e:
        parallel.check_batch_size(30, 4)
    message = str(e.value)
    assert "batch_size=30" in message and "4 devices" in message
    assert "multiple of 4" in message and "28 or 32" in message
    assert "config.parallel.devices" in message
    parallel.check_batch_size(32, 4)


def test_more_devices_than_visible_is_an_error():
    with pytest.raises(ValueError, match="device"):
        parallel.make_mesh(10_000)
    mesh = parallel.make_mesh(0)
    assert mesh.axis_names == ("data",) and mesh.devices.size >= 1


def test_parallel_section_defaults_and_unknown_keys():
    config = config_lib.base_config("multi_digits", "mlp")
    assert dict(config.parallel) == {
        "devices": 0,
        "fsdp": False,
        "fsdp_min_size": 2**14,
        "distributed": False,
    }
    config_lib.validate_base(config)
    config.parallel.shards = 2
    with pytest.raises(ValueError, match=r"config\.parallel.*valid keys"):
        config_lib.validate_base(config)
    del config.parallel["shards"]
    config.parallel.devices = -1
    with pytest.raises(ValueError, match="parallel.devices"):
        config_lib.validate_base(config)


def test_a_work_dir_resumes_on_another_layout():
    """``parallel`` does not change results (up to float rounding): a work dir made on one device
    is resumed on four, with FSDP, without a config-mismatch error."""
    config = config_lib.base_config("multi_digits", "mlp")
    other = ml_collections.ConfigDict(config.to_dict())
    other.parallel.fsdp = True
    other.parallel.devices = 4
    assert workdir_lib._comparable(config) == workdir_lib._comparable(other)
    other.train.lr = 0.5
    assert workdir_lib._comparable(config) != workdir_lib._comparable(other)


def test_distributed_init_reads_the_launch_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    parallel.initialize_distributed(
        {
            "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "1",
        }
    )
    parallel.initialize_distributed({})  # SLURM / Open MPI / TPU: JAX detects the cluster
    assert calls == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
        {"coordinator_address": None, "num_processes": None, "process_id": None},
    ]
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        parallel.initialize_distributed({"JAX_PROCESS_ID": "first"})


# ---------------------------------------------------------------------------------------------
# The runner on 4 virtual devices (one subprocess, several runs).

SCRIPT = textwrap.dedent(
    """
    import os, sys, tempfile
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from experiments import config as config_lib, data as data_lib, models as models_lib
    from experiments import parallel, studies, train as T
    from experiments.logs import JsonlLog
    from experiments.phases import Artifacts
    from mtl_jax import sparse as sparse_lib

    assert jax.device_count() == 4, jax.devices()

    def config(devices, fsdp=False, batch_size=32):
        c = config_lib.base_config("digit_transforms", "mlp")  # 3 tasks: PCGrad's order matters
        c.model.hidden_sizes = (64, 64)
        c.model.head_hidden = 32
        c.dataset.max_train_examples = 128
        c.dataset.max_test_examples = 40  # the last eval batch (8) is replicated, not sharded
        c.train.epochs = 1
        c.train.batch_size = batch_size
        c.train.eval_batch_size = 32
        c.train.log_every_steps = 1
        c.report.progress = False
        c.parallel.devices = devices
        c.parallel.fsdp = fsdp
        c.parallel.fsdp_min_size = 1024
        studies.validate(c)
        return c

    base = config(1)
    data = data_lib.make_dataset(base.dataset)
    model = models_lib.make_model(base.model, data.tasks, data.input_shape)
    root = tempfile.mkdtemp()

    def run(c, spec, name):
        workdir = os.path.join(root, name)
        log = JsonlLog(os.path.join(workdir, "metrics.jsonl"))
        summary = T.train_run(c, data, model, spec, workdir, log, progress=False)
        records = list(log.records())
        losses = np.array([list(r["loss"].values()) for r in records if r["kind"] == "train"])
        final = T.load_final_params(Artifacts(workdir), spec.run_id)
        return records, losses, final, summary

    def same(spec, layouts):
        _, l1, f1, s1 = run(config(1), spec, spec.label + "-1")
        assert len(l1) == 4
        for name, c in layouts:
            records, l4, f4, s4 = run(c, spec, spec.label + "-" + name)
            mesh = records[0]["mesh"]
            assert mesh["devices"] == 4 and mesh["shape"] == {"data": 4}, mesh
            assert mesh["axis_names"] == ["data"] and mesh["device_kind"], mesh
            assert mesh["fsdp"] == c.parallel.fsdp, mesh
            np.testing.assert_allclose(l4, l1, rtol=1e-5, atol=1e-6, err_msg=spec.label + name)
            leaves1, leaves4 = jax.tree.leaves(f1), jax.tree.leaves(f4)
            assert len(leaves1) == len(leaves4)
            for a, b in zip(leaves1, leaves4):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-5)
            assert s4["info"] == s1["info"]
            print("same", spec.label, name, float(np.abs(l4 - l1).max()))
        return l1, f1

    mask_fn = lambda p: sparse_lib.psn_mask(p, 16)
    gradvac = T.RunSpec(label="gradvac", method="gradvac")  # stateful: EMA targets
    l1, f1 = same(gradvac, [("4", config(0)), ("fsdp", config(0, True))])

    # checkpointed on one device, resumed on four with FSDP: orbax restores into the new layout
    c1, c4 = config(1), config(0, True)
    c1.train.checkpoint_every_steps = c4.train.checkpoint_every_steps = 2
    workdir = os.path.join(root, "resumed")
    log = JsonlLog(os.path.join(workdir, "metrics.jsonl"))
    T.train_run(c1, data, model, gradvac, workdir, log, progress=False, stop_after_steps=2)
    T.train_run(c4, data, model, gradvac, workdir, log, progress=False)
    records = list(log.records())
    assert [r["kind"] for r in records].count("start") == 1  # resumed, not restarted
    losses = np.array([list(r["loss"].values()) for r in records if r["kind"] == "train"])
    np.testing.assert_allclose(losses, l1, rtol=1e-5, atol=1e-6)
    resumed = T.load_final_params(Artifacts(workdir), gradvac.run_id)
    for a, b in zip(jax.tree.leaves(f1), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-5)

    # sparse training with PCGrad, whose task order comes from the key in its state (K = 3: the
    # order matters), and a Recon-branched model (per-task copies of fc1) under FSDP
    same(T.RunSpec(label="st", method="pcgrad", encoder_mask_fn=mask_fn), [("4", config(0))])
    same(
        T.RunSpec(label="recon", method="pcgrad", branch_fn=lambda: ["fc1"]),
        [("fsdp", config(0, True))],
    )

    # Where the state lives under FSDP: the encoder's large leaves and their Adam moments are
    # split, the aggregator's state (PRNG key, EMA targets), the mask and the tracker replicated.
    c = config(0, True)
    layout = parallel.layout_from_config(c.parallel)
    spec = T.RunSpec(label="st", method="gradvac", encoder_mask_fn=mask_fn)
    params, model_state = T.initial_params(model, data.tasks, data.input_shape, 0)
    problem = T.build_problem(
        c, data.tasks, data.tasks, model, spec, 4, mask=mask_fn(params["encoder"]), layout=layout
    )
    state = T.init_state(problem, params, model_state)
    sh = T.train_state_shardings(state, layout)
    assert sh.params["encoder"]["fc0"]["kernel"].spec == P("data", None)  # [256, 64]
    assert sh.params["encoder"]["fc0"]["bias"].spec == P()  # 64 < fsdp_min_size
    agg, mask_state, adam = sh.opt_state[0][0], sh.opt_state[0][1], sh.opt_state[0][2]
    assert all(s.spec == P() for s in jax.tree.leaves(agg)), agg
    assert all(s.spec == P() for s in jax.tree.leaves(mask_state)), mask_state
    assert all(s.spec == P() for s in jax.tree.leaves(sh.conflict))
    moments = [s.spec for s in jax.tree.leaves(adam)]
    assert moments.count(P("data", None)) == 4, moments  # mu and nu of the fc0, fc1 kernels
    placed = parallel.place(state, sh)
    assert placed.params["encoder"]["fc0"]["kernel"].addressable_shards[0].data.shape == (64, 64)

    # a batch that does not split over the devices: a clear error before anything is compiled
    try:
        T.train_run(config(0, batch_size=30), data, model, T.RunSpec(label="x"), root,
                    JsonlLog(os.path.join(root, "x.jsonl")), progress=False)
    except ValueError as e:
        assert "batch_size=30" in str(e) and "4 devices" in str(e), e
    else:
        raise AssertionError("no error for batch 30 on 4 devices")
    print("OK")
    """
)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


@pytest.mark.slow
def test_four_virtual_devices_give_the_one_device_run():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=_env(
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "mtl_jax_test_xla_cache"),
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert "OK" in result.stdout


# ---------------------------------------------------------------------------------------------
# Two processes through jax.distributed (the multi-host launch line, on one machine).

TINY = [
    "--config.dataset.max_train_examples=128",
    "--config.dataset.max_test_examples=40",
    "--config.seeds=(0,)",
    "--config.methods=('pcgrad',)",
    "--config.single_task=False",
    "--config.train.batch_size=32",
    "--config.train.epochs=1",
    "--config.train.log_every_steps=1",
    "--config.report.progress=False",
    "--config.report.plots=False",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_two_processes_with_fsdp_give_the_one_device_run(tmp_path):
    """The documented launch line on one machine: 2 processes x 2 CPU devices, FSDP; process 0
    alone writes the log and the report, orbax checkpoints every process's shards."""
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    args = [
        *TINY,
        "--config.parallel.distributed=True",
        "--config.parallel.fsdp=True",
        "--config.parallel.fsdp_min_size=1024",
    ]
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "experiments.run", *args, f"--workdir={multi}"],
            cwd=ROOT,
            env=_env(
                XLA_FLAGS="--xla_force_host_platform_device_count=2",
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err[-4000:]
    assert "| pcgrad |" in outs[0][0] and "| pcgrad |" not in outs[1][0]  # process 0 reports
    one = subprocess.run(
        [sys.executable, "-m", "experiments.run", *TINY, f"--workdir={single}"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-4000:]

    records = _records(multi)
    kinds = [r["kind"] for r in records]
    assert kinds.count("start") == kinds.count("summary") == kinds.count("study") == 1  # no copies
    mesh = next(r for r in records if r["kind"] == "start")["mesh"]
    assert mesh["devices"] == 4 and mesh["processes"] == 2 and mesh["fsdp"], mesh
    assert mesh["sharded_leaves"] > 0, mesh
    losses = [
        [list(r["loss"].values()) for r in _records(d) if r["kind"] == "train"]
        for d in (multi, single)
    ]
    assert len(losses[0]) == 4
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert os.path.isdir(os.path.join(multi, "phases", "pcgrad__seed0", "checkpoints", "4"))
