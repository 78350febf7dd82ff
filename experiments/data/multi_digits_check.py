"""Checks that ``multi_digits`` is learnable and has measurable gradient conflict.

Trains a small MLP (flatten -> 256 -> 128 shared trunk, ReLU; one 128 -> 10 head per task) with
plain mean aggregation of the task Jacobian (``mtl.aggregation.mean``; or ``--methods mean pcgrad ...``) and
Adam, and reports per seed:

* the conflict incidence: the share of steps at which the two tasks' gradients on the shared
  trunk have a negative cosine (``mtl.conflict.conflict_incidence(mtl.gramian.gramian(jac))``), and the mean
  cosine;
* the test accuracy of each task (chance is 10%).

The data are fixed by the config's ``split_seed`` (default 0); ``--seeds`` vary the
initialisation and the batch order, as the runner does when it compares methods.

    python -m experiments.data.multi_digits_check [--steps 2000] [--seeds 0 1 2]
    python -m experiments.data.multi_digits_check --canvas_size 14 --max_shift 2   # other canvases

Not a test: it takes about a minute on 2 CPU cores. The numbers are quoted in the data report.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_jax as mtl
from experiments.data import batches, default_dataset_config, make_dataset


def _init_mlp(key: jax.Array, in_dim: int, num_tasks: int) -> dict:
    """He-initialised ``{"trunk": {dense0: in->256, dense1: 256->128}, "heads": [128->10] * K}``."""
    sizes = [(in_dim, 256), (256, 128)]
    keys = jax.random.split(key, len(sizes) + num_tasks)

    def dense(k, n_in, n_out):
        return {
            "w": jax.random.normal(k, (n_in, n_out)) * np.sqrt(2.0 / n_in),
            "b": jnp.zeros(n_out),
        }

    trunk = {f"dense{i}": dense(keys[i], *s) for i, s in enumerate(sizes)}
    heads = [dense(keys[len(sizes) + t], 128, 10) for t in range(num_tasks)]
    return {"trunk": trunk, "heads": heads}


def _trunk(params: dict, x: jax.Array) -> jax.Array:
    """``x: [B, H, W, C]`` -> shared representation ``[B, 128]`` (ReLU after both layers)."""
    h = x.reshape(x.shape[0], -1)
    for name in sorted(params):
        h = jax.nn.relu(h @ params[name]["w"] + params[name]["b"])
    return h


def _logits(params: dict, x: jax.Array) -> list[jax.Array]:
    """One ``[B, 10]`` logit array per task head."""
    z = _trunk(params["trunk"], x)
    return [z @ head["w"] + head["b"] for head in params["heads"]]


def run(
    config, steps: int, seed: int, method: str = "mean", batch_size: int = 128, lr: float = 1e-3
) -> dict:
    """Trains one seed with aggregator ``method``; returns incidence %, mean cos, test accuracies."""
    start = time.perf_counter()
    data = make_dataset(config)
    names = data.task_names

    def task_losses(params, batch):
        return jnp.stack(
            [
                optax.softmax_cross_entropy_with_integer_labels(logits, batch[name]).mean()
                for logits, name in zip(_logits(params, batch["image"]), names, strict=True)
            ]
        )

    params = _init_mlp(jax.random.PRNGKey(seed), int(np.prod(data.input_shape)), len(names))
    is_head = {
        "trunk": jax.tree.map(lambda _: False, params["trunk"]),
        "heads": [True] * len(names),
    }
    tx = optax.chain(
        mtl.shared_rows(mtl.get_method(method, num_tasks=len(names)).transform, is_head),
        optax.adam(lr),
    )
    grad_fn = mtl.value_and_grads(task_losses, is_head)  # trunk: rows [K, ...]; heads: gradient
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        losses, grads = grad_fn(params, batch)
        gram = mtl.gramian.gramian(grads["trunk"])
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        stats = (mtl.conflict.conflict_incidence(gram), mtl.conflict.mean_pairwise_cosine(gram))
        return optax.apply_updates(params, updates), opt_state, stats

    incidences, cosines, epoch, done = [], [], 0, 0
    while done < steps:
        for batch in batches(data.train, batch_size, seed=seed, epoch=epoch):
            params, opt_state, (inc, cos) = step(params, opt_state, batch)
            incidences.append(inc)
            cosines.append(cos)
            done += 1
            if done == steps:
                break
        epoch += 1

    correct = np.zeros(len(names))
    for batch in batches(data.test, 500, seed=0, epoch=0, shuffle=False, drop_remainder=False):
        logits = _logits(params, jnp.asarray(batch["image"]))
        correct += [
            np.sum(np.argmax(lg, -1) == batch[n]) for lg, n in zip(logits, names, strict=True)
        ]
    return {
        "incidence": float(np.mean(np.asarray(incidences)) if incidences else 0.0),
        "mean_cos": float(np.mean(np.asarray(cosines))),
        "accuracy": dict(zip(names, (correct / len(data.test)).tolist(), strict=True)),
        "seconds": time.perf_counter() - start,
        "epochs": epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["mean"])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--canvas_size", type=int, default=None)
    parser.add_argument("--max_shift", type=int, default=None)
    parser.add_argument("--num_train", type=int, default=None)
    args = parser.parse_args()
    config = default_dataset_config("multi_digits")
    for key in ("canvas_size", "max_shift", "num_train"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    print(f"multi_digits {dict(config)}; MLP 256-128 shared, Adam 1e-3, batch {args.batch_size}")
    print(
        "| method | seed | steps | conflict incidence % | mean cos | acc left % | acc right % | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        for seed in args.seeds:
            r = run(config, args.steps, seed, method, args.batch_size)
            acc = r["accuracy"]
            print(
                f"| {method} | {seed} | {args.steps} | {r['incidence']:.1f} | {r['mean_cos']:.3f} | "
                f"{100 * acc['left']:.1f} | {100 * acc['right']:.1f} | {r['seconds']:.0f} |"
            )


if __name__ == "__main__":
    main()
