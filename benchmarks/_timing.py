"""Shared timing and memory helpers of the benchmark scripts (not part of the library).

Every benchmark here measures a set of variants in ONE process and reports medians and ratios
against a baseline measured in the same run, because the machines they run on are shared (a
load of 5-10 on 2 cores is usual): absolute numbers drift, ratios of interleaved medians much
less. The pieces:

* :func:`interleaved_ms`: rounds in which every variant runs ``inner`` calls, in a fresh random
  order each round (no variant always follows the same other one); ms per call per round.
* :func:`stateful`: a runner that threads its own state through a step ``state -> state``.
* :func:`median_ms`: the medians of :func:`interleaved_ms`'s lists.
* :func:`compiled_memory`: XLA's memory analysis of a compiled program (argument, output, temp
  and alias bytes) -- what one call needs at its peak, without running it.
* :func:`machine_line`: one header line naming jax, the backend, the device and the load.

The scripts are run as ``python benchmarks/<name>.py`` (the script's folder is on ``sys.path``),
so they import this module as ``from _timing import ...``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

Runner = Callable[[], Any]

__all__ = [
    "CompiledMemory",
    "compiled_memory",
    "interleaved_ms",
    "load_average",
    "machine_line",
    "median_ms",
    "stateful",
]


def stateful(
    step: Callable[[Any], Any], state: Any, out: Callable[[Any], Any] | None = None
) -> Runner:
    """A runner calling ``state = step(state)`` and returning what to block on.

    ``out(state)`` picks the arrays to wait for (default: the whole state).
    """
    box = [state]

    def run() -> Any:
        box[0] = step(box[0])
        return box[0] if out is None else out(box[0])

    return run


def interleaved_ms(
    runners: Mapping[str, Runner],
    rounds: int,
    inner: int = 1,
    *,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Milliseconds per call of every runner, one value per round.

    Args:
      runners: ``name -> fn()``; ``fn`` runs one call (e.g. one jitted step) and returns arrays
        to block on (``jax.block_until_ready``).
      rounds: interleaved rounds; in each, the runners run in a fresh random order.
      inner: calls per runner per round (the round's time is divided by it).
      warmup: calls per runner before timing (compilation, first-call allocation).
      seed: seed of the shuffling.

    Returns:
      ``{name: [ms per call in round r for r in range(rounds)]}``, in the order of ``runners``.
    """
    for fn in runners.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn = runners[name]
            start = time.perf_counter()
            out = None
            for _ in range(inner):
                out = fn()
            jax.block_until_ready(out)
            times[name].append(1e3 * (time.perf_counter() - start) / inner)
    return times


def median_ms(times: Mapping[str, list[float]]) -> dict[str, float]:
    """``{name: median}`` of :func:`interleaved_ms`'s per-round times."""
    return {name: statistics.median(v) for name, v in times.items()}


class CompiledMemory(NamedTuple):
    """Bytes of one compiled program (XLA's ``memory_analysis``).

    ``peak`` = argument + output + temp - alias: the device memory one call holds at its peak
    (temp is XLA's buffer assignment of the intermediates; aliased outputs reuse donated
    arguments). ``-1`` everywhere when the backend gives no analysis.
    """

    argument: int
    output: int
    temp: int
    alias: int

    @property
    def peak(self) -> int:
        if self.temp < 0:
            return -1
        return self.argument + self.output + self.temp - self.alias


def compiled_memory(compiled: Any) -> CompiledMemory:
    """:class:`CompiledMemory` of ``jax.jit(f).lower(*args).compile()``."""
    mem = compiled.memory_analysis()
    if mem is None:
        return CompiledMemory(-1, -1, -1, -1)
    return CompiledMemory(
        int(mem.argument_size_in_bytes),
        int(mem.output_size_in_bytes),
        int(mem.temp_size_in_bytes),
        int(getattr(mem, "alias_size_in_bytes", 0)),
    )


def load_average() -> str:
    """The 1-minute load average and the CPU count, e.g. ``'load 5.2 on 2 CPUs'``."""
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "?"
    return f"load {load} on {os.cpu_count()} CPUs"


def machine_line(name: str) -> str:
    """``# <name>: jax X, backend, device kind, CPU, load`` (print it above every table)."""
    dev = jax.devices()[0]
    return (
        f"# {name}: jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{len(jax.devices())}x {dev.device_kind}, {platform.processor() or platform.machine()}, "
        f"{load_average()}"
    )
