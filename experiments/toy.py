"""Every aggregator on the two-objective toy, and the trajectory figure the papers show.

    python -m experiments.toy --out DIR [--setup cagrad|nash_mtl|all] [--steps N] [--methods a,b]

The problem is :mod:`mtl_jax.testing.toy` (CAGrad's closed-form ``L1, L2`` over ``x in R^2``).
Two setups, as in the papers:

* ``cagrad``: CAGrad (NeurIPS 2021), Fig. 1 / official ``toy.py``: ``L1`` unscaled, the three
  starts :data:`~mtl_jax.testing.toy.CAGRAD_STARTS`, 100k Adam steps;
* ``nash_mtl``: Nash-MTL (ICML 2022), Fig. 1, and FAMO (NeurIPS 2023), Fig. 2: ``L1`` scaled by
  0.1, the five starts :data:`~mtl_jax.testing.toy.NASH_MTL_STARTS`, 35k Adam steps (Nash-MTL;
  FAMO ran 50k).

Each method (every aggregator of the catalogue but those in :data:`NOT_APPLICABLE`, plus the
loss-only FAMO, both from ``mtl.get_method``) runs from every start of the setup with
``optax.chain(aggregator, optax.adam(1e-3))``, the papers' optimizer: one jitted ``lax.scan``
per method, ``vmap``-ed over the starts. Hyper-parameters are the methods' defaults except those
the toy scripts set (:func:`method_kwargs`): CAGrad ``c = 0.5`` (CAGrad's ``toy.py``), FAMO
``gamma = 0`` and the lower bounds ``(-21 scale, -21)`` of its log-losses (FAMO's toy; the
losses are negative). Written to ``DIR``:

* ``toy_<setup>_losses.png``: per method, the trajectories in loss space onto the Pareto front
  (Nash-MTL's / FAMO's figure); ``toy_<setup>_params.png``: in parameter space over the contours
  of the mean loss, with the Pareto set (CAGrad's figure);
* ``toy_<setup>.json`` and ``toy_<setup>.md``: per method and start the final losses, the
  distance to the front, the stationarity ``min_w |w g1 + (1 - w) g2|``, and the recorded step
  from which the trajectory stays on the front (none if it ends off it).

"On the front" (:data:`FRONT_TOLERANCE`): the final losses lie within 1% of the front's extent
of it, the distance measured after dividing each loss by the front's range of that loss.

Departures from the papers' scripts: the methods are this library's implementations (e.g.
CAGrad's weights from its Gram-space solver, not the toy's ``minimize_scalar`` with ``1e-4``
guards, and without its ``1 / (1 + c)`` rescaling, a constant Adam ignores up to its epsilon);
float32 throughout; the trajectory is recorded every ``--record-every`` steps (100), so "steps to
the front" has that resolution, and ``--steps`` is rounded down to a multiple of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import mtl_jax as mtl
from experiments.config import parse_method
from mtl_jax.testing import toy

#: The papers' optimizer: Adam, learning rate 1e-3.
LEARNING_RATE = 1e-3
#: Normalised loss-space distance below which a final point counts as on the Pareto front.
FRONT_TOLERANCE = 0.01
#: Aggregators of the catalogue not run here, with the reason.
NOT_APPLICABLE: dict[str, str] = {
    "linear": "constant weights, which it needs as an argument; equal weights are `mean`",
    "sum": "2 x `mean`: Adam's update does not change with a constant scale of the gradient",
    "sdmgrad": "cross-batch: its weights need the rows on two independent mini-batches, and the "
    "toy's losses have no batch",
    "modo": "cross-batch: its weights need the rows on two independent mini-batches, and the "
    "toy's losses have no batch",
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One paper's version of the toy."""

    name: str
    scale: float  # multiplies L1
    starts: tuple[tuple[float, float], ...]
    steps: int
    source: str


SETUPS: dict[str, Setup] = {
    "cagrad": Setup("cagrad", 1.0, toy.CAGRAD_STARTS, 100_000, "CAGrad (NeurIPS 2021), Fig. 1"),
    "nash_mtl": Setup(
        "nash_mtl",
        0.1,
        toy.NASH_MTL_STARTS,
        35_000,
        "Nash-MTL (ICML 2022), Fig. 1; FAMO (NeurIPS 2023), Fig. 2",
    ),
}


