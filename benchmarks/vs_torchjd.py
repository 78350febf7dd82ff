"""Our Jacobian step against TorchJD's, in ONE run: interleaved rounds, medians, ratios (issue 25).

MLP table (``--mlp``, default): trunk 784-512-512-256 (ReLU), K heads 256-64-10, batch 256,
cross-entropy, PCGrad + SGD, at ``--ks`` (default 2, 10, 40). Variants:

* ``trunk_and_heads``: ``mtl.value_and_grads(mtl.TrunkAndHeads(trunk, head_loss))``;
* ``loss_vector``: the README's path, ``mtl.value_and_grads(task_losses, {"trunk": False,
  "heads": True})`` with the K heads stacked under one ``vmap`` (differentiated at its cut,
  ``mtl_jax/cut.py``);
* ``loss_vector[scan]``: the same with ``task_map="scan"`` (the K trunk pullbacks in a loop);
* ``gramian`` / ``gramian[scan]``: the same loss vector through the Gramian engine below the
  cut (``value_and_grads(..., gramian=mtl.autogram.GramianWeighting("pcgrad"))``,
  ``mtl_jax/autogram/at_cut.py``): one trunk forward, the heads by one backward, the trunk's G
  from per-layer activations and cotangents, PCGrad's weights from G, ONE weighted backward; no
  K x P rows. The recommended path for a Gram-space method (README);
* ``loss_vector_plain``: the same loss vector by the pre-cut algorithm (K pullbacks of the whole
  loss vector: ``[K, K, batch, 64]`` cotangents in the heads), the "before" of issue 25;
* ``torchjd``: TorchJD ``mtl_backward(losses, features=z)`` + ``jac_to_grad(trunk params,
  PCGrad())`` + ``torch.optim.SGD`` on the same model (``benchmarks/_torchjd_step.py``, run in
  TorchJD's own virtual environment, ``benchmarks/_torchjd.py``);
* ``rows_minimal``: a hand-written PCGrad step for this MLP in plain JAX (``minimal_rows_grads``):
  the floor of a rows step at K = 2, where every exact path does the rows' work (at K = 40 it is
  slower than the library's paths);
* ``joint`` / ``torch joint``: one backward of the summed loss + SGD in each library: how
  fast each runs the same matmuls (at K = 2 every exact path does the work of ~2 backward
  passes, so ``joint / torch joint`` bounds what a ratio to TorchJD can be there).

Conv table (``--conv``): ``small_resnet`` (experiments/models/small_resnet.py: widths 8-16-32,
BatchNorm in training mode, fc 32) on ``[128, 16, 16, 1]``, K = 3 linear heads: ``joint`` (one
backward of the summed loss) and ``jac+upgrad`` (``TrunkAndHeads`` with ``task_map`` vmap and
unroll) against the same network in PyTorch (``joint``, ``mtl_backward`` + ``UPGrad``). XLA
flags go through the environment: ``XLA_FLAGS=... python benchmarks/vs_torchjd.py --conv``.

Each round runs every variant ``--inner`` steps in a fresh random order; TorchJD's steps are
timed inside its process (no pipe overhead). Prints ``uptime`` before and after.

Usage::

  python benchmarks/vs_torchjd.py                       # MLP, K = 2, 10, 40
  python benchmarks/vs_torchjd.py --ks 2 --repeats 5 --no-mlp --conv
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import _checkout  # noqa: F401  (puts the checkout on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _steps import HEADS
from _timing import machine_line
from _torchjd import torchjd_python
from step_time import head_loss, make_problem

import mtl_jax as mtl


class TorchSide:
    """The ``_torchjd_step.py`` server in TorchJD's virtual environment."""

    def __init__(self, threads: int | None):
        import os

        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        script = os.path.join(os.path.dirname(__file__), "_torchjd_step.py")
        self.proc = subprocess.Popen(
            [torchjd_python(), script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def plain_loss_vector_grads(loss_fn, task_specific):
    """The pre-cut algorithm: K pullbacks of the whole loss vector (``[K, K, ...]`` after the
    first task-specific leaf), one pullback of the all-ones cotangent for the heads."""

    def fn(params, *args):
        treedef = jax.tree.structure(params)
        labels = jax.tree.leaves(mtl.sharing.task_specific_leaves(task_specific, params))
        losses, pull = jax.vjp(lambda p: loss_fn(p, *args), params)
        rows = jax.vmap(lambda c: jax.tree.leaves(pull(c)[0]))(jnp.eye(losses.shape[0]))
        total = jax.tree.leaves(pull(jnp.ones_like(losses))[0])
        out = [t if s else r for r, t, s in zip(rows, total, labels, strict=True)]
        return losses, treedef.unflatten(out)

    return fn


def minimal_rows_grads(num_tasks: int):
    """A hand-written PCGrad step for THIS MLP in plain JAX, no library path: forward, the
    heads' losses, their all-ones backward and ``d loss_k / d z``, K masked pullbacks of the
    trunk, each layer's K weight rows as one batched GEMM ``x^T delta_k``, G, PCGrad's weights
    (``mtl.weighting``), the rows combined: the ``rows_minimal`` column."""
    pcgrad = mtl.weighting.get_weighting("pcgrad")

    def fn(params, x, y, key):
        layers, acts, pre = params["trunk"], [x], []
        for layer in layers:
            pre.append(acts[-1] @ layer["w"] + layer["b"])
            acts.append(jax.nn.relu(pre[-1]))
        heads = lambda h, z: jax.vmap(head_loss, in_axes=(0, None, 0))(h, z, y)
        losses, pull = jax.vjp(heads, params["heads"], acts[-1])
        head_grads = pull(jnp.ones_like(losses))[0]
        delta = jax.vmap(lambda e: pull(e)[1])(jnp.eye(num_tasks))  # [K, B, 256]
        rows, gram = [None] * len(layers), jnp.zeros((num_tasks, num_tasks))
        for i in reversed(range(len(layers))):
            delta = jnp.where(pre[i] > 0, delta, 0.0)
            a = jnp.broadcast_to(acts[i], (num_tasks, *acts[i].shape))
            rw = jax.lax.dot_general(a, delta, (((1,), (1,)), ((0,), (0,))))  # [K, C, F]
            rb = jnp.sum(delta, axis=1)
            rows[i] = (rw, rb)
            flat = jnp.reshape(rw, (num_tasks, -1))
            gram = gram + flat @ flat.T + rb @ rb.T
            if i:
                delta = jnp.einsum("kbf,cf->kbc", delta, layers[i]["w"])
        w, _ = pcgrad.weigh(gram, pcgrad.init(num_tasks), key, losses)
        trunk = [{"w": jnp.tensordot(w, rw, 1), "b": w @ rb} for rw, rb in rows]
        return losses, {"trunk": trunk, "heads": head_grads}

    return fn


def jax_step(grads_fn, aggregator, lr: float = 1e-3):
    tx = optax.chain(mtl.shared_rows(aggregator, HEADS), optax.sgd(lr))

    @jax.jit
    def step(params, state, x, y):
        losses, grads = grads_fn(params, x, y)
        updates, state = tx.update(grads, state, params, task_losses=losses)
        return optax.apply_updates(params, updates), state

    return tx.init, step


def gramian_step(grads_fn, lr: float = 1e-3):
    """``value_and_grads(..., gramian=...)``: the weighted gradient directly, then SGD; the key
    of PCGrad's random order is split every step, as the transform's state does."""
    tx = optax.sgd(lr)

    def init(params):
        return tx.init(params), jax.random.key(0)

    @jax.jit
    def step(params, state, x, y):
        opt_state, key = state
        key, sub = jax.random.split(key)
        _, grads = grads_fn(params, x, y, key=sub)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), (opt_state, key)

    return init, step


def joint_step(summed_loss, lr: float = 1e-3):
    tx = optax.sgd(lr)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(summed_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return tx.init, step


def runner(init, step, params, x, y):
    box = [params, init(params)]

    def run(inner: int) -> float:
        start = time.perf_counter()
        for _ in range(inner):
            box[0], box[1] = step(box[0], box[1], x, y)
        jax.block_until_ready(box)
        return 1e3 * (time.perf_counter() - start) / inner

    run(1)  # compile
    run(1)
    return run


def interleave(jax_runs: dict, torch: TorchSide, torch_names: list[str], rounds, inner, seed=0):
    names = [*jax_runs, *torch_names]
    times = {n: [] for n in names}
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        for n in order:
            if n in jax_runs:
                times[n].append(jax_runs[n](inner))
            else:
                times[n].append(torch.ask(cmd="run", name=n, inner=inner)["ms"])
    return {n: statistics.median(v) for n, v in times.items()}


def mlp_table(torch: TorchSide, ks, rounds, inner) -> None:
    names = [
        "trunk_and_heads",
        "loss_vector",
        "loss_vector[scan]",
        "gramian",
        "gramian[scan]",
        "loss_vector_plain",
        "rows_minimal",
    ]
    print(
        "| K | "
        + " | ".join(f"{n} ms" for n in names)
        + " | TorchJD ms | "
        + " | ".join(f"{n} / TorchJD" for n in names)
        + " | joint ms | torch joint ms | joint / torch joint |"
    )
    print("|---|" + "---|" * (2 * len(names) + 4))
    for k in ks:
        trunk_fn, params, x, y = make_problem("mlp", k)

        def task_losses(p, x, y, trunk_fn=trunk_fn):
            z = trunk_fn(p["trunk"], x)
            return jax.vmap(head_loss, in_axes=(0, None, 0))(p["heads"], z, y)

        pcgrad = mtl.get_method("pcgrad", num_tasks=k, seed=0).transform
        fns = {
            "trunk_and_heads": mtl.value_and_grads(mtl.TrunkAndHeads(trunk_fn, head_loss)),
            "loss_vector": mtl.value_and_grads(task_losses, HEADS),
            "loss_vector[scan]": mtl.value_and_grads(task_losses, HEADS, task_map="scan"),
            "loss_vector_plain": plain_loss_vector_grads(task_losses, HEADS),
        }
        runs = {n: runner(*jax_step(f, pcgrad), params, x, y) for n, f in fns.items()}
        summed = lambda p, x, y, f=task_losses: jnp.sum(f(p, x, y))
        runs["joint"] = runner(*joint_step(summed), params, x, y)
        for task_map, name in (("vmap", "gramian"), ("scan", "gramian[scan]")):
            engine = mtl.value_and_grads(
                task_losses,
                HEADS,
                gramian=mtl.autogram.GramianWeighting("pcgrad"),
                task_map=task_map,
            )
            runs[name] = runner(*gramian_step(engine), params, x, y)
        runs["rows_minimal"] = runner(*gramian_step(minimal_rows_grads(k)), params, x, y)
        tname, jname = f"torchjd-mlp-{k}", f"torch-joint-mlp-{k}"
        torch.ask(cmd="setup", name=tname, model="mlp", K=k, mode="jd", batch=256)
        torch.ask(cmd="setup", name=jname, model="mlp", K=k, mode="joint", batch=256)
        med = interleave(runs, torch, [tname, jname], rounds, inner)
        t = med[tname]
        cells = [f"{med[n]:.1f}" for n in names] + [f"{t:.1f}"]
        cells += [f"{med[n] / t:.2f}" for n in names]
        cells += [f"{med['joint']:.1f}", f"{med[jname]:.1f}", f"{med['joint'] / med[jname]:.2f}"]
        print(f"| {k} | " + " | ".join(cells) + " |", flush=True)


def conv_problem(num_tasks: int, batch: int = 128):
    from experiments.models.small_resnet import SmallResNetEncoder

    encoder = SmallResNetEncoder((8, 16, 32), 32)
    kx, ky, ke, kh = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(kx, (batch, 16, 16, 1))
    y = jax.random.randint(ky, (num_tasks, batch), 0, 10)
    variables = encoder.init(ke, x[:2], train=False)
    stats = variables["batch_stats"]

    def encode(trunk, x):
        z, _ = encoder.apply(
            {"params": trunk, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return z

    def linear_head_loss(head, z, y):
        logits = z @ head["w"] + head["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    heads = {
        "w": jax.random.normal(kh, (num_tasks, 32, 10)) / np.sqrt(32),
        "b": jnp.zeros((num_tasks, 10)),
    }
    return encode, linear_head_loss, {"trunk": variables["params"], "heads": heads}, x, y


def conv_table(torch: TorchSide, rounds, inner, precision: str | None) -> None:
    k = 3
    encode, loss_of_head, params, x, y = conv_problem(k)

    def summed(p, x, y):
        z = encode(p["trunk"], x)
        return jnp.sum(jax.vmap(loss_of_head, in_axes=(0, None, 0))(p["heads"], z, y))

    upgrad = mtl.get_method("upgrad", num_tasks=k).transform
    model = mtl.TrunkAndHeads(encode, loss_of_head)
    runs = {"jax joint": runner(*joint_step(summed), params, x, y)}
    for task_map in ("vmap", "unroll"):
        fn = mtl.value_and_grads(model, task_map=task_map)
        runs[f"jax jac+upgrad [{task_map}]"] = runner(*jax_step(fn, upgrad), params, x, y)
    torch.ask(cmd="setup", name="torch joint", model="conv", K=k, mode="joint", batch=128)
    torch.ask(
        cmd="setup",
        name="torchjd jac+upgrad",
        model="conv",
        K=k,
        mode="jd",
        batch=128,
        aggregator="upgrad",
    )
    med = interleave(runs, torch, ["torch joint", "torchjd jac+upgrad"], rounds, inner)
    print(f"# small_resnet, batch 128, 16x16x1, K = {k}; matmul precision {precision}")
    print("| step | median ms | x PyTorch counterpart |")
    print("|---|---|---|")
    for name, ms in med.items():
        ref = med["torch joint"] if "joint" in name else med["torchjd jac+upgrad"]
        print(f"| {name} | {ms:.1f} | {ms / ref:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--conv", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--inner", type=int, default=3, help="steps per round")
    parser.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS")
    parser.add_argument(
        "--precision", default=None, help="jax.default_matmul_precision for the conv table"
    )
    args = parser.parse_args()
    print(machine_line("vs_torchjd"))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    torch = TorchSide(args.torch_threads)
    print("torch side:", torch.ask(cmd="info"))
    try:
        if args.mlp:
            mlp_table(torch, args.ks, args.repeats, args.inner)
        if args.conv:
            if args.precision:
                with jax.default_matmul_precision(args.precision):
                    conv_table(torch, args.repeats, args.inner, args.precision)
            else:
                conv_table(torch, args.repeats, args.inner, None)
    finally:
        torch.close()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
