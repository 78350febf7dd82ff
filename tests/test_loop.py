"""The generic loop with a study's own step: a toy alternating two-optimizer step that also reads
a second data split (CoNAL's shape) reuses the loop, its checkpointing and its exact resume."""

from __future__ import annotations

import os
import signal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import interrupt
from experiments import loop as loop_lib
from experiments import train as train_lib
from experiments.loop import LoopHooks, run_loop
from tests import _matrices as M


class ToyState(NamedTuple):
    step: jax.Array
    weights: jax.Array  # [D]: trained on the "train" split
    arch: jax.Array  # [D]: trained on the "val" split
    opt_w: optax.OptState
    opt_a: optax.OptState


OPT_W, OPT_A = optax.sgd(0.1, momentum=0.9), optax.adam(0.05)


def toy_init(dim: int = 4) -> ToyState:
    w, a = jnp.zeros((dim,)), jnp.ones((dim,))
    return ToyState(jnp.zeros((), jnp.int32), w, a, OPT_W.init(w), OPT_A.init(a))


def toy_loss(w, a, x, y):
    return jnp.mean((x @ (w * a) - y) ** 2)


def toy_step(state: ToyState, batch) -> tuple[ToyState, dict]:
    """Architecture update on the held-out batch, then weight update on the training batch."""
    la, ga = jax.value_and_grad(toy_loss, argnums=1)(state.weights, state.arch, *batch["val"])
    ua, opt_a = OPT_A.update(ga, state.opt_a, state.arch)
    arch = optax.apply_updates(state.arch, ua)
    lw, gw = jax.value_and_grad(toy_loss)(state.weights, arch, *batch["train"])
    uw, opt_w = OPT_W.update(gw, state.opt_w, state.weights)
    weights = optax.apply_updates(state.weights, uw)
    out = {"losses": jnp.stack([lw, la])}
    return ToyState(state.step + 1, weights, arch, opt_w, opt_a), out


def toy_batches(epoch: int, start: int, steps_per_epoch: int = 5):
    """Deterministic batches of two splits; the target is linear in x."""
    true = jnp.array([1.0, -2.0, 0.5, 3.0])
    for i in range(start, steps_per_epoch):
        kt, kv = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(epoch), i))
        xt, xv = jax.random.normal(kt, (16, 4)), jax.random.normal(kv, (16, 4))
        yield {"train": (xt, xt @ true), "val": (xv, xv @ true)}


def _run(tmp_path, name, stop_after_steps=None, total=20):
    manager = loop_lib.checkpoint_manager(os.path.join(tmp_path, name, "checkpoints"))
    template = toy_init()
    restored = loop_lib.restore_checkpoint(manager, template)
    logged = []
    result = run_loop(
        step_fn=jax.jit(toy_step),
        state=loop_lib.fresh_buffers(template if restored is None else restored),
        batches=toy_batches,
        steps_per_epoch=5,
        total_steps=total,
        manager=manager,
        hooks=LoopHooks(on_log=lambda s, step, e, o: logged.append((step, float(o["losses"][0])))),
        log_every=2,
        checkpoint_every_steps=3,
        stop_after_steps=stop_after_steps,
    )
    return result, logged, manager


def test_own_step_trains_checkpoints_and_resumes_bit_identically(tmp_path):
    full, full_log, _ = _run(tmp_path, "full")
    assert full.finished and int(full.state.step) == 20
    # both optimizers moved their own parameters, and the training loss fell
    assert not np.allclose(full.state.arch, 1.0) and not np.allclose(full.state.weights, 0.0)
    assert full_log[-1][1] < 0.1 * full_log[0][1]

    cut, _, manager = _run(tmp_path, "cut", stop_after_steps=8)
    assert not cut.finished and int(cut.state.step) == 8
    assert manager.latest_step() == 6  # the periodic checkpoint before the "kill"
    resumed, resumed_log, _ = _run(tmp_path, "cut")
    assert resumed.finished
    for x, y in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(M.plain(x), M.plain(y))
    assert resumed_log == [r for r in full_log if r[0] > 6]


def test_a_bad_step_is_stopped_by_the_check_hook(tmp_path):
    def check(state, outputs):
        if int(state.step) >= 4:
            raise FloatingPointError("stop")

    with pytest.raises(FloatingPointError):
        run_loop(
            step_fn=jax.jit(toy_step),
            state=toy_init(),
            batches=toy_batches,
            steps_per_epoch=5,
            total_steps=10,
            hooks=LoopHooks(check=check),
            log_every=2,
        )


def _pcgrad_update(seed, jac):
    tx = train_lib.get_method("pcgrad", {}, num_tasks=3, seed=seed).transform
    state = tx.init({"w": jnp.zeros(jac["w"].shape[1:])})
    outs = []
    for _ in range(4):  # fresh task orders at every step, from the key in the state
        update, state = tx.update(jac, state)
        outs.append(np.asarray(update["w"]))
    return np.stack(outs)


def test_the_runs_seed_seeds_pcgrads_task_orders_with_three_tasks():
    # three mutually conflicting gradients: the projected sum depends on the projection order
    jac = {"w": jnp.array([[1.0, 0.0, 0.2], [-0.8, 0.9, 0.0], [-0.3, -1.0, 0.5]])}
    a0, a0_again, a1 = _pcgrad_update(0, jac), _pcgrad_update(0, jac), _pcgrad_update(1, jac)
    np.testing.assert_array_equal(a0, a0_again)  # a rerun of one seed is identical
    assert not np.allclose(a0, a1)  # another seed draws other orders
    # a seed given in the method string wins over the run's seed
    tx = train_lib.get_method("pcgrad", {"seed": 7}, num_tasks=3, seed=0).transform
    key = tx.init({"w": jnp.zeros(3)}).key
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(7)))


class _SwallowsCtrlC:
    """Ctrl-C delivered inside ``__del__``: Python prints "Exception ignored" and goes on (as it
    did inside JAX's gc callback in CI)."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)
        for _ in range(1000):  # the Python-level handler runs at a bytecode boundary in here
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_python_swallowed_stops_the_loop_at_the_next_step():
    seen = []

    def step(state, batch):
        seen.append(int(state.step))
        if len(seen) == 3:
            _SwallowsCtrlC()  # created and dropped: its __del__ runs now
            assert interrupt.interrupted()  # swallowed, but recorded
        return toy_step(state, batch)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist ignores SIGINT
    try:
        with interrupt.catching_ctrl_c(), pytest.raises(KeyboardInterrupt):
            run_loop(
                step_fn=step,
                state=toy_init(),
                batches=toy_batches,
                steps_per_epoch=5,
                total_steps=20,
            )
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [0, 1, 2]  # the 4th step never ran
    assert not interrupt.interrupted()  # cleared when the context ends
