"""Flax Linen and NNX models through mtl.value_and_grads (a loss vector, TrunkAndHeads), and
end-to-end training."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_jax as mtl


class LinenTrunk(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        return nn.relu(nn.Dense(8)(x))


class LinenTwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
        z = LinenTrunk(name="trunk")(x)
        return nn.Dense(1, name="head_a")(z)[:, 0], nn.Dense(1, name="head_b")(z)[:, 0]


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    ya = (x @ rng.normal(size=5)).astype(np.float32)
    yb = (-x @ rng.normal(size=5) + np.sin(x[:, 0])).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(ya), jnp.asarray(yb)


def test_linen_jacobian_equals_per_task_grads():
    x, ya, yb = _data()
    model = LinenTwoHeads()
    params = model.init(jax.random.PRNGKey(0), x)

    def losses(params):
        pa, pb = model.apply(params, x)
        return jnp.stack([jnp.mean((pa - ya) ** 2), jnp.mean((pb - yb) ** 2)])

    _, jac = jax.jit(mtl.value_and_grads(losses))(params)
    for t in range(2):
        grad = jax.grad(lambda p, t=t: losses(p)[t])(params)
        jax.tree.map(
            lambda j, g, t=t: np.testing.assert_allclose(j[t], g, rtol=1e-5, atol=1e-7), jac, grad
        )
    # heads' rows of the other task are exactly zero
    assert np.all(jac["params"]["head_a"]["kernel"][1] == 0)


def test_linen_encoder_and_heads_with_trunk_and_heads():
    x, ya, yb = _data()
    trunk, head = LinenTrunk(), nn.Dense(1)
    tp = trunk.init(jax.random.PRNGKey(0), x)
    z0 = trunk.apply(tp, x)
    hps = [head.init(jax.random.PRNGKey(i), z0) for i in (1, 2)]

    def head_loss(hp, z, y):
        return jnp.mean((head.apply(hp, z)[:, 0] - y) ** 2)

    model = mtl.TrunkAndHeads(trunk.apply, [head_loss, head_loss])
    fn = jax.jit(mtl.value_and_grads(model, representation=True))
    (_losses, aux), grads = fn({"trunk": tp, "heads": hps}, x, [ya, yb])
    enc_jac, head_grads, rep_grads = grads["trunk"], grads["heads"], aux["rep_grads"]

    def full(tp, t):
        return head_loss(hps[t], trunk.apply(tp, x), (ya, yb)[t])

    for t in range(2):
        jax.tree.map(
            lambda j, g, t=t: np.testing.assert_allclose(j[t], g, rtol=1e-5, atol=1e-7),
            enc_jac,
            jax.grad(full)(tp, t),
        )
    assert rep_grads.shape == (2, *z0.shape)
    assert len(head_grads) == 2


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.trunk1 = nnx.Linear(5, 16, rngs=rngs)
        self.trunk2 = nnx.Linear(16, 8, rngs=rngs)
        self.head_a = nnx.Linear(8, 1, rngs=rngs)
        self.head_b = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        z = nnx.relu(self.trunk2(nnx.relu(self.trunk1(x))))
        return self.head_a(z)[:, 0], self.head_b(z)[:, 0]


def test_nnx_jacobian_and_pcgrad_step():
    x, ya, yb = _data()
    graphdef, state = nnx.split(NNXModel(nnx.Rngs(0)))

    def losses(state):
        pa, pb = nnx.merge(graphdef, state)(x)
        return jnp.stack([jnp.mean((pa - ya) ** 2), jnp.mean((pb - yb) ** 2)])

    _, jac = jax.jit(mtl.value_and_grads(losses))(state)
    for t in range(2):
        grad = jax.grad(lambda s, t=t: losses(s)[t])(state)
        jax.tree.map(
            lambda j, g, t=t: np.testing.assert_allclose(j[t], g, rtol=1e-5, atol=1e-7), jac, grad
        )

    # by_module groups NNX paths ('trunk1/kernel/value' -> 'trunk1')
    tx = optax.chain(
        mtl.aggregation.pcgrad(granularity=mtl.gramian.by_module, num_tasks=2), optax.adam(1e-2)
    )
    opt_state = tx.init(state)
    updates, opt_state = tx.update(jac, opt_state, state)
    assert set(mtl.aggregation.weights(opt_state)) == {"trunk1", "trunk2", "head_a", "head_b"}
    new_state = optax.apply_updates(state, updates)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize("aggregator", ["plain_pcgrad", "pcgrad", "mgda", "cagrad"])
def test_two_task_model_trained_end_to_end_lowers_both_losses(aggregator):
    x, ya, yb = _data(256)
    model = LinenTwoHeads()
    params = model.init(jax.random.PRNGKey(0), x)
    is_head = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "head" in str(path), p)

    def losses(params):
        pa, pb = model.apply(params, x)
        return jnp.stack([jnp.mean((pa - ya) ** 2), jnp.mean((pb - yb) ** 2)])

    if aggregator == "plain_pcgrad":  # the full Jacobian, heads included in PCGrad
        tx = optax.chain(mtl.aggregation.pcgrad(), optax.adam(1e-2))
        grad_fn = mtl.value_and_grads(losses)
    else:
        tx = optax.chain(
            mtl.shared_rows(mtl.get_method(aggregator, num_tasks=2).transform, is_head),
            optax.adam(1e-2),
        )
        grad_fn = mtl.value_and_grads(losses, is_head)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        value, grads = grad_fn(params)
        updates, state = tx.update(grads, state, params, task_losses=value)
        return optax.apply_updates(params, updates), state, value

    first = None
    for _ in range(150):
        params, state, value = step(params, state)
        first = value if first is None else first
    final = losses(params)
    assert np.all(np.asarray(final) < 0.5 * np.asarray(first)), (first, final)
