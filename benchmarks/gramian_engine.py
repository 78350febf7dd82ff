"""The Gramian engine (issue 24) against the Jacobian path and TorchJD's ``autogram.Engine``.

Three paths of ONE step (losses, G, weights, update ``sum_k w_k g_k``, SGD), on the same model:

* ``jac``: ``mtl.value_and_grads`` (the K x P Jacobian as rows), the Gram-space aggregator
  (``from_weighting``), SGD;
* ``gram``: ``mtl.autogram.engine_value_and_grads`` (G from per-layer activations and
  cotangents; never the Jacobian), SGD;
* ``torchjd``: ``torchjd.autogram.Engine`` + the TorchJD weighting + ``losses.backward(w)`` + SGD,
  in TorchJD's own virtual environment (``_torchjd.py``, one process per configuration; the
  script is ``_torchjd_autogram.py``).

**Sweep** (``--ks``, ``--hiddens``, ``--batches``): the MLP ``H -> H -> H -> 8`` (tanh; ``P = 2H^2 +
10H + 8``) with K objectives ``L_k = mean_b ((f(x) c)[b, k] - y[b, k])^2`` (``c: [8, K]`` a fixed
projection, so P does not grow with K), weighting ``mean`` (what is timed is the machinery, not
a solver). Memory: XLA's analysis of the compiled step (``peak = argument + output + temp -
alias``, as benchmarks/memory.py), for every point; TorchJD's: the growth of the process's peak
RSS over its first step. Time: medians of interleaved rounds where the Jacobian step's compiled
peak is under ``--run-gib``. The memory laws are fitted by least squares:
``jac: a + b P + c K P + d K B H`` and ``gram: a + b P + c K^2 + d K B H``; the largest K at
``P = 1e6`` (H = 704) and B = 32 in ``--budget-gib`` follows from each.

**IWRM** (``--iwrm``): every sample of a batch of B = 256 embedded digits (``multi_digits``,
task ``left``, 12 x 12 inputs) is an objective; MLP ``144 -> 256 -> 256 -> 10``; UPGrad and mean
weightings; the three paths' step times in the same run (``jac``: the per-sample loss vector
through ``mtl.value_and_grads``; ``gram``: ``GramianWeighting(..., instance_wise=True)``;
``torchjd``: ``Engine(model, batch_dim=0)``). ``--train-steps`` trains IWRM-UPGrad with the
engine and plain ERM (mean loss) for the recipe (docs/recipes/iwrm.md).

Usage::

  python benchmarks/gramian_engine.py                  # sweep + IWRM (28 min, 2 CPUs at load 7-10)
  python benchmarks/gramian_engine.py --quick          # small grid
  python benchmarks/gramian_engine.py --no-sweep --iwrm --train-steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import _checkout  # noqa: F401 -- the checkout's root on sys.path (experiments.data)
import jax
import jax.numpy as jnp
import numpy as np
from _timing import compiled_memory, interleaved_ms, machine_line, median_ms

import mtl_jax as mtl
from mtl_jax import autogram
from mtl_jax.aggregation.gramspace import from_weighting

GIB = 2**30
MIB = 2**20
OUTPUTS = 8
LR = 1e-3
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# The sweep model.


def num_params(hidden: int) -> int:
    return 2 * hidden * hidden + 10 * hidden + OUTPUTS


def init_mlp(key: jax.Array, d_in: int, hidden: int, d_out: int) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    dense = lambda k, i, o: {
        "w": jax.random.normal(k, (i, o)) / np.sqrt(i),
        "b": jnp.zeros(o),
    }
    return {
        "l1": dense(k1, d_in, hidden),
        "l2": dense(k2, hidden, hidden),
        "l3": dense(k3, hidden, d_out),
    }


def mlp(p: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
    return h @ p["l3"]["w"] + p["l3"]["b"]


def sweep_loss(p: dict, x: jax.Array, y: jax.Array, proj: jax.Array) -> jax.Array:
    """``x: [B, H]``, ``y: [B, K]``, ``proj: [8, K]`` -> losses ``[K]``."""
    return jnp.mean((mlp(p, x) @ proj - y) ** 2, axis=0)


def sgd(params: dict, grads: dict) -> dict:
    return jax.tree.map(lambda p, g: p - LR * g.astype(p.dtype), params, grads)


def jacobian_step(loss_fn, weighting: str):
    grad_fn = mtl.value_and_grads(loss_fn)
    aggregator = from_weighting(mtl.weighting.get_weighting(weighting))

    def step(params, *args):
        losses, jac = grad_fn(params, *args)
        update, _ = aggregator.update(jac, aggregator.init(params), params, task_losses=losses)
        return sgd(params, update)

    return step


def gramian_step(loss_fn, weighting: str, instance_wise: bool = False):
    engine = autogram.engine_value_and_grads(
        loss_fn, autogram.GramianWeighting(weighting, instance_wise=instance_wise)
    )

    def step(params, *args):
        _, grads = engine(params, *args)
        return sgd(params, grads)

    return step


def sweep_inputs(k: int, hidden: int, batch: int, abstract: bool):
    def build():
        k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
        params = init_mlp(k1, hidden, hidden, OUTPUTS)
        x = jax.random.normal(k2, (batch, hidden))
        y = jax.random.normal(k3, (batch, k))
        proj = jax.random.normal(k4, (OUTPUTS, k)) / np.sqrt(OUTPUTS)
        return params, x, y, proj

    return jax.eval_shape(build) if abstract else jax.jit(build)()


def torchjd_run(spec: dict) -> dict | None:
    """TorchJD's measurement of ``spec`` in its own interpreter, or ``None`` (with the reason)."""
    try:
        from _torchjd import run_json, torchjd_python

        python = torchjd_python()
        return run_json(python, os.path.join(HERE, "_torchjd_autogram.py"), [json.dumps(spec)])
    except Exception as err:
        print(f"# torchjd skipped: {type(err).__name__}: {str(err)[:300]}", flush=True)
        return None