def method_names() -> list[str]:
    """Every applicable aggregator (catalogue order), then the loss-only FAMO."""
    jacobian = [n for n, e in mtl.METHODS.items() if e.cost == "jacobian"]
    return [name for name in jacobian if name not in NOT_APPLICABLE] + ["famo"]


def method_kwargs(name: str, scale: float) -> dict[str, Any]:
    """The hyper-parameters the papers' toy scripts set (the defaults otherwise)."""
    if name == "cagrad":
        return {"c": 0.5}
    if name == "famo":
        return {"gamma": 0.0, "min_losses": (-21.0 * scale, -21.0)}
    return {}


class Trajectory(NamedTuple):
    """Recorded every ``record_every`` steps, the start included.

    Attributes:
      steps: ``int[T]``, the step of each record (0 first).
      x: ``f32[S, T, 2]``, the parameters per start.
      losses: ``f32[S, T, 2]``.
    """

    steps: np.ndarray
    x: np.ndarray
    losses: np.ndarray


def make_update(method: str, scale: float, seed: int = 0):
    """``(init(x) -> state, update(x, state) -> (x, state))``: one step of ``method`` chained
    into Adam on the toy, FAMO's post-step (the losses after the step) included."""
    name, extra = parse_method(method)
    kwargs = {**method_kwargs(name, scale), **extra}
    method = mtl.get_method(name, num_tasks=2, seed=seed, **kwargs)
    tx = optax.chain(method.transform, optax.adam(LEARNING_RATE))
    loss_fn = functools.partial(toy.losses, scale=scale)
    value_and_grads = mtl.value_and_grads(loss_fn)  # losses [2], rows [2 tasks, 2]

    def update(x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        losses, jac = value_and_grads(x)
        updates, state = tx.update(jac, state, x, task_losses=losses)
        x = optax.apply_updates(x, updates)
        if method.post_step is not None:
            state = method.post_step(state, loss_fn(x))
        return x, state

    return tx.init, update


@functools.partial(jax.jit, static_argnames=("method", "scale", "steps", "record_every", "seed"))
def _trajectories(
    starts: jax.Array, *, method: str, scale: float, steps: int, record_every: int, seed: int
) -> jax.Array:
    init, update = make_update(method, scale, seed)

    def chunk(carry, _):
        carry = jax.lax.fori_loop(0, record_every, lambda _, c: update(*c), carry)
        return carry, carry[0]

    def one(x0: jax.Array) -> jax.Array:  # [T, 2]
        _, xs = jax.lax.scan(chunk, (x0, init(x0)), None, length=steps // record_every)
        return jnp.concatenate([x0[None], xs])

    return jax.vmap(one)(starts)


def run_method(
    method: str, setup: Setup, steps: int | None = None, record_every: int = 100, seed: int = 0
) -> Trajectory:
    """``method`` from every start of ``setup`` (``steps`` rounded down to ``record_every``)."""
    steps = setup.steps if steps is None else steps
    record_every = max(1, min(record_every, steps))
    starts = jnp.asarray(setup.starts, jnp.float32)
    x = _trajectories(
        starts,
        method=method,
        scale=setup.scale,
        steps=steps,
        record_every=record_every,
        seed=seed,
    )
    losses = toy.losses(x, setup.scale)  # [S, T, 2]
    recorded = np.arange(x.shape[1]) * record_every
    return Trajectory(recorded, np.asarray(x), np.asarray(losses))


def front_distance(losses: np.ndarray, scale: float) -> np.ndarray:
    """Distance of ``losses[..., 2]`` to the Pareto front, each loss divided by its range on
    the front (so 0.01 is 1% of the front's extent)."""
    front = toy.pareto_front(401, scale)
    extent = jnp.max(front, 0) - jnp.min(front, 0)
    return np.asarray(toy.distance_to_curve(jnp.asarray(losses) / extent, front / extent))


def steps_to_front(distances: np.ndarray, steps: np.ndarray) -> int | None:
    """The first recorded step from which the trajectory stays on the front (``distances``
    ``f[T]`` at ``steps`` ``int[T]``); ``None`` if its last record is off the front."""
    off = np.flatnonzero(distances > FRONT_TOLERANCE)
    if off.size and off[-1] == distances.size - 1:
        return None
    return int(steps[off[-1] + 1]) if off.size else int(steps[0])


def summarize(method: str, trajectory: Trajectory, setup: Setup) -> list[dict]:
    """Per start: the final point and losses, the distance to the front, the stationarity and
    the step from which the trajectory stays on the front (``None``: not at the end)."""
    distances = front_distance(trajectory.losses, setup.scale)  # [S, T]
    stationarity = jax.vmap(functools.partial(toy.stationarity, scale=setup.scale))
    finals = stationarity(jnp.asarray(trajectory.x[:, -1]))  # [S]
    rows = []
    for s, start in enumerate(setup.starts):
        rows.append(
            {
                "method": method,
                "start": list(start),
                "steps": int(trajectory.steps[-1]),
                "final_x": trajectory.x[s, -1].tolist(),
                "final_losses": trajectory.losses[s, -1].tolist(),
                "front_distance": float(distances[s, -1]),
                "stationarity": float(finals[s]),
                "on_front": bool(distances[s, -1] <= FRONT_TOLERANCE),
                "steps_to_front": steps_to_front(distances[s], trajectory.steps),
            }
        )
    return rows


def _start_label(start: Sequence[float]) -> str:
    return f"({start[0]:g}, {start[1]:g})"


def markdown_table(rows: Sequence[dict]) -> str:
    """One line per method and start: final losses, distance to the front, stationarity."""
    lines = [
        "| method | start | final L1, L2 | distance to front | steps to front | stationarity |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        reached = "–" if r["steps_to_front"] is None else f"{r['steps_to_front']:,}"
        lines.append(
            f"| {r['method']} | {_start_label(r['start'])} | "
            f"{r['final_losses'][0]:.3f}, {r['final_losses'][1]:.3f} | "
            f"{r['front_distance']:.4f} | {reached} | {r['stationarity']:.2e} |"
        )
    return "\n".join(lines)


def pivot_table(rows: Sequence[dict]) -> str:
    """Methods x starts: the step from which each run stays on the front, or ``no (distance)``."""
    starts = list(dict.fromkeys(_start_label(r["start"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {
        (r["method"], _start_label(r["start"])): (
            f"{r['steps_to_front']:,}"
            if r["steps_to_front"] is not None
            else f"**no** ({r['front_distance']:.2f})"
        )
        for r in rows
    }
    lines = ["| method | " + " | ".join(starts) + " |", "|---" * (len(starts) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell[m, s] for s in starts) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures


def _grid(n: int) -> tuple[plt.Figure, np.ndarray]:
    cols = min(n, 5)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _save_png(fig: plt.Figure, path: str, dpi: int = 90, colours: int = 128) -> None:
    """Saves ``fig`` as a PNG with a palette of ``colours`` (a third of the RGBA size: the
    figures go into docs/_static) and closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=colours).save(path, optimize=True)


def _time_colours(n: int) -> np.ndarray:
    return matplotlib.colormaps["magma_r"](np.linspace(0.1, 0.7, n))


def plot_loss_space(results: dict[str, Trajectory], setup: Setup, path: str) -> None:
    """One panel per method: the loss trajectories (dark: late) onto the front (grey)."""
    front = np.asarray(toy.pareto_front(401, setup.scale))
    fig, axes = _grid(len(results))
    for ax, (method, traj) in zip(axes, results.items(), strict=False):
        ax.plot(front[:, 0], front[:, 1], "-", lw=6, color="#9a9aa2", zorder=1)
        colours = _time_colours(traj.losses.shape[1])
        for s in range(traj.losses.shape[0]):
            ax.scatter(traj.losses[s, :, 0], traj.losses[s, :, 1], c=colours, s=2, zorder=2)
            ax.scatter(*traj.losses[s, 0], color="k", s=25, zorder=3)
        ax.set_title(method, fontsize=10)
        ax.tick_params(labelsize=7)
    fig.supxlabel("L1" + (f" (scaled by {setup.scale:g})" if setup.scale != 1 else ""))
    fig.supylabel("L2")
    fig.suptitle(
        f"Toy in loss space, {setup.source}\nAdam 1e-3, {traj.steps[-1]:,} steps; "
        "black: starts, grey: Pareto front, dark: late"
    )
    fig.tight_layout()
    _save_png(fig, path)


def plot_param_space(results: dict[str, Trajectory], setup: Setup, path: str) -> None:
    """One panel per method: the trajectories in ``x`` over the contours of the mean loss, the
    Pareto set in grey."""
    n = 150
    grid = np.linspace(-10, 10, n)
    xx, yy = np.meshgrid(grid, grid)
    points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    mean_loss = np.asarray(
        jnp.mean(jax.vmap(functools.partial(toy.losses, scale=setup.scale))(points), -1)
    ).reshape(n, n)
    pareto = np.asarray(toy.pareto_set(201))
    fig, axes = _grid(len(results))
    for ax, (method, traj) in zip(axes, results.items(), strict=False):
        ax.contour(xx, yy, mean_loss, levels=15, cmap="viridis", linewidths=0.7, zorder=0)
        ax.plot(pareto[:, 0], pareto[:, 1], "-", lw=5, color="#9a9aa2", zorder=1)
        colours = _time_colours(traj.x.shape[1])
        for s in range(traj.x.shape[0]):
            ax.scatter(traj.x[s, :, 0], traj.x[s, :, 1], c=colours, s=2, zorder=2)
            ax.scatter(*traj.x[s, 0], color="k", s=25, zorder=3)
        ax.set_title(method, fontsize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    fig.supxlabel("x1")
    fig.supylabel("x2")
    fig.suptitle(
        f"Toy in parameter space, {setup.source}\nAdam 1e-3, {traj.steps[-1]:,} steps; "
        "contours: mean loss, grey: Pareto set"
    )
    fig.tight_layout()
    _save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# Command line


def run_setup(
    setup: Setup, out: str, methods: Sequence[str], steps: int | None, record_every: int
) -> list[dict]:
    """Runs ``methods`` on ``setup``, writes the figures, JSON and table; returns the rows."""
    results, rows, seconds = {}, [], {}
    for method in methods:
        start = time.perf_counter()
        results[method] = run_method(method, setup, steps, record_every)
        seconds[method] = time.perf_counter() - start
        rows += summarize(method, results[method], setup)
        print(f"{setup.name}: {method} ({seconds[method]:.1f} s)", file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    plot_loss_space(results, setup, os.path.join(out, f"toy_{setup.name}_losses.png"))
    plot_param_space(results, setup, os.path.join(out, f"toy_{setup.name}_params.png"))
    record = {
        "setup": dataclasses.asdict(setup),
        "learning_rate": LEARNING_RATE,
        "front_tolerance": FRONT_TOLERANCE,
        "seconds": seconds,
        "rows": rows,
    }
    with open(os.path.join(out, f"toy_{setup.name}.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(out, f"toy_{setup.name}.md"), "w") as f:
        f.write(f"{pivot_table(rows)}\n\n{markdown_table(rows)}\n")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Directory for the figures and tables.")
    parser.add_argument("--setup", default="all", choices=[*SETUPS, "all"])
    parser.add_argument("--steps", type=int, default=None, help="Default: the paper's count.")
    parser.add_argument("--record-every", type=int, default=100)
    parser.add_argument(
        "--methods", default=None, help="Comma-separated method names (default: all)."
    )
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1; got {args.steps}.")
    if args.record_every < 1:
        parser.error(f"--record-every must be >= 1; got {args.record_every}.")
    methods = args.methods.split(",") if args.methods else method_names()
    names = list(SETUPS) if args.setup == "all" else [args.setup]
    try:
        for name in names:
            rows = run_setup(SETUPS[name], args.out, methods, args.steps, args.record_every)
            print(f"## {SETUPS[name].source}\n\n{pivot_table(rows)}\n")
    except ValueError as e:  # an unknown method or hyper-parameter
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
