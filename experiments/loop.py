"""The training loop: batches -> a jitted step -> periodic actions, with orbax checkpoints.

The loop knows nothing about multi-task learning. It takes the step function and the state it
carries as arguments, so a study with its own step (CoNAL's alternating two-optimizer step that
also reads a held-out split) reuses the loop, its checkpointing and its exact resume::

    manager = checkpoint_manager(os.path.join(run_dir, "checkpoints"))
    restored = restore_checkpoint(manager, template)  # the latest checkpoint, or None
    state = fresh_buffers(template if restored is None else restored)
    result = run_loop(
        step_fn=jax.jit(step, donate_argnums=0),   # (state, batch) -> (state, outputs)
        state=state,
        batches=lambda epoch, start: my_batches(seed, epoch, start),
        steps_per_epoch=n,
        total_steps=epochs * n,
        manager=manager,
        hooks=LoopHooks(on_log=..., on_epoch_end=...),
    )

The runs of the suite call it through :func:`experiments.lifecycle.run_lifecycle` (restore,
stale records, start and summary records, the ``final`` artifact, completion), which passes the
step, the state template and the hooks through.

Contract:

* ``state`` is a pytree of arrays with an integer scalar ``state.step`` (the number of steps
  done); the step function increments it. Its structure, shapes and dtypes never change, so
  orbax restores it into the template (and into the template's shardings: a multi-device step
  jitted with ``in_shardings``/``out_shardings`` keeps its layout, ``experiments.parallel``).
* ``batches(epoch, start_batch)`` yields the batches of ``epoch`` from ``start_batch`` on, as a
  deterministic function of its arguments: a run resumed from a checkpoint at step ``s`` starts
  at ``divmod(s, steps_per_epoch)`` and ends bit-identical to an uninterrupted run (on CPU).
* Hooks: ``on_log(state, step, epoch, outputs)`` every ``log_every`` steps and at every epoch
  end; ``check(state, outputs)`` before every log record and checkpoint (raise to stop the run
  without checkpointing a bad state); ``on_epoch_end(state, epoch)`` after each epoch (evaluation,
  epoch records). Checkpoints: every ``checkpoint_every_steps`` steps (0: never inside an epoch)
  and every ``checkpoint_every_epochs`` epochs and at the end, atomically (orbax writes a
  temporary directory and renames it).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from experiments.interrupt import raise_if_interrupted

PyTree = Any
Batch = Any


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Synchronous orbax manager keeping the newest checkpoints (atomic: tmp dir + rename)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: PyTree) -> None:
    """Saves ``state`` at its step (no-op when that step is already saved)."""
    step = int(state.step)
    if manager.latest_step() == step:
        return
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, template: PyTree) -> PyTree | None:
    """The latest checkpoint restored into ``template``'s structure, or ``None``.

    The leaves come back with ``template``'s shardings (a template laid out on a mesh restores
    onto that mesh, whatever the layout the checkpoint was written from); with several processes
    every process reads its own shards."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def fresh_buffers(state: PyTree) -> PyTree:
    """A copy with its own buffers (and the same shardings): leaves of an initial state may alias
    each other (optimizer moments created from one zeros array), and a step that donates its
    input needs them apart."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class LoopHooks:
    """Periodic actions of :func:`run_loop` (all optional)."""

    on_log: Callable[[PyTree, int, int, dict], None] | None = None
    on_epoch_end: Callable[[PyTree, int], None] | None = None
    check: Callable[[PyTree, dict], None] | None = None


@dataclasses.dataclass
class LoopResult:
    """What :func:`run_loop` returns."""

    state: PyTree
    finished: bool  # False when stopped by ``stop_after_steps``
    step_seconds: list[float]  # seconds per step of each logging window (compile excluded)
    wall_seconds: float  # wall time of this call
    outputs: dict  # the last step's outputs


def run_loop(
    *,
    step_fn: Callable[[PyTree, Batch], tuple[PyTree, dict]],
    state: PyTree,
    batches: Callable[[int, int], Iterable[Batch]],
    steps_per_epoch: int,
    total_steps: int,
    manager: ocp.CheckpointManager | None = None,
    hooks: LoopHooks | None = None,
    log_every: int = 10,
    checkpoint_every_steps: int = 0,
    checkpoint_every_epochs: int = 1,
    progress: bool = False,
    desc: str = "",
    stop_after_steps: int | None = None,
) -> LoopResult:
    """Runs ``step_fn`` from ``state.step`` to ``total_steps`` (see the module docstring).

    ``stop_after_steps`` ends the loop early, as a kill would (for tests): the state reached is
    returned with ``finished=False`` and nothing is checkpointed beyond the periodic saves.
    """
    if steps_per_epoch < 1:
        raise ValueError(
            f"steps_per_epoch must be >= 1; got {steps_per_epoch} (is the training split smaller "
            "than one batch?)."
        )
    hooks = hooks or LoopHooks()
    log_every = max(1, int(log_every))
    ckpt_epochs = max(1, int(checkpoint_every_epochs))
    start_time = time.perf_counter()
    step = int(state.step)
    bar = tqdm.tqdm(
        total=total_steps,
        initial=step,
        disable=not progress,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
    )
    step_seconds: list[float] = []
    window: tuple[int, float] | None = None  # (step, time) at the start of a logging window
    done_here = 0
    outputs: dict = {}

    def check() -> None:
        if hooks.check is not None and outputs:
            hooks.check(state, outputs)

    try:
        while step < total_steps:
            epoch, start_batch = divmod(step, steps_per_epoch)
            for batch in batches(epoch, start_batch):
                raise_if_interrupted()  # a Ctrl-C that Python swallowed (experiments/interrupt.py)
                state, outputs = step_fn(state, batch)
                step += 1
                done_here += 1
                bar.update(1)
                if step % log_every == 0 or step % steps_per_epoch == 0:
                    jax.block_until_ready(outputs)
                    now = time.perf_counter()
                    if window is not None and step > window[0]:
                        step_seconds.append((now - window[1]) / (step - window[0]))
                    window = (step, now)
                    check()
                    if hooks.on_log is not None:
                        hooks.on_log(state, step, epoch, outputs)
                    losses = outputs.get("losses") if isinstance(outputs, dict) else None
                    if losses is not None:
                        bar.set_postfix(loss=" ".join(f"{v:.3f}" for v in np.ravel(losses)))
                if (
                    manager is not None
                    and checkpoint_every_steps
                    and step % checkpoint_every_steps == 0
                    and step % steps_per_epoch
                ):
                    check()
                    save_checkpoint(manager, state)
                if stop_after_steps is not None and done_here >= stop_after_steps:
                    return LoopResult(
                        state, False, step_seconds, time.perf_counter() - start_time, outputs
                    )
                if step >= total_steps:
                    break
            window = None  # evaluation and checkpointing are not step time
            check()
            if hooks.on_epoch_end is not None:
                hooks.on_epoch_end(state, epoch)
            if manager is not None and ((epoch + 1) % ckpt_epochs == 0 or step >= total_steps):
                save_checkpoint(manager, state)
    finally:
        bar.close()
    return LoopResult(state, True, step_seconds, time.perf_counter() - start_time, outputs)
