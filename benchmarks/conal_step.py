"""CoNAL search step vs one joint-training step of the all-shared model: median ms and ratios.

Backbones (B blocks, each one Flax Linen module, P = B + 1 branch points):

* ``mlp``: 784 -> 256 -> 256 -> 256 -> 256 (Dense + ReLU per block, B = 4), batch 128;
* ``conv`` (``--conv``): three 3x3 conv blocks (16, 32, 32 channels, stride 2, ReLU) on
  28x28x1, then a mean pool in the loss, batch 64.

Each task has a linear head (stacked ``[K, D, 10]``), softmax cross-entropy. Rows (one jitted
step each, the optimizer update included):

* ``joint``: the all-shared model (the same B blocks once, the K heads), ``jax.value_and_grad``
  of the summed loss, Adam. The baseline of every ratio.
* ``search[stream]``: :func:`mtl_jax.conal.make_search` with the default config (nocl on):
  architecture step (forward + backward on the held-out batch) then weight step (forward, the
  summed-loss pullback for private copies and heads, the K-row pullback of the shared blocks, nocl
  per block, clip + Adam); one shared pass plus one private pass per task in each forward.
* ``search[stream,no-nocl]``: the same with ``nocl=False`` (no Jacobian rows).
* ``search[paths]``: the exact P-path mixture (``B (B + 1) / 2`` private block evaluations per
  task per forward).
* ``search[stream,scan]`` / ``search[stream,unroll]``: ``search[stream]`` with
  ``Supernet(task_map="scan" | "unroll")``: the K private copies run in a ``lax.map`` loop, or
  as K calls in the traced program, instead of one vmapped call (vmapped per-task convolution
  kernels become grouped convolutions, whose gradients XLA:CPU runs very slowly).
* ``retrain[vmap|scan|unroll]``: :func:`mtl_jax.conal.make_retrain` on a discretised tree (task t
  branches at ``t mod (B + 1)``), UPGrad per parameter unit
  (:func:`mtl_jax.conal.unit_aggregation`), Adam; ``task_map`` maps the K backward passes through
  the trunk that give its Jacobian rows.

Timing: every step is compiled first, then rounds run the variants in shuffled order, each
variant ``--inner`` steps per round (blocking on the result); the table reports the median over
rounds of ms per step, and ratios against ``joint`` measured in the same run.

``--synthetic`` instead prints the controlled-conflict table (the construction of
``tests/test_conal.py``): two tasks ``y_k = sign_k sin(x a)`` read out by one fixed vector from the
task's encoder feature, three Dense(16)+tanh blocks (P = 4, branch point 3 = fully shared), 300
search steps (weight Adam 3e-3, alpha Adam 3e-2, batches of 64), 4 seeds vmapped in one program;
agreeing signs (+1, +1) vs conflicting (+1, -1), nocl on and off, both mixings. Columns: the
argmax branch points per seed, the mean over seeds of the softmax-expected branch point
``E[p]`` per task, and the share of steps in which each shared block's task gradients conflicted.

Usage::

  python benchmarks/conal_step.py                 # MLP at K = 2 and 10
  python benchmarks/conal_step.py --ks 2 --conv   # + the conv backbone
  python benchmarks/conal_step.py --synthetic     # the controlled-conflict table
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _timing import interleaved_ms, machine_line, median_ms

import mtl_jax as mtl
from mtl_jax import conal


class DenseBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(self.width)(x))


class ConvBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (3, 3), strides=(2, 2))(x))


def backbone(kind: str) -> tuple[list[conal.Block], tuple[int, ...], int]:
    if kind == "mlp":
        return [conal.linen_block(DenseBlock(256)) for _ in range(4)], (128, 784), 256
    return [conal.linen_block(ConvBlock(c)) for c in (16, 32, 32)], (64, 28, 28, 1), 32


def make_loss(kind: str):
    def loss_fn(heads, feats, y):  # feats [K, N, ...], heads [K, D, 10], y int [K, N]
        if kind == "conv":
            feats = feats.mean(axis=(2, 3))
        logits = jnp.einsum("knd,kdc->knc", feats, heads)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(axis=1)

    return loss_fn


def joint_step_fn(blocks, loss_fn, k):
    tx = optax.adam(1e-4)

    def forward(params, x):
        s = x
        for block, p in zip(blocks, params["shared"], strict=True):
            s, _ = block.apply(p, {}, s, True)
        return jnp.broadcast_to(s, (k, *s.shape))

    def step(params, opt, batch):
        x, y = batch

        def loss(params):
            return jnp.sum(loss_fn(params["heads"], forward(params, x), y))

        value, grads = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, upd), opt, value

    return tx, jax.jit(step)


def bench(kind: str, k: int, rounds: int, inner: int) -> list[tuple[str, float]]:
    blocks, x_shape, width = backbone(kind)
    loss_fn = make_loss(kind)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, x_shape)
    y = jax.random.randint(key, (k, x_shape[0]), 0, 10)
    batch = (x, y)
    heads = 0.01 * jax.random.normal(key, (k, width, 10))
    runners = {}

    # joint training of the all-shared model (same blocks)
    sn = conal.Supernet(blocks, k)
    params, _ = sn.init(key, x)
    joint = {"shared": params["shared"], "heads": heads}
    tx, jstep = joint_step_fn(blocks, loss_fn, k)
    jstate = [joint, tx.init(joint)]

    def run_joint():
        p, o, v = jstep(jstate[0], jstate[1], batch)
        jstate[0], jstate[1] = p, o
        return v

    runners["joint"] = run_joint

    variants = {
        "search[stream]": ("stream", "vmap", conal.SearchConfig()),
        "search[stream,no-nocl]": ("stream", "vmap", conal.SearchConfig(nocl=False)),
        "search[paths]": ("paths", "vmap", conal.SearchConfig()),
        "search[stream,scan]": ("stream", "scan", conal.SearchConfig()),
        "search[stream,unroll]": ("stream", "unroll", conal.SearchConfig()),
    }
    for name, (mixing, task_map, cfg) in variants.items():
        sn = conal.Supernet(blocks, k, mixing=mixing, task_map=task_map)
        search = conal.make_search(sn, loss_fn, cfg)
        st = [search.init(key, x, heads)]
        step = jax.jit(search.step)

        def run(step=step, st=st):
            st[0], m = step(st[0], batch, batch)
            return m["train_losses"]

        runners[name] = run

    runners.update(retrain_runners(blocks, kind, k, params, x, y, heads))
    med = median_ms(interleaved_ms(runners, rounds, inner))  # compiles in the warm-up call
    return list(med.items())


def retrain_runners(blocks, kind, k, supernet_params, x, y, heads) -> dict:
    """One runner per task map: the retrain step of the tree where task t branches at
    ``t mod (B + 1)`` (weights inherited from the supernet)."""
    nb = len(blocks)
    arch = conal.Architecture(tuple(t % (nb + 1) for t in range(k)), nb)

    def head(v, z, train):
        return (z.mean(axis=(1, 2)) if kind == "conv" else z) @ v

    tree = conal.TreeModel(blocks, arch, {f"t{t}": head for t in range(k)})
    params = {
        **conal.inherit_params(supernet_params, arch),
        "heads": {f"t{t}": heads[t] for t in range(k)},
    }
    state = {
        "trunk": [{}] * arch.trunk_depth,
        "branches": [[{}] * (nb - p) for p, _ in arch.branches()],
    }

    def loss_fn(name, logits, targets):
        labels = targets[int(name[1:])]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.chain(
        conal.unit_aggregation(tree, lambda n: mtl.aggregation.upgrad()), optax.adam(1e-4)
    )
    runners = {}
    for task_map in ("vmap", "scan", "unroll"):
        retrain = conal.make_retrain(tree, loss_fn, tx, task_map=task_map)
        st = [retrain.init(params, state)]
        step = jax.jit(retrain.step)

        def run(step=step, st=st):
            st[0], out = step(st[0], x, y)
            return out["losses"]

        runners[f"retrain[{task_map}]"] = run
    return runners


class Tanh(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.width)(x))


def synthetic(signs, nocl: bool, mixing: str, seeds=4, steps=300, width=16, nb=3):
    """Runs the controlled-conflict search for ``seeds`` seeds; returns alpha ``[R, K, P]`` and
    the per-block conflict rate ``[R, B]``."""
    k = len(signs)
    sn = conal.Supernet([conal.linen_block(Tanh(width)) for _ in range(nb)], k, mixing=mixing)
    a = jax.random.normal(jax.random.PRNGKey(100), (8,))
    sign = jnp.asarray(signs, jnp.float32)
    r = jnp.ones((width,)) / jnp.sqrt(width)

    def loss_fn(heads, feats, y):
        return jnp.mean((feats @ r - y) ** 2, axis=1)

    def data(key):
        x = jax.random.normal(key, (64, 8))
        return x, sign[:, None] * jnp.sin(x @ a)[None]

    cfg = conal.SearchConfig(weight_lr=3e-3, arch_lr=3e-2, nocl=nocl, track_conflict=True)
    search = conal.make_search(sn, loss_fn, cfg)

    def run(seed):
        st = search.init(jax.random.fold_in(jax.random.PRNGKey(0), seed), jnp.zeros((8, 8)))

        def body(st, key):
            k1, k2 = jax.random.split(key)
            st, m = search.step(st, data(k1), data(k2))
            return st, m["shared_conflict"]

        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), seed), steps)
        st, conflicts = jax.lax.scan(body, st, keys)
        return st.params["alpha"], conflicts.mean(0)

    return jax.jit(jax.vmap(run))(jnp.arange(seeds))


def synthetic_table() -> None:
    print(
        f"{'mixing':<7} {'signs':<8} {'nocl':<5} {'argmax branch points (4 seeds)':<34} "
        f"{'mean E[p]':<12} conflict rate per shared block"
    )
    for mixing in ("stream", "paths"):
        for signs, nocl in [((1, 1), True), ((1, 1), False), ((1, -1), True), ((1, -1), False)]:
            alpha, conflicts = synthetic(signs, nocl, mixing)
            bps = " ".join(str(conal.discretise(x)) for x in alpha)
            w = jax.nn.softmax(alpha, axis=-1)
            ep = (w * jnp.arange(alpha.shape[-1])).sum(-1).mean(0)
            print(
                f"{mixing:<7} {signs!s:<8} {'on' if nocl else 'off':<5} {bps:<34} "
                f"{' '.join(f'{v:.2f}' for v in ep):<12} "
                + " ".join(f"{v:.2f}" for v in conflicts.mean(0))
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--conv", action="store_true", help="also the conv backbone")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--synthetic", action="store_true", help="controlled-conflict table")
    args = parser.parse_args()
    if args.synthetic:
        synthetic_table()
        return
    print(machine_line("conal_step"))
    kinds = ["mlp"] + (["conv"] if args.conv else [])
    print(f"{'backbone':<8} {'K':>3} {'step':<24} {'median ms':>10} {'x joint':>8}")
    for kind in kinds:
        for k in args.ks:
            rows = bench(kind, k, args.rounds, args.inner)
            base = dict(rows)["joint"]
            for name, ms in rows:
                print(f"{kind:<8} {k:>3} {name:<24} {ms:>10.2f} {ms / base:>8.2f}")


if __name__ == "__main__":
    main()
