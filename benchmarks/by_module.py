"""Compile time and step time of per-module weighting (``granularity=mtl.gramian.by_module``) on ResNet-18.

Issue 11: with ``by_module`` the weighting used to run once per group in a Python loop (one
``lax.cond`` and one solver per module), so the compiled program grew with the depth of the
model. The groups are now batched (stacked Gram matrices, one ``vmap``-ed solver). This script
times, on the BatchNorm ResNet-18 of ``experiments/models/resnet.py`` (41 encoder groups):

* ``global``: one Gram matrix for the whole encoder (the baseline of every ratio);
* ``by_module loop``: the old layout, one solver per group (``from_weighting(_batch_groups=False)``);
* ``by_module batched``: the new layout.

Each row is a jitted train step (gradient rows of K task losses, aggregation, SGD). Compile time
is the wall time of ``jit(step).lower(...).compile()``; step time is the median over ``--steps``
interleaved rounds of one step each (``_timing.interleaved_ms``) after one warm-up step. One
process, every configuration measured in the same run.

  python benchmarks/by_module.py [--width 16] [--batch 8] [--steps 10] [--methods upgrad,mgda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import _checkout  # noqa: F401  (puts the checkout on sys.path: experiments/ is not installed)
import jax
import jax.numpy as jnp
import optax
from _timing import interleaved_ms, machine_line, median_ms, stateful

import mtl_jax as mtl
from experiments.models.resnet import ResNetEncoder
from mtl_jax.aggregation import from_weighting
from mtl_jax.gramian import group_names

K = 3


def make_problem(width: int, batch: int, seed: int = 0):
    """ResNet-18 encoder (ImageNet stem, 36x36 inputs as Recon) + K linear heads."""
    encoder = ResNetEncoder(width=width)
    key = jax.random.PRNGKey(seed)
    kx, ky, ke, kh = jax.random.split(key, 4)
    x = jax.random.normal(kx, (batch, 36, 36, 1))
    y = jax.random.randint(ky, (K, batch), 0, 10)
    variables = encoder.init(ke, x, train=False)
    params = {
        "encoder": variables["params"],
        "heads": 0.01 * jax.random.normal(kh, (K, encoder.feature_dim, 10)),
    }
    batch_stats = variables["batch_stats"]

    def task_losses(params):
        z = encoder.apply({"params": params["encoder"], "batch_stats": batch_stats}, x, train=False)
        logits = jnp.einsum("bd,kdc->kbc", z, params["heads"])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1), axis=(1, 2))

    return params, task_losses


def make_step(params, task_losses, aggregator):
    is_head = {"encoder": jax.tree.map(lambda _: False, params["encoder"]), "heads": True}
    tx = optax.chain(mtl.shared_rows(aggregator, is_head), optax.sgd(1e-2))
    grad_fn = mtl.value_and_grads(task_losses, is_head)  # encoder rows [K, ...]; heads: gradient

    def step(params, opt_state):
        losses, grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    return tx, step


def by_module_groups(path: str) -> str:
    return mtl.gramian.by_module(path)


def compile_step(params, task_losses, aggregator) -> tuple[float, Callable]:
    """``(compile seconds, runner)``: the runner threads params and optimizer state itself."""
    tx, step = make_step(params, task_losses, aggregator)
    opt_state = tx.init(params)
    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state).compile()
    compile_s = time.perf_counter() - start
    run = stateful(lambda st: compiled(*st[:2]), (params, opt_state, None), out=lambda st: st)
    return compile_s, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", default="upgrad,mgda,pcgrad")
    args = parser.parse_args()

    params, task_losses = make_problem(args.width, args.batch)
    groups = group_names(params["encoder"], mtl.gramian.by_module)
    print(machine_line("by_module"))
    print(
        f"ResNet-18 encoder, width {args.width}, batch {args.batch}, K={K}, "
        f"{len(groups)} by_module groups, backend {jax.default_backend()}"
    )
    header = f"{'method':<8} {'granularity':<18} {'compile s':>9} {'x global':>8} "
    header += f"{'x loop':>7} {'step ms':>8} {'x global':>8} {'x loop':>7}"
    print(header)
    for method in args.methods.split(","):
        weighting = mtl.weighting.get_weighting(method)
        configs = {
            "global": from_weighting(weighting, num_tasks=K, name=method),
            "by_module loop": from_weighting(
                weighting,
                granularity=by_module_groups,
                num_tasks=K,
                name=method,
                _batch_groups=False,
            ),
            "by_module batched": from_weighting(
                weighting, granularity=by_module_groups, num_tasks=K, name=method
            ),
        }
        compiled = {name: compile_step(params, task_losses, agg) for name, agg in configs.items()}
        med = median_ms(interleaved_ms({n: run for n, (_, run) in compiled.items()}, args.steps))
        results = {name: (comp, 1e-3 * med[name]) for name, (comp, _) in compiled.items()}
        base_c, base_s = results["global"]
        loop_c, loop_s = results["by_module loop"]
        for name, (comp, step_s) in results.items():
            print(
                f"{method:<8} {name:<18} {comp:9.2f} {comp / base_c:8.2f} {comp / loop_c:7.2f} "
                f"{1e3 * step_s:8.2f} {step_s / base_s:8.2f} {step_s / loop_s:7.2f}"
            )


if __name__ == "__main__":
    main()
