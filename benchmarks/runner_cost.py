"""Each method's step through the runner, and the conflict probe's cost apart (issue 22).

Runs ``python -m experiments.run`` on the K = 3 conflict benchmark (``experiments/configs/
conflict.py``: ``digit_transforms``, ``small_resnet``) for one seed and a few epochs per method,
and reads each run's summary: ``seconds_per_step`` (the method's own step) and, where the
checkout has the probe, ``probe_seconds`` (one conflict probe: the encoder Jacobian and the
tracker). ``--before DIR`` times a second checkout (e.g. ``git worktree add /tmp/before
<commit>``) in the same rounds, interleaved, so that both columns see the same machine load.
Ratios are against ``mean`` of the same checkout (for the weights-first runner, ``mean`` is
one backward pass of the mean loss: a plain joint step).

Usage::

  python benchmarks/runner_cost.py                          # this checkout, 3 rounds
  python benchmarks/runner_cost.py --before /tmp/before --rounds 3
  python benchmarks/runner_cost.py --model mlp --methods mean uw pcgrad
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("mean", "uw", "famo", "mgda_ub", "pcgrad", "upgrad")


def run_once(checkout: str, method: str, args: argparse.Namespace) -> dict:
    """One run of ``method`` in ``checkout``; its summary record."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable,
            "-m",
            "experiments.run",
            "--config",
            os.path.join(checkout, "experiments", "configs", "conflict.py"),
            f"--config.methods=('{method}',)",
            "--config.single_task=False",
            "--config.seeds=(0,)",
            f"--config.train.epochs={args.epochs}",
            "--config.eval.recompute_bn_batches=0",
            "--config.report.plots=False",
            "--workdir",
            os.path.join(workdir, "w"),
        ]
        if args.model:
            command.append(f"--config.model.name={args.model}")
        env = {**os.environ, "PYTHONPATH": checkout}
        out = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{checkout} {method}: exit {out.returncode}\n{out.stderr[-3000:]}")
        with open(os.path.join(workdir, "w", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    return next(r for r in records if r["kind"] == "summary")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=None, help="a second checkout, timed alongside")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default=None, help="another config.model.name")
    args = parser.parse_args()
    checkouts = {"after": ROOT}
    if args.before:
        checkouts = {"before": os.path.abspath(args.before), **checkouts}
    times: dict[tuple[str, str], list[float]] = {}
    probes: dict[tuple[str, str], list[float]] = {}
    every: dict[str, int] = {}
    for r in range(args.rounds):
        for method in args.methods:
            for name, path in checkouts.items():
                summary = run_once(path, method, args)
                times.setdefault((name, method), []).append(1e3 * summary["seconds_per_step"])
                if "probe_seconds" in summary:
                    probes.setdefault((name, method), []).append(1e3 * summary["probe_seconds"])
                    every[method] = summary["probe_every"]
                print(
                    f"round {r} {name:6s} {method:8s} {1e3 * summary['seconds_per_step']:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    load = os.getloadavg()
    print(
        f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.rounds} rounds, "
        f"{args.epochs} epochs each; medians over rounds\n"
    )
    header = ["method"]
    for name in checkouts:
        header += [f"{name} ms/step", f"{name} / mean"]
    header += ["probe ms (after)", "probe every"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method in args.methods:
        row = [method]
        for name in checkouts:
            ms = statistics.median(times[(name, method)])
            base = statistics.median(times[(name, "mean")]) if (name, "mean") in times else ms
            row += [f"{ms:.2f}", f"{ms / base:.2f}"]
        probe = probes.get(("after", method))
        row += [f"{statistics.median(probe):.2f}" if probe else "", str(every.get(method, ""))]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
