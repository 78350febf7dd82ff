"""Peak memory of one MTL step against K and the model size P, and the largest K x P that fits.

Model: an MLP trunk ``H -> H -> H -> H`` (tanh; ``P = 3 H^2 + 3 H`` shared parameters) with K
scalar heads ``H -> 1`` (stacked ``[K, H]``), batch B, squared error. Every variant is ONE jitted
train step, the Adam update of all parameters included:

* ``joint``: ``jax.value_and_grad`` of the summed loss (no Jacobian; the baseline);
* ``jac``: ``mtl.TrunkAndHeads`` (trunk Jacobian ``[K, P]`` in leaves, heads their own
  gradients), UPGrad (Gram matrix, QP solve, combination), Adam;
* ``jac[chunk=c]``: the same with ``chunk_size=c``: the K backward passes run c at a time, so
  only c rows of activation cotangents ``[c, B, H]`` live at once (the Jacobian itself is still
  ``K x P``);
* ``per_task``: ``mtl.PerTaskLosses`` (the gradient of each task's own loss inside one
  task ``vmap``), ``shared_rows(UPGrad)``, Adam;
* ``ub``: the representation-gradient path (``mtl.RepresentationWeighting``, MGDA-UB):
  no Jacobian at all.

Memory is XLA's own analysis of the compiled program (``jax.jit(step).lower(...).compile()
.memory_analysis()``): the program is lowered on ``jax.ShapeDtypeStruct`` arguments, so nothing
is allocated, and ``peak = argument + output + temp - alias`` bytes (``_timing.compiled_memory``).

The scaling law. For ``jac`` the peak is fitted by least squares as
``peak = a + b P + c K P + d K B H`` (fixed overhead; parameters, gradient and Adam moments;
the Jacobian and the buffers the size of one Jacobian; the activation cotangents of the K
backward passes). The largest K for a model of size P in a budget M is then
``K = (M - a - b P) / (c P + d B H)``, and the table reports it for a few P at M = 24 GiB (the
RAM of the CPU machine of BUILD.md; ``--budget-gib``) and, on an accelerator, at the device's
``bytes_limit``. The law is that of the compiled program on the backend it runs on.

Check by running (``--verify-gib``, default 2): the ``jac`` step whose predicted peak is closest
to that many GiB is run once in a fresh subprocess, and what it used is measured: on an
accelerator ``memory_stats()['peak_bytes_in_use']`` minus the bytes in use before the step; on
the CPU the growth of the process's peak RSS (``ru_maxrss``) over its RSS before the step. Both
are compared with the compiled program's ``temp + output`` (the arguments exist before the step).

Usage::

  python benchmarks/memory.py                           # K = 2..128, H = 256, 1024, 2048
  python benchmarks/memory.py --quick                   # small grid, a few minutes on 2 CPUs
  python benchmarks/memory.py --ks 2 8 --hiddens 256 --verify-gib 0   # no run-check

``--resnet-ks`` (default 2 40; none: ``--resnet-ks``) adds the ResNet-18 steps of
``step_time.py --resnet`` (``joint``, ``jac+upgrad``, ``jac[chunk]+upgrad``, ``ub+mgda``),
compiled only, and from the two largest K the bytes per task and the largest K per budget.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _steps import representation_step, trunk_jacobian_step
from _timing import compiled_memory, machine_line

import mtl_jax as mtl

GIB = 2**30
LAYERS = 3
REFERENCE_P = (1_000_000, 11_200_000, 25_600_000, 100_000_000)  # ResNet-18: 11.2M, ResNet-50: 25.6M


def trunk_init(key: jax.Array, hidden: int) -> list[dict]:
    keys = jax.random.split(key, LAYERS)
    return [
        {"w": jax.random.normal(k, (hidden, hidden)) / np.sqrt(hidden), "b": jnp.zeros(hidden)}
        for k in keys
    ]


def trunk(params: list[dict], x: jax.Array) -> jax.Array:
    for layer in params:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x


def head_loss(head: jax.Array, z: jax.Array, y: jax.Array) -> jax.Array:
    """``head: [H]``, ``z: [B, H]``, ``y: [B]`` -> mean squared error."""
    return jnp.mean((z @ head - y) ** 2)


def num_params(hidden: int) -> int:
    return LAYERS * (hidden * hidden + hidden)


def make_inputs(num_tasks: int, hidden: int, batch: int, abstract: bool):
    """``(params, x, y)``: ``params = {"trunk": [...], "heads": [K, H]}``; shapes only if abstract."""

    def build():
        k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
        params = {
            "trunk": trunk_init(k1, hidden),
            "heads": jax.random.normal(k2, (num_tasks, hidden)) / np.sqrt(hidden),
        }
        x = jax.random.normal(k3, (batch, hidden))
        y = jax.random.normal(k4, (num_tasks, batch))
        return params, x, y

    return jax.eval_shape(build) if abstract else jax.jit(build)()


def make_step(variant: str, num_tasks: int) -> tuple[Callable, Callable]:
    """``(init(params) -> opt_state, step(params, opt_state, x, y) -> (params, opt_state))``."""
    adam = optax.adam(1e-4)

    def apply(params, updates):
        return optax.apply_updates(params, updates)

    if variant == "joint":

        def loss(params, x, y):
            z = trunk(params["trunk"], x)
            return jnp.sum(jax.vmap(head_loss, in_axes=(0, None, 0))(params["heads"], z, y))

        def step(params, opt_state, x, y):
            grads = jax.grad(loss)(params, x, y)
            updates, opt_state = adam.update(grads, opt_state, params)
            return apply(params, updates), opt_state

        return adam.init, step

    if variant.startswith("jac"):
        chunk = int(variant.split("=")[1].rstrip("]")) if "chunk" in variant else None
        grads_fn = mtl.value_and_grads(mtl.TrunkAndHeads(trunk, head_loss), chunk_size=chunk)
        aggregator = mtl.aggregation.upgrad(num_tasks=num_tasks)
        init, jac_step = trunk_jacobian_step(grads_fn, aggregator, adam)
        return init, lambda params, opt_state, x, y: jac_step(params, opt_state, x, y)[:2]

    if variant == "per_task":
        labels = {"trunk": False, "heads": True}

        def task_loss(view, t, x, y):
            return head_loss(view["heads"][t], trunk(view["trunk"], x), y[t])

        grads_fn = mtl.value_and_grads(
            mtl.PerTaskLosses(task_loss, mtl.SHARED, num_tasks), task_specific=labels
        )
        tx = optax.chain(mtl.shared_rows(mtl.aggregation.upgrad(num_tasks=num_tasks), labels), adam)

        def step(params, opt_state, x, y):
            losses, grads = grads_fn(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
            return apply(params, updates), opt_state

        return tx.init, step

    if variant == "ub":
        fn = mtl.value_and_grads(
            mtl.TrunkAndHeads(trunk, head_loss),
            representation=mtl.RepresentationWeighting("mgda"),
        )
        init, ub_step = representation_step(fn, num_tasks, adam)
        return init, lambda params, opt_state, x, y: ub_step(params, opt_state, x, y)[:2]

    raise ValueError(f"Unknown variant {variant!r}.")


def compile_step(variant: str, num_tasks: int, hidden: int, batch: int, abstract: bool = True):
    params, x, y = make_inputs(num_tasks, hidden, batch, abstract)
    init, step = make_step(variant, num_tasks)
    opt_state = jax.eval_shape(init, params) if abstract else jax.jit(init)(params)
    compiled = jax.jit(step).lower(params, opt_state, x, y).compile()
    return compiled, (params, opt_state, x, y)


def fit_scaling(rows: list[dict]) -> dict[str, float]:
    """Least squares ``peak = a + b P + c K P + d K B H`` over the ``jac`` rows."""
    feats = np.array([[1.0, r["P"], r["K"] * r["P"], r["K"] * r["B"] * r["H"]] for r in rows])
    peaks = np.array([float(r["peak"]) for r in rows])
    coef, *_ = np.linalg.lstsq(feats, peaks, rcond=None)
    pred = feats @ coef
    rel = float(np.max(np.abs(pred - peaks) / peaks))
    return {"a": coef[0], "b": coef[1], "c": coef[2], "d": coef[3], "max_rel_err": rel}


def predict(fit: dict[str, float], k: float, p: float, batch: int, hidden: int) -> float:
    return fit["a"] + fit["b"] * p + fit["c"] * k * p + fit["d"] * k * batch * hidden


def largest_k(fit: dict[str, float], budget: float, p: float, batch: int, hidden: int) -> int:
    per_task = fit["c"] * p + fit["d"] * batch * hidden
    return max(0, int((budget - fit["a"] - fit["b"] * p) // per_task))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_point(num_tasks: int, hidden: int, batch: int) -> dict:
    """Runs one ``jac`` step for real and returns what it used (called in a fresh subprocess)."""
    compiled, args = compile_step("jac", num_tasks, hidden, batch, abstract=False)
    mem = compiled_memory(compiled)
    jax.block_until_ready(args)
    dev = jax.local_devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    before_dev = stats.get("bytes_in_use") if stats else None
    before_rss = _rss_bytes()
    peak_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = compiled(*args)
    jax.block_until_ready(out)
    after = dev.memory_stats() if stats else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "predicted_run_bytes": mem.temp + mem.output,
        "peak_bytes": mem.peak,
        # meaningful only if the step set the process's peak (compilation may have set it higher)
        "rss_growth": peak_rss - before_rss if peak_rss > peak_rss_before else -1,
    }
    if after and "peak_bytes_in_use" in after:
        result["device_growth"] = after["peak_bytes_in_use"] - before_dev
    return result


def verify(fit, target_gib: float, hidden: int, batch: int) -> None:
    """Runs the ``jac`` step predicted to need ``target_gib`` and prints predicted vs measured."""
    p = num_params(hidden)
    k = max(2, largest_k(fit, target_gib * GIB, p, batch, hidden))
    cmd = [sys.executable, __file__, "--run-point", str(k), str(hidden), str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"run-check failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
        return
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    pred_fit = predict(fit, k, p, batch, hidden)
    print(
        f"\n## Check by running: jac step, K={k}, H={hidden} (P={p:,}), B={batch}\n"
        f"| quantity | GiB |\n|---|---|\n"
        f"| fitted law, peak | {pred_fit / GIB:.3f} |\n"
        f"| compiled analysis, peak (argument + output + temp - alias) | "
        f"{res['peak_bytes'] / GIB:.3f} |\n"
        f"| compiled analysis, temp + output (what the step adds) | "
        f"{res['predicted_run_bytes'] / GIB:.3f} |\n"
        f"| measured: growth of peak RSS over RSS before the step | "
        + (
            f"{res['rss_growth'] / GIB:.3f} |"
            if res["rss_growth"] >= 0
            else "n/a (below the compile-time peak) |"
        )
    )
    if "device_growth" in res:
        print(
            f"| measured: device peak_bytes_in_use - bytes_in_use before the step | "
            f"{res['device_growth'] / GIB:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32, 128])
    parser.add_argument("--hiddens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4, help="chunk_size of the jac[chunk] rows")
    parser.add_argument("--resnet-ks", type=int, nargs="*", default=[2, 40])
    parser.add_argument("--resnet-width", type=int, default=64)
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument(
        "--chunk-batch", type=int, default=2048, help="batch of the chunk_size table (0: none)"
    )
    parser.add_argument("--verify-gib", type=float, default=2.0, help="0: no run-check")
    parser.add_argument("--quick", action="store_true", help="K = 2, 8, 32; H = 128, 512, 1024")
    parser.add_argument("--run-point", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_point:
        print(json.dumps(run_point(*args.run_point)))
        return
    if args.quick:
        args.ks, args.hiddens, args.chunk_batch = [2, 8, 32], [128, 512, 1024], 1024
        args.resnet_width, args.resnet_batch = 16, 8

    variants = ["joint", "jac", f"jac[chunk={args.chunk}]", "per_task", "ub"]
    print(machine_line("memory"))
    print(
        f"# MLP trunk {LAYERS}x(H -> H), K scalar heads, batch {args.batch}, UPGrad + Adam; "
        "XLA compiled memory analysis (nothing allocated)"
    )
    print("| H | P | K | K x P | step | temp MiB | peak MiB | x joint | x jac |")
    print("|---|---|---|---|---|---|---|---|---|")
    jac_rows = []
    for hidden in args.hiddens:
        p = num_params(hidden)
        for k in args.ks:
            mems = {}
            for variant in variants:
                if "chunk" in variant and args.chunk >= k:
                    continue
                compiled, _ = compile_step(variant, k, hidden, args.batch)
                mems[variant] = compiled_memory(compiled)
            base, jac = mems["joint"].peak, mems["jac"].peak
            jac_rows.append({"K": k, "P": p, "B": args.batch, "H": hidden, "peak": jac})
            for variant, mem in mems.items():
                print(
                    f"| {hidden} | {p:,} | {k} | {k * p:,} | {variant} | "
                    f"{mem.temp / 2**20:.1f} | {mem.peak / 2**20:.1f} | {mem.peak / base:.2f} | "
                    f"{mem.peak / jac:.2f} |",
                    flush=True,
                )

    fit = fit_scaling(jac_rows)
    print(
        "\n## Fitted law for `jac` (bytes): "
        f"peak = {fit['a']:.3g} + {fit['b']:.2f} P + {fit['c']:.2f} K P + {fit['d']:.2f} K B H "
        f"(max relative error over the grid {100 * fit['max_rel_err']:.1f}%)"
    )
    budgets = [("budget", args.budget_gib * GIB)]
    stats = jax.local_devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "bytes_limit" in stats:
        budgets.append((jax.local_devices()[0].device_kind, float(stats["bytes_limit"])))
    hidden = max(args.hiddens)
    print(
        f"\n## Largest K that fits (jac step, batch {args.batch}, activations as the H={hidden} "
        "MLP)\n| budget | P | largest K | K x P |\n|---|---|---|---|"
    )
    for name, budget in budgets:
        for p in REFERENCE_P:
            k = largest_k(fit, budget, p, args.batch, hidden)
            print(f"| {name}: {budget / GIB:.1f} GiB | {p:,} | {k:,} | {k * p:.3g} |")
        kp = (budget - fit["a"]) / fit["c"]
        print(f"| {name}: {budget / GIB:.1f} GiB | K x P limit, P -> small | | {kp:.3g} |")
    if args.chunk_batch > 0:
        chunk_table(max(args.ks), min(args.hiddens), args.chunk_batch)
    if args.resnet_ks:
        resnet_table(args.resnet_ks, args.resnet_width, args.resnet_batch, args.chunk, budgets)
    if args.verify_gib > 0:
        verify(fit, args.verify_gib, max(args.hiddens), args.batch)


def resnet_table(ks, width: int, batch: int, chunk: int, budgets) -> None:
    """ResNet-18 steps of ``step_time.py --resnet`` (64x64x3, K binary heads), compiled only.

    The peak is linear in K for a fixed model, so the two largest K give the bytes per task and
    the largest K that fits each budget.
    """
    from step_time import build_resnet_steps, make_resnet_problem

    print(
        f"\n## ResNet-18 (width {width}, BatchNorm, 64x64x3, batch {batch}), compiled analysis\n"
        "| K | P | step | temp MiB | peak MiB | x joint |\n|---|---|---|---|---|---|"
    )
    peaks: dict[str, dict[int, int]] = {}
    for k in ks:
        encode, loss_of_head, params, x, y = make_resnet_problem(k, width, batch)
        p = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params["trunk"]))
        steps = build_resnet_steps(encode, loss_of_head, k, ["upgrad"], ["mgda"])
        chunked = build_resnet_steps(encode, loss_of_head, k, ["upgrad"], [], chunk_size=chunk)
        steps[f"jac[chunk={chunk}]+upgrad"] = chunked["jac+upgrad"]
        mems = {}
        for name, (step, init) in steps.items():
            if "chunk" in name and chunk >= k:  # chunk_size >= K runs the unchunked program
                peaks.setdefault(name, {})[k] = mems["jac+upgrad"].peak
                continue
            opt_state = jax.eval_shape(init, params)
            compiled = jax.jit(step).lower(params, opt_state, x, y).compile()
            mems[name] = compiled_memory(compiled)
            peaks.setdefault(name, {})[k] = mems[name].peak
        for name, mem in mems.items():
            print(
                f"| {k} | {p:,} | {name} | {mem.temp / 2**20:.1f} | {mem.peak / 2**20:.1f} | "
                f"{mem.peak / mems['joint'].peak:.2f} |",
                flush=True,
            )
    if len(ks) < 2:
        return
    lo, hi = sorted(ks)[-2:]
    print(f"\n| budget | step | MiB per task (K={lo} -> {hi}) | largest K |\n|---|---|---|---|")
    for name, by_k in peaks.items():
        if not name.startswith("jac"):  # joint and ub do not grow with K (but for the heads)
            continue
        slope = (by_k[hi] - by_k[lo]) / (hi - lo)
        base = by_k[lo] - slope * lo
        for label, budget in budgets:
            k_max = int((budget - base) // slope) if slope > 0 else -1
            print(f"| {label}: {budget / GIB:.1f} GiB | {name} | {slope / 2**20:.1f} | {k_max:,} |")


def chunk_table(num_tasks: int, hidden: int, batch: int) -> None:
    """``chunk_size`` where it matters: a large batch, so the K activation cotangents dominate."""
    print(
        f"\n## chunk_size at a large batch: K={num_tasks}, H={hidden} (P={num_params(hidden):,}), "
        f"B={batch}\n| step | temp MiB | peak MiB | x jac |\n|---|---|---|---|"
    )
    chunks = [c for c in (1, 4, 16) if c < num_tasks]
    mems = {}
    for variant in ["jac", *[f"jac[chunk={c}]" for c in chunks], "per_task", "ub"]:
        compiled, _ = compile_step(variant, num_tasks, hidden, batch)
        mems[variant] = compiled_memory(compiled)
    for variant, mem in mems.items():
        print(
            f"| {variant} | {mem.temp / 2**20:.1f} | {mem.peak / 2**20:.1f} | "
            f"{mem.peak / mems['jac'].peak:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
