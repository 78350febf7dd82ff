"""The model shapes of ``mtl.value_and_grads`` on one branched model: time and peak memory.

Model (issues 12 and 14): a Recon-branched MLP. ``trunk`` D->H (shared), ``branch`` H->H copied
per task (``[K, H, H]``, Recon's per-task copy), ``out`` H->H shared but run once per task stream,
then K heads H->C (task-specific); batch B, mean squared error. Every variant is one jitted
function from the parameters to the updates of ALL parameters (aggregator ``mtl.aggregation.mean`` on the
shared leaves, then SGD), so only the gradient machinery differs:

* ``grads_tree``: a loss vector, ``mtl.value_and_grads(loss, task_specific)`` -> shared leaves
  ``[K, ...]``, copies and heads their ordinary gradient -> ``optax.chain(mtl.shared_rows(mean),
  sgd)``.
* ``per_task``: ``mtl.value_and_grads(mtl.PerTaskLosses(task_loss, spec, K))``: the gradient of
  each task's own loss inside the task ``vmap`` (the shared prefix runs forward once; no
  ``[K, K, ...]`` activation cotangents after the branch, which the joint-loss paths all have)
  -> the same ``shared_rows`` chain. ``per_task[unroll]``: the same with ``task_map="unroll"``
  (one traced loss per task, for heterogeneous heads).
* ``jacobian``: a loss vector without ``task_specific``: rows for every leaf (copies get a
  ``[K, K, H, H]`` Jacobian, heads ``[K, H, C]``), the task-specific rows summed here
  (:func:`sum_specific_rows`) -> ``optax.chain(mtl.shared_rows(mean, labels), sgd)``.
* ``trunk_and_heads``: ``mtl.TrunkAndHeads`` with the per-task body as the trunk: it gets K
  Jacobian rows (copies ``[K, K, H, H]``, rows summed the same way), the K stacked heads their
  own gradients -> ``shared_rows(mean)`` on the trunk, SGD on both.

Every variant is checked to give the same updates before it is timed (``--no-check`` skips it).
Columns: median ms per call (``--repeats`` interleaved rounds after a warm-up), and the compiled program's
memory from ``jax.jit(f).lower(...).compile().memory_analysis()``: temp + output bytes (the
arguments are the same for all three). Ratios are against ``grads_tree`` in the same run.

Usage::

  python benchmarks/grads_tree.py                          # K = 2, 10, 40
  python benchmarks/grads_tree.py --ks 2 10 --hidden 64 --repeats 5
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import compiled_memory, interleaved_ms, machine_line, median_ms

import mtl_jax as mtl


def _dense(key: jax.Array, n_in: int, n_out: int) -> dict:
    return {"w": jax.random.normal(key, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)}


def _layer(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


def make_problem(k: int, d: int, h: int, c: int, b: int):
    keys = jax.random.split(jax.random.PRNGKey(0), 4 + k)
    body = {
        "trunk": _dense(keys[0], d, h),
        "branch": _dense(keys[1], h, h),
        "out": _dense(keys[2], h, h),
    }
    spec = {"trunk": mtl.SHARED, "branch": mtl.COPIED, "out": mtl.SHARED}
    body = mtl.sharing.copy_per_task(body, spec, k)
    heads = jax.vmap(lambda kk: _dense(kk, h, c))(keys[4:])  # stacked [K, ...]
    params = {"body": body, "heads": heads}
    x = jax.random.normal(keys[3], (b, d))
    ys = jax.random.normal(keys[3], (k, b, c))

    def apply_body(p: dict, x: jax.Array) -> jax.Array:
        z = jax.nn.relu(_layer(p["trunk"], x))
        z = jax.nn.relu(_layer(p["branch"], z))
        return jax.nn.relu(_layer(p["out"], z))

    encode = mtl.per_task(apply_body, spec, k)  # [K, B, H]: one stream per task

    def head_loss(hp: dict, z: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((_layer(hp, z) - y) ** 2)

    def losses(params: dict, x: jax.Array, ys: jax.Array) -> jax.Array:
        z = encode(params["body"], x)
        return jax.vmap(head_loss)(params["heads"], z, ys)

    def task_loss(view: dict, t: jax.Array, x: jax.Array, ys: jax.Array) -> jax.Array:
        return head_loss(view["heads"], apply_body(view["body"], x), ys[t])

    task_specific = {"body": spec, "heads": mtl.COPIED}
    return params, x, ys, losses, encode, head_loss, task_loss, task_specific


def sum_specific_rows(jac: dict, labels: dict) -> dict:
    """The task-specific leaves' Jacobian rows ``[K, *shape]`` summed to ``[*shape]``.

    A task-specific leaf's rows are zero except its own task's, so the sum is its own gradient
    (the tree ``mtl.value_and_grads`` gives); shared leaves keep their rows. ``labels`` may be a
    prefix of ``jac`` (``True`` on a subtree marks all its leaves).
    """
    return jax.tree.map(
        lambda flag, sub: jax.tree.map(lambda j: j.sum(axis=0), sub) if flag else sub, labels, jac
    )


def make_variants(k: int, d: int, h: int, c: int, b: int) -> tuple[dict[str, Callable], tuple]:
    params, x, ys, losses, encode, head_loss, task_loss, task_specific = make_problem(k, d, h, c, b)
    sgd = optax.sgd(0.1)

    tx_new = optax.chain(mtl.shared_rows(mtl.aggregation.mean(), task_specific), sgd)
    grads_fn = mtl.value_and_grads(losses, task_specific)

    def grads_tree(params, x, ys):
        task_losses, grads = grads_fn(params, x, ys)
        return tx_new.update(grads, tx_new.init(params), params, task_losses=task_losses)[0]

    per_task_fn = mtl.value_and_grads(mtl.PerTaskLosses(task_loss, task_specific, k))

    def per_task(params, x, ys):
        task_losses, grads = per_task_fn(params, x, ys)
        return tx_new.update(grads, tx_new.init(params), params, task_losses=task_losses)[0]

    unrolled_fn = mtl.value_and_grads(
        mtl.PerTaskLosses(task_loss, task_specific, k), task_map="unroll"
    )

    def per_task_unroll(params, x, ys):
        task_losses, grads = unrolled_fn(params, x, ys)
        return tx_new.update(grads, tx_new.init(params), params, task_losses=task_losses)[0]

    labels = mtl.sharing.task_specific_leaves(task_specific, params)
    tx_jac = optax.chain(mtl.shared_rows(mtl.aggregation.mean(), labels), sgd)
    jac_fn = mtl.value_and_grads(losses)

    def jacobian(params, x, ys):
        task_losses, jac = jac_fn(params, x, ys)
        grads = sum_specific_rows(jac, labels)
        return tx_jac.update(grads, tx_jac.init(params), params, task_losses=task_losses)[0]

    # encoder = the per-task body; its output z[t] feeds head t; heads stacked under one vmap
    tx_enc = optax.chain(mtl.shared_rows(mtl.aggregation.mean(), labels["body"]), sgd)

    def trunk_and_heads(params, x, ys):
        # TrunkAndHeads gives every head the same z; the per-task body returns [K, B, H],
        # so each head picks its stream: z[t] via a one-hot of the task index (heads are vmapped)
        onehot = jnp.eye(k)

        def head(hp_and_t, z, y):
            hp, e = hp_and_t
            return head_loss(hp, jnp.tensordot(e, z, axes=1), y)

        fn = mtl.value_and_grads(mtl.TrunkAndHeads(lambda p, x: encode(p, x), head))
        task_losses, grads = fn(
            {"trunk": params["body"], "heads": (params["heads"], onehot)}, x, ys
        )
        enc_jac, head_grads = grads["trunk"], grads["heads"]
        enc_grads = sum_specific_rows(enc_jac, labels["body"])
        enc_upd = tx_enc.update(
            enc_grads, tx_enc.init(params["body"]), params["body"], task_losses=task_losses
        )[0]
        head_upd = sgd.update(head_grads[0], sgd.init(params["heads"]), params["heads"])[0]
        return {"body": enc_upd, "heads": head_upd}

    variants = {
        "grads_tree": grads_tree,
        "per_task": per_task,
        "per_task[unroll]": per_task_unroll,
        "jacobian": jacobian,
        "trunk_and_heads": trunk_and_heads,
    }
    return variants, (params, x, ys)


def measure(variants: dict[str, Callable], args: tuple, repeats: int) -> dict[str, tuple]:
    """``{name: (median ms, temp + output bytes)}``; the variants timed in interleaved rounds."""
    compiled = {name: jax.jit(fn).lower(*args).compile() for name, fn in variants.items()}
    mems = {}
    for name, c in compiled.items():
        mem = compiled_memory(c)
        mems[name] = mem.temp + mem.output if mem.temp >= 0 else -1
    runners = {name: (lambda c=c: c(*args)) for name, c in compiled.items()}
    med = median_ms(interleaved_ms(runners, repeats))
    return {name: (med[name], mems[name]) for name in variants}


def check_equal(variants: dict[str, Callable], args: tuple) -> None:
    """All three paths give the same updates (mean aggregator)."""
    ref = jax.jit(variants["grads_tree"])(*args)
    for fn in variants.values():
        out = jax.jit(fn)(*args)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), out, ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--in-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-check", action="store_true", help="skip the equality check")
    args = parser.parse_args()
    print(machine_line("grads_tree"))
    print(
        f"# D={args.in_dim} H={args.hidden} C={args.classes} B={args.batch}, "
        f"median of {args.repeats}"
    )
    header = f"{'K':>3} {'variant':<24} {'ms':>9} {'x time':>7} {'MiB':>9} {'x mem':>7}"
    print(header)
    print("-" * len(header))
    for k in args.ks:
        variants, fn_args = make_variants(k, args.in_dim, args.hidden, args.classes, args.batch)
        if not args.no_check:
            check_equal(variants, fn_args)
        results = measure(variants, fn_args, args.repeats)
        base_ms, base_mem = results["grads_tree"]
        for name, (ms, mem) in results.items():
            print(
                f"{k:>3} {name:<24} {ms:>9.2f} {ms / base_ms:>7.2f} {mem / 2**20:>9.1f} "
                f"{mem / base_mem:>7.2f}"
            )


if __name__ == "__main__":
    main()
