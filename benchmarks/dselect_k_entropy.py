"""DSelect-k's entropy regulariser on the embedded multi_digits benchmark: does it make the gates
sparser? Grid fixed in advance: entropy_reg in {0, 1e-6 (LibMTL), 1e-4, 1e-2}, seeds 0-2,
300 steps, batch 64, Adam 3e-3, mean aggregation, default dselect_k config (E=4, k=2, gamma=1).

Prints, per coefficient and seed, the gates' top-expert weight (mean over the test set), the share
of saturated selectors (max r >= 0.99) and the experts used, before and after training, and the
mean test accuracy; BUILD.md ("DSelect-k's entropy regulariser") has the table.

Usage::

  python benchmarks/dselect_k_entropy.py
"""

import sys
import time

import _checkout  # noqa: F401  (the experiment suite runs from the checkout)
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mtl_jax as mtl
from experiments.data import default_dataset_config, make_dataset
from experiments.losses import task_loss
from experiments.models import default_model_config, dselect_k
from experiments.models import nnx_architectures as na

SHAPE = (12, 12, 1)
STEPS = 300
config = default_dataset_config("multi_digits")
config.num_train, config.num_test = 2048, 512
data = make_dataset(config)
tasks = data.tasks
x_tr = jnp.asarray(data.train.arrays["image"], jnp.float32).reshape(-1, *SHAPE)
y_tr = {t.name: jnp.asarray(data.train.arrays[t.name]) for t in tasks}
x_te = jnp.asarray(data.test.arrays["image"], jnp.float32).reshape(-1, *SHAPE)
y_te = {t.name: np.asarray(data.test.arrays[t.name]) for t in tasks}


def gate_stats(model, x):
    z = model.encoder(x)
    top, sat, used = [], [], []
    for head in model.heads:
        q = np.asarray(head.expert_weights(z))  # [B, E]
        r = np.asarray(head.selector_outputs(z))  # [B, k, E]
        top.append(q.max(1).mean())
        sat.append((r.max(-1) >= 0.99).mean())
        # experts with weight >= 0.01 on at least 1% of the examples
        used.append(int(np.sum(np.mean(q >= 0.01, axis=0) >= 0.01)))
    return float(np.mean(top)), float(np.mean(sat)), float(np.mean(used))


def run(reg, seed):
    mc = default_model_config("dselect_k")
    mc.entropy_reg = reg
    linen = dselect_k.build(mc, tasks, SHAPE)
    model = na.from_linen(linen, SHAPE, nnx.Rngs(seed))
    graphdef = nnx.split(model, nnx.Param, ...)[0]

    def losses_fn(params, rest, x, y):
        m = nnx.merge(graphdef, params, rest, copy=True)
        preds, aux = m.with_aux_losses(x)
        ce = jnp.stack([task_loss(t, preds[t.name], y[t.name]) for t in tasks])
        return ce + aux, (nnx.state(m, na.STATE), ce)

    grad_fn = mtl.value_and_grads(losses_fn, na.TASK_SPECIFIC, has_aux=True)
    tx = optax.chain(
        mtl.shared_rows(mtl.get_method("mean", num_tasks=2).transform, na.TASK_SPECIFIC),
        optax.adam(3e-3),
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        _, params, rest = nnx.split(model, nnx.Param, ...)
        (losses, (state, ce)), grads = grad_fn(params, rest, x, y)
        opt.update(model, grads, task_losses=losses)
        nnx.update(model, state)
        return ce

    before = gate_stats(model, x_te)
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        idx = rng.choice(len(x_tr), 64, replace=False)
        ce = step(model, opt, x_tr[idx], {n: v[idx] for n, v in y_tr.items()})
    after = gate_stats(model, x_te)
    preds = model(x_te)
    acc = np.mean([np.mean(np.argmax(preds[t.name], -1) == y_te[t.name]) for t in tasks])
    return before, after, float(acc), np.asarray(ce).tolist()


print("reg seed top_before sat_before used_before top_after sat_after used_after acc", flush=True)
t0 = time.time()
for reg in (0.0, 1e-6, 1e-4, 1e-2):
    rows = []
    for seed in (0, 1, 2):
        (tb, sb, ub), (ta, sa, ua), acc, ce = run(reg, seed)
        rows.append((tb, sb, ub, ta, sa, ua, acc))
        print(
            f"{reg:g} {seed} {tb:.3f} {sb:.3f} {ub:.1f} {ta:.3f} {sa:.3f} {ua:.1f} {acc:.3f}",
            flush=True,
        )
    m = np.mean(rows, axis=0)
    print(f"{reg:g} mean " + " ".join(f"{v:.3f}" for v in m), flush=True)
print(f"total {time.time() - t0:.0f} s", file=sys.stderr)
