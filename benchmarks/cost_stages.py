"""Cost of each stage of one MTL step as K grows, against the floor of 1 forward + K backward.

Model: the ResNet-18 of ``benchmarks/step_time.py --resnet`` (``make_resnet_problem``:
BatchNorm, 64x64x3 input, K binary heads). Each stage is its own jitted program, timed in
interleaved rounds (``_timing.interleaved_ms``, medians) on the inputs the previous stage
produced:

* ``forward``: the K task losses (encoder forward + K heads);
* ``joint``: ``jax.value_and_grad`` of the summed loss: one forward + ONE backward;
* ``jacobian``: ``mtl.TrunkAndHeads``: one forward + the K encoder backward passes (one
  vmapped pass) + the heads' gradients; ``K backward = jacobian - forward``;
* ``gram``: ``mtl.gramian`` of the encoder Jacobian (per-leaf ``K x K`` blocks, summed);
* ``solve``: the weighting's ``weigh`` on G (UPGrad by default, ``--method``);
* ``combine``: ``sum_k w_k J_k`` leaf by leaf (``mtl.gramian.combine``);
* ``optimizer``: Adam's update and ``apply_updates`` on all parameters;
* ``step``: the whole step in ONE jitted program (what training runs; XLA fuses across stages).

The floor is what any method that needs the K task gradients must pay: one forward and K
backward passes, ``floor = forward + K (joint - forward)``, with one backward measured as
``joint - forward`` in the same run. Columns ``step / floor`` (the overhead of the whole method
over the floor) and ``stages / step`` (the separately jitted stages summed, against the fused step).

Usage::

  python benchmarks/cost_stages.py --quick               # width 16, batch 8: minutes on 2 CPUs
  python benchmarks/cost_stages.py --ks 2 5 10 20 40     # full ResNet-18, batch 32 (GPU)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from _steps import trunk_jacobian_step
from _timing import interleaved_ms, machine_line, median_ms
from step_time import make_resnet_problem

import mtl_jax as mtl
from mtl_jax.gramian import combine

STAGES = ("forward", "joint", "jacobian", "gram", "solve", "combine", "optimizer", "step")


def stage_runners(num_tasks: int, width: int, batch: int, size: int, method: str) -> dict:
    """``{stage: fn()}`` for one K; every input is computed (and blocked on) beforehand."""
    encode, loss_of_head, params, x, y = make_resnet_problem(num_tasks, width, batch, size)
    heads_loss = jax.vmap(loss_of_head, in_axes=(0, None, 0))

    def losses_fn(params):
        return heads_loss(params["heads"], encode(params["trunk"], x), y)

    grads_fn = mtl.value_and_grads(mtl.TrunkAndHeads(encode, loss_of_head))
    weighting = mtl.weighting.get_weighting(method)
    w_state = weighting.init(num_tasks)
    key = jax.random.PRNGKey(0)
    adam = optax.adam(1e-4)
    opt_state = adam.init(params)
    aggregator = mtl.aggregation.from_weighting(weighting, num_tasks=num_tasks, name=method)
    init_step, jac_step = trunk_jacobian_step(grads_fn, aggregator, adam)
    tx_state = init_step(params)

    forward = jax.jit(losses_fn)
    joint = jax.jit(jax.value_and_grad(lambda p: jnp.sum(losses_fn(p))))
    jacobian = jax.jit(lambda p: grads_fn(p, x, y))
    gram = jax.jit(mtl.gramian.gramian)
    solve = jax.jit(weighting.weigh)
    combine_all = jax.jit(lambda w, jac: jax.tree.map(lambda leaf: combine(w, leaf), jac))

    def optimizer_fn(grads, opt_state, params):
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    optimizer = jax.jit(optimizer_fn)

    step = jax.jit(lambda params, state: jac_step(params, state, x, y)[:2])

    losses, all_grads = jax.block_until_ready(jacobian(params))
    jac, head_grads = all_grads["trunk"], all_grads["heads"]
    G = jax.block_until_ready(gram(jac))
    w, _ = jax.block_until_ready(solve(G, w_state, key, losses))
    grads = {"trunk": combine_all(w, jac), "heads": head_grads}
    return {
        "forward": lambda: forward(params),
        "joint": lambda: joint(params),
        "jacobian": lambda: jacobian(params),
        "gram": lambda: gram(jac),
        "solve": lambda: solve(G, w_state, key, losses),
        "combine": lambda: combine_all(w, jac),
        "optimizer": lambda: optimizer(grads, opt_state, params),
        "step": lambda: step(params, tx_state),
    }


def row(num_tasks: int, med: dict[str, float]) -> str:
    backward_one = med["joint"] - med["forward"]
    k_backward = med["jacobian"] - med["forward"]
    floor = med["forward"] + num_tasks * backward_one
    stages = sum(med[s] for s in ("jacobian", "gram", "solve", "combine", "optimizer"))
    cells = [
        med["forward"],
        backward_one,
        k_backward,
        med["gram"],
        med["solve"],
        med["combine"],
        med["optimizer"],
        stages,
        med["step"],
        floor,
    ]
    text = " | ".join(f"{c:.1f}" if c >= 10 else f"{c:.2f}" for c in cells)
    return f"| {num_tasks} | {text} | {med['step'] / floor:.2f} | {stages / med['step']:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 5, 10, 20, 40])
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 channels of layer1")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--method", default="upgrad", help="the Gram-space weighting")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="width 16, batch 8, 5 rounds x 1 unless given"
    )
    args = parser.parse_args()
    if args.quick:  # explicit --rounds / --inner win
        args.width, args.batch = 16, 8
        if args.rounds == parser.get_default("rounds"):
            args.rounds = 5
        if args.inner == parser.get_default("inner"):
            args.inner = 1
    print(machine_line("cost_stages"))
    print(
        f"# ResNet-18 width {args.width}, {args.size}x{args.size}x3, batch {args.batch}, "
        f"{args.method}; median ms of {args.rounds} interleaved rounds x {args.inner}"
    )
    print(
        "| K | forward | 1 backward | K backward | gram | solve | combine | optimizer | "
        "stages sum | step | floor (fwd + K bwd) | step / floor | stages / step |"
    )
    print("|---" * 13 + "|")
    for num_tasks in args.ks:
        runners = stage_runners(num_tasks, args.width, args.batch, args.size, args.method)
        med = median_ms(interleaved_ms(runners, args.rounds, args.inner))
        print(row(num_tasks, med), flush=True)


if __name__ == "__main__":
    main()
