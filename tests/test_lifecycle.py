"""The one run lifecycle (experiments.lifecycle) on a toy run: completion is the summary record
alone, stale records are dropped on resume, a resumed run logs what an uninterrupted one logs,
the final artifact comes before the summary, and phases ask a run's own completion record."""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lifecycle
from experiments.logs import JsonlLog
from experiments.phases import Artifacts, Phase, run_phases

STEPS_PER_EPOCH, EPOCHS = 3, 4
TOTAL = STEPS_PER_EPOCH * EPOCHS
LR = 0.1


class ToyState(NamedTuple):
    step: jax.Array  # int32[]
    params: dict  # {"w": f32[2]}
    model_state: dict  # {"seen": f32[]}: batches seen, a stand-in for running statistics


def toy_template() -> ToyState:
    return ToyState(jnp.int32(0), {"w": jnp.zeros(2)}, {"seen": jnp.float32(0.0)})


def toy_batch(epoch: int, index: int) -> jax.Array:
    """f32[2]: a deterministic function of (epoch, index in the epoch)."""
    return jnp.array([1.0 + epoch, 0.5 * index - 1.0])


def toy_step(state: ToyState, x: jax.Array) -> tuple[ToyState, dict]:
    """Gradient descent on 0.5 |w - x|^2."""
    loss = 0.5 * jnp.sum((state.params["w"] - x) ** 2)
    w = state.params["w"] - LR * (state.params["w"] - x)
    seen = state.model_state["seen"] + 1.0
    return ToyState(state.step + 1, {"w": w}, {"seen": seen}), {"losses": loss[None]}