def sweep(args: argparse.Namespace) -> list[dict]:
    rows = []
    points = [(k, h, args.batch) for h in args.hiddens for k in args.ks]
    points += [(k, args.hiddens[len(args.hiddens) // 2], b) for b in args.batches for k in args.ks]
    points = list(dict.fromkeys(points))
    for k, hidden, batch in points:
        steps = {"jac": jacobian_step(sweep_loss, "mean"), "gram": gramian_step(sweep_loss, "mean")}
        abstract = sweep_inputs(k, hidden, batch, abstract=True)
        mem = {}
        for name, step in steps.items():
            t0 = time.perf_counter()
            compiled = jax.jit(step).lower(*abstract).compile()
            mem[name] = (compiled_memory(compiled).peak, time.perf_counter() - t0)
        row = {"K": k, "H": hidden, "B": batch, "P": num_params(hidden)}
        row.update({f"{n}_peak": m[0] for n, m in mem.items()})
        row.update({f"{n}_compile_s": m[1] for n, m in mem.items()})
        runnable = {n: s for n, s in steps.items() if mem[n][0] <= args.run_gib * GIB}
        if args.rounds and runnable:
            params, x, y, proj = sweep_inputs(k, hidden, batch, abstract=False)
            runners = {}
            for name, step in runnable.items():
                jitted = jax.jit(step)
                runners[name] = lambda f=jitted: f(params, x, y, proj)
            med = median_ms(interleaved_ms(runners, args.rounds, inner=1))
            row.update({f"{n}_ms": v for n, v in med.items()})
        if args.torchjd and k <= args.torchjd_max_k:
            spec = {
                "mode": "sweep",
                "k": k,
                "hidden": hidden,
                "batch": batch,
                "outputs": OUTPUTS,
                "rounds": max(args.rounds, 1),
            }
            out = torchjd_run(spec)
            if out:
                row["torchjd_ms"] = float(np.median(out["ms"]))
                row["torchjd_rss"] = out["rss_mib"] * MIB
                row["torchjd_versions"] = out["versions"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def fit_law(rows: list[dict], path: str) -> tuple[np.ndarray, float, list[str]]:
    """Least-squares coefficients of the law (relative residuals: every point weighs the
    same), the worst relative error and the term names."""
    if path == "jac":
        names = ["1", "P", "K P", "K B H"]
        feats = lambda r: [1.0, r["P"], r["K"] * r["P"], r["K"] * r["B"] * r["H"]]
    else:
        names = ["1", "P", "K^2", "K B H"]
        feats = lambda r: [1.0, r["P"], r["K"] ** 2, r["K"] * r["B"] * r["H"]]
    A = np.array([feats(r) for r in rows], np.float64)
    y = np.array([r[f"{path}_peak"] for r in rows], np.float64)
    coef, *_ = np.linalg.lstsq(A / y[:, None], np.ones_like(y), rcond=None)
    worst = float(np.max(np.abs(A @ coef - y) / y))
    return coef, worst, names


def largest_k(coef: np.ndarray, path: str, p: float, h: int, b: int, budget: float) -> int:
    a, bp, c, d = coef
    rest = budget - a - bp * p
    if path == "jac":
        return int(rest / (c * p + d * b * h))
    lin = d * b * h  # c K^2 + lin K - rest = 0
    return int((-lin + np.sqrt(lin * lin + 4 * c * rest)) / (2 * c))


def print_sweep(rows: list[dict], budget_gib: float) -> None:
    print(
        "\n| K | H | B | P | jac peak MiB | gram peak MiB | jac / gram | jac ms | gram ms | "
        "torchjd ms | torchjd RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda r, key, s=1.0: f"{r[key] / s:.1f}" if key in r else "-"
    for r in rows:
        print(
            f"| {r['K']} | {r['H']} | {r['B']} | {r['P']:,} | {fmt(r, 'jac_peak', MIB)} | "
            f"{fmt(r, 'gram_peak', MIB)} | {r['jac_peak'] / r['gram_peak']:.1f} | "
            f"{fmt(r, 'jac_ms')} | {fmt(r, 'gram_ms')} | {fmt(r, 'torchjd_ms')} | "
            f"{fmt(r, 'torchjd_rss', MIB)} |"
        )
    print()
    for path in ("jac", "gram"):
        coef, worst, names = fit_law(rows, path)
        law = " + ".join(
            f"{c:.3g} {n}" if n != "1" else f"{c:.3g}" for c, n in zip(coef, names, strict=True)
        )
        ks = {
            f"{gib} GiB": largest_k(coef, path, num_params(704), 704, 32, gib * GIB)
            for gib in (budget_gib,)
        }
        print(
            f"{path}: peak = {law} bytes (worst rel. error {worst:.1%}); largest K at "
            f"P = {num_params(704):,} (H = 704), B = 32: {ks}"
        )


# ---------------------------------------------------------------------------------------------
# IWRM on the embedded digits.


def digits(batch: int, num_test: int = 512):
    from experiments.data.registry import make_dataset

    data = make_dataset({"name": "multi_digits", "num_train": 4096, "num_test": num_test})
    flat = lambda src: np.reshape(src.arrays["image"], (len(src), -1)).astype(np.float32)
    train = (flat(data.train), np.asarray(data.train.arrays["left"], np.int32))
    test = (flat(data.test), np.asarray(data.test.arrays["left"], np.int32))
    return train, test


def per_sample_ce(p: dict, xb: jax.Array, yb: jax.Array) -> jax.Array:
    """One sample's cross-entropy (an IWRM objective)."""
    logits = mlp(p, xb[None])[0]
    return -jax.nn.log_softmax(logits)[yb]


def batch_ce(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jax.vmap(per_sample_ce, (None, 0, 0))(p, x, y)  # [B]


def iwrm(args: argparse.Namespace) -> dict:
    (xtr, ytr), (xte, yte) = digits(args.iwrm_batch)
    b, hidden = args.iwrm_batch, args.iwrm_hidden
    x, y = jnp.asarray(xtr[:b]), jnp.asarray(ytr[:b])
    params = init_mlp(jax.random.key(0), x.shape[1], hidden, 10)
    out: dict = {"B": b, "H": hidden, "P": sum(v.size for v in jax.tree.leaves(params))}
    runners = {}
    for weighting in args.iwrm_weightings:
        steps = {
            "jac": jacobian_step(batch_ce, weighting),
            "gram": gramian_step(per_sample_ce, weighting, instance_wise=True),
        }
        for name, step in steps.items():
            compiled = jax.jit(step).lower(params, x, y).compile()
            out[f"{name}+{weighting}_peak"] = compiled_memory(compiled).peak
            runners[f"{name}+{weighting}"] = lambda f=compiled: f(params, x, y)
    med = median_ms(interleaved_ms(runners, args.iwrm_rounds, inner=1))
    out.update({f"{n}_ms": v for n, v in med.items()})
    if args.torchjd:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "digits.npz")
            np.savez(path, x=xtr[:b], y=ytr[:b])
            for weighting in args.iwrm_weightings:
                spec = {
                    "mode": "iwrm",
                    "data": path,
                    "hidden": hidden,
                    "rounds": args.iwrm_rounds,
                    "weighting": weighting,
                }
                res = torchjd_run(spec)
                if res:
                    out[f"torchjd+{weighting}_ms"] = float(np.median(res["ms"]))
                    out[f"torchjd+{weighting}_rss"] = res["rss_mib"] * MIB
    print(json.dumps(out), flush=True)
    print(f"\n| step (K = B = {b}, P = {out['P']:,}) | median ms | x gram | compiled peak MiB |")
    print("|---|---|---|---|")
    for weighting in args.iwrm_weightings:
        base = out.get(f"gram+{weighting}_ms")
        for path in ("jac", "gram", "torchjd"):
            key = f"{path}+{weighting}"
            if f"{key}_ms" not in out:
                continue
            peak = out.get(f"{key}_peak", out.get(f"{key}_rss"))
            peak_txt = f"{peak / MIB:.1f}" + (" (RSS growth)" if path == "torchjd" else "")
            print(
                f"| {key} | {out[f'{key}_ms']:.1f} | {out[f'{key}_ms'] / base:.2f} | {peak_txt} |"
            )
    if args.train_steps:
        out["training"] = train_iwrm(args, (xtr, ytr), (xte, yte))
    return out


def train_iwrm(args, train, test) -> dict:
    """IWRM-UPGrad with the engine vs ERM (mean loss), SGD with momentum, same batches."""
    import optax

    (xtr, ytr), (xte, yte) = train, test
    b = args.iwrm_batch
    params0 = init_mlp(jax.random.key(0), xtr.shape[1], args.iwrm_hidden, 10)
    engine = autogram.engine_value_and_grads(
        per_sample_ce, autogram.GramianWeighting("upgrad", instance_wise=True)
    )
    tx = optax.sgd(args.train_lr, momentum=0.9)

    def iwrm_grads(p, x, y):
        _, g = engine(p, x, y)
        return g

    def erm_grads(p, x, y):
        return jax.grad(lambda q: jnp.mean(batch_ce(q, x, y)))(p)

    def make_step(grad_fn):
        @jax.jit
        def step(p, s, x, y):
            g = grad_fn(p, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step

    accuracy = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(mlp(p, x), -1) == y))
    results = {}
    for name, grad_fn in (("erm", erm_grads), ("iwrm_upgrad", iwrm_grads)):
        p, s = params0, tx.init(params0)
        step = make_step(grad_fn)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for _ in range(args.train_steps):
            idx = rng.choice(len(xtr), b, replace=False)
            p, s = step(p, s, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))
        jax.block_until_ready(p)
        results[name] = {
            "test_acc": float(accuracy(p, jnp.asarray(xte), jnp.asarray(yte))),
            "train_loss": float(jnp.mean(batch_ce(p, jnp.asarray(xtr), jnp.asarray(ytr)))),
            "seconds": time.perf_counter() - t0,
        }
    print(json.dumps({"training": results, "steps": args.train_steps}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32, 128, 512, 1024])
    parser.add_argument("--hiddens", type=int, nargs="+", default=[128, 362, 704])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-gib", type=float, default=1.0)
    parser.add_argument("--budget-gib", type=float, default=24.0)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--iwrm", action="store_true", default=None)
    parser.add_argument("--iwrm-batch", type=int, default=256)
    parser.add_argument("--iwrm-hidden", type=int, default=256)
    parser.add_argument("--iwrm-rounds", type=int, default=5)
    parser.add_argument("--iwrm-weightings", nargs="+", default=["mean", "upgrad"])
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--train-lr", type=float, default=0.05)
    parser.add_argument("--no-torchjd", dest="torchjd", action="store_false")
    parser.add_argument("--torchjd-max-k", type=int, default=128)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="", help="write the results to this file")
    parser.add_argument("--from-json", default="", help="print the sweep tables of a saved run")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print_sweep(json.load(f)["sweep"], args.budget_gib)
        return
    if args.quick:
        args.ks, args.hiddens, args.batches, args.rounds = [2, 32, 128], [128, 362], [], 3
        args.iwrm_rounds = 3
    print(machine_line("gramian_engine"), flush=True)
    report: dict = {"machine": machine_line("gramian_engine")}
    if not args.no_sweep:
        rows = sweep(args)
        print_sweep(rows, args.budget_gib)
        report["sweep"] = rows
    if args.iwrm or args.iwrm is None:
        report["iwrm"] = iwrm(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(machine_line("gramian_engine (end)"), file=sys.stdout)


if __name__ == "__main__":
    main()
