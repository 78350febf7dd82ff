"""A two-task regression with conflicting tasks, trained with mean, PCGrad, MGDA and CAGrad.

The shared trunk feeds two heads whose targets depend on overlapping, partly opposed directions
of the input, so the tasks' gradients on the trunk conflict. Each aggregator is chained in front
of Adam; the script prints the final test losses and the conflict incidence p% (share of steps
whose trunk gradients have negative cosine) per method, all from the same seeds.

    python examples/two_task_pcgrad.py [--steps 300]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_jax as mtl


def make_data(seed: int, n: int = 512, dim: int = 16):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=dim)
    v = -0.6 * u + 0.8 * rng.normal(size=dim)  # partly opposed task directions
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = np.stack([np.tanh(x @ u / 4), np.tanh(x @ v / 4) + 0.3 * np.sin(x[:, 0])], axis=0)
    return jnp.asarray(x), jnp.asarray(y[..., None].astype(np.float32))


def init_params(seed: int, dim: int = 16, hidden: int = 32, num_tasks: int = 2):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "shared": {
            "w1": jax.random.normal(k1, (dim, hidden)) / np.sqrt(dim),
            "w2": jax.random.normal(k2, (hidden, hidden)) / np.sqrt(hidden),
        },
        "heads": jax.random.normal(k3, (num_tasks, hidden, 1)) / np.sqrt(hidden),
    }


def task_losses(params, x, y):
    z = jnp.tanh(jnp.tanh(x @ params["shared"]["w1"]) @ params["shared"]["w2"])
    preds = jnp.einsum("bh,kho->kbo", z, params["heads"])
    return jnp.mean((preds - y) ** 2, axis=(1, 2))


def train(method: str, steps: int, seed: int):
    x, y = make_data(seed)
    x_test, y_test = make_data(seed + 1000)
    params = init_params(seed)
    is_head = {"shared": {"w1": False, "w2": False}, "heads": True}
    tx = optax.chain(
        mtl.shared_rows(mtl.get_method(method, num_tasks=2).transform, is_head),
        optax.adam(3e-3),
    )
    grad_fn = mtl.value_and_grads(task_losses, is_head)  # shared: rows [K, ...]; heads: gradient
    tracker = mtl.ConflictTracker(num_tasks=2)

    @jax.jit
    def step(params, opt_state, cstate):
        losses, grads = grad_fn(params, x, y)
        cstate = tracker.update(cstate, grads["shared"])
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, cstate

    opt_state, cstate = tx.init(params), tracker.init(params["shared"])
    for _ in range(steps):
        params, opt_state, cstate = step(params, opt_state, cstate)
    test = np.asarray(task_losses(params, x_test, y_test))
    incidence = float(tracker.mean_incidence(cstate)["global"])
    return test, incidence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print("| method | test loss task 1 | test loss task 2 | conflict incidence p% |")
    print("|---|---|---|---|")
    for method in ("mean", "pcgrad", "mgda", "cagrad"):
        runs = [train(method, args.steps, s) for s in args.seeds]
        losses = np.mean([r[0] for r in runs], axis=0)
        incidence = np.mean([r[1] for r in runs])
        print(f"| {method} | {losses[0]:.4f} | {losses[1]:.4f} | {incidence:.1f} |", flush=True)


if __name__ == "__main__":
    main()