def reference_w(steps: int) -> np.ndarray:
    """The toy run's parameters after ``steps`` steps, written out from the definition."""
    w = np.zeros(2)
    for s in range(steps):
        x = np.array([1.0 + s // STEPS_PER_EPOCH, 0.5 * (s % STEPS_PER_EPOCH) - 1.0])
        w = w - LR * (w - x)
    return w


def toy_parts(log: JsonlLog, key: lifecycle.RunKey, built: list, **overrides) -> lifecycle.RunParts:
    built.append(key)

    def batches(epoch: int, start: int):
        for i in range(start, STEPS_PER_EPOCH):
            yield toy_batch(epoch, i)

    def on_log(state, step: int, epoch: int, out: dict) -> None:
        log.write(key.record("train", step, epoch=epoch, loss=float(out["losses"][0])))

    def on_finish(finish: lifecycle.Finish) -> dict:
        return lifecycle.summary_record(finish, w=np.asarray(finish.state.params["w"]).tolist())

    parts = dict(
        step_fn=jax.jit(toy_step),
        template=toy_template(),
        batches=batches,
        steps_per_epoch=STEPS_PER_EPOCH,
        total_steps=TOTAL,
        on_finish=on_finish,
        loop=lifecycle.LoopSettings(log_every=1, checkpoint_every_steps=2),
        start_fields=lambda state: {"w0": np.asarray(state.params["w"]).tolist()},
        on_log=on_log,
        evaluate=lambda state: {"w0": float(state.params["w"][0])},
        eval_every_epochs=3,
    )
    return lifecycle.RunParts(**{**parts, **overrides})


def run(workdir: str, built: list | None = None, stop_after_steps=None, **overrides) -> dict:
    log = JsonlLog(os.path.join(workdir, "metrics.jsonl"))
    key = lifecycle.RunKey("toy", 0, "toy__seed0")
    built = [] if built is None else built
    return lifecycle.run_lifecycle(
        key,
        log,
        Artifacts(workdir),
        lambda: toy_parts(log, key, built, **overrides),
        stop_after_steps=stop_after_steps,
    )


def records(workdir: str, strip_timing: bool = True) -> list[dict]:
    out = []
    for r in JsonlLog(os.path.join(workdir, "metrics.jsonl")).records():
        if strip_timing:
            r = {k: v for k, v in r.items() if k not in ("wall_seconds", "seconds_per_step")}
        out.append(r)
    return out


def test_a_run_trains_evaluates_saves_final_then_writes_its_summary(tmp_path):
    workdir = str(tmp_path)
    summary = run(workdir)
    np.testing.assert_allclose(summary["w"], reference_w(TOTAL), rtol=1e-6)
    kinds = [r["kind"] for r in records(workdir)]
    assert kinds[0] == "start" and kinds[-1] == "summary" and kinds.count("summary") == 1
    # eval every 3 epochs and at the last step: epochs 3 and 4
    evals = [r for r in records(workdir) if r["kind"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evals] == [(3, 9), (4, 12)]
    assert summary["test"] == evals[-1]["metrics"] and summary["step"] == TOTAL
    final = Artifacts(workdir).load_arrays("toy__seed0", lifecycle.FINAL)
    np.testing.assert_allclose(final["params"]["w"], reference_w(TOTAL), rtol=1e-6)
    assert float(final["model_state"]["seen"]) == TOTAL
    assert summary["seconds_per_step"] > 0 and summary["wall_seconds"] > 0


def test_a_finished_run_is_its_summary_record_and_is_not_built_again(tmp_path):
    workdir = str(tmp_path)
    first = run(workdir)
    built: list = []
    again = run(workdir, built)
    assert again == first and built == []  # returned before anything is built
    assert [r["kind"] for r in records(workdir)].count("summary") == 1
    assert not os.path.exists(os.path.join(Artifacts(workdir).phase_dir("toy__seed0"), "done.json"))


def test_a_killed_run_resumes_to_the_uninterrupted_runs_records_and_parameters(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run(full)
    # 5 steps: the last checkpoint is at step 4 (every 2 steps); the record of step 5 is stale
    out = run(cut, stop_after_steps=5)
    assert out == {"kind": "interrupted", "run": "toy", "seed": 0, "step": 5}
    assert "interrupted" not in [r["kind"] for r in records(cut)]  # returned, not written
    assert max(r["step"] for r in records(cut)) == 5
    summary = run(cut)
    assert records(cut) == records(full)  # one start record; the stale step-5 records dropped
    np.testing.assert_allclose(summary["w"], reference_w(TOTAL), rtol=1e-6)


def test_a_summary_line_cut_short_is_no_completion_and_is_dropped(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run(full)
    run(cut)
    path = os.path.join(cut, "metrics.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    assert json.loads(lines[-1])["kind"] == "summary"
    with open(path, "w") as f:  # a kill while the summary was written
        f.write("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    built: list = []
    run(cut, built)
    assert built, "a summary line that does not parse must not count as completion"
    assert records(cut) == records(full)


def test_a_summary_without_its_final_artifact_is_a_clear_error(tmp_path):
    workdir = str(tmp_path)
    run(workdir)
    final = Artifacts(workdir).array_path("toy__seed0", lifecycle.FINAL)
    os.rename(final, final + ".moved")
    with pytest.raises(lifecycle.IncompleteWorkdirError, match=r"'toy'.*missing.*--fresh"):
        run(workdir)


class FixedTimer:
    def medians(self) -> dict[str, float]:
        return {"seconds_per_step": 0.25, "probe_seconds": 1.5}


def test_a_step_timer_replaces_the_loops_seconds_per_step(tmp_path):
    summary = run(str(tmp_path), timer=FixedTimer())
    assert summary["seconds_per_step"] == 0.25 and summary["probe_seconds"] == 1.5


def test_on_restore_gets_the_step_the_loop_starts_from(tmp_path):
    workdir = str(tmp_path)
    starts: list[int] = []
    run(workdir, stop_after_steps=5, on_restore=starts.append)
    run(workdir, on_restore=starts.append)
    assert starts == [0, 4]


def test_finalize_runs_before_the_final_artifact_and_the_summary(tmp_path):
    workdir = str(tmp_path)

    def finalize(state: ToyState) -> ToyState:
        return state._replace(model_state={"seen": jnp.float32(-1.0)})

    run(workdir, finalize=finalize)
    final = Artifacts(workdir).load_arrays("toy__seed0", lifecycle.FINAL)
    assert float(final["model_state"]["seen"]) == -1.0


def test_an_artifact_completion_keeps_no_final_and_writes_no_summary_record(tmp_path):
    workdir = str(tmp_path)
    log = JsonlLog(os.path.join(workdir, "metrics.jsonl"))
    artifacts = Artifacts(workdir)
    key = lifecycle.RunKey("search", 0, "search__seed0")
    completion = lifecycle.ArtifactRecord(artifacts, key.phase, "search")
    built: list = []

    def go():
        return lifecycle.run_lifecycle(
            key,
            log,
            artifacts,
            lambda: toy_parts(
                log,
                key,
                built,
                final_arrays=None,
                start_fields=None,
                on_finish=lambda f: {"steps": int(f.state.step)},
            ),
            completion=completion,
        )

    assert go() == {"steps": TOTAL} and go() == {"steps": TOTAL} and len(built) == 1
    assert not artifacts.has(key.phase, lifecycle.FINAL)
    assert {r["kind"] for r in log.records()} == {"train", "eval"}


def test_run_phases_asks_a_phases_own_completion_and_writes_done_json_for_the_others(tmp_path):
    artifacts = Artifacts(str(tmp_path))
    calls: list[str] = []
    state = {"finished": None}

    def train(a):
        calls.append("train")
        state["finished"] = {"run": "x"}
        return state["finished"]

    def compute(a):
        calls.append("compute")
        return None  # a phase whose result is None is still finished by its done.json

    phases = [
        Phase("train", train, finished=lambda a: state["finished"]),
        Phase("compute", compute, needs=("train",)),
    ]
    assert run_phases(phases, artifacts) == {"train": {"run": "x"}, "compute": None}
    assert run_phases(phases, artifacts) == {"train": {"run": "x"}, "compute": None}
    assert calls == ["train", "compute"]
    assert not artifacts.is_done("train") and artifacts.is_done("compute")
