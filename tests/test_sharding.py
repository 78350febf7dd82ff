"""Data-parallel steps on several virtual CPU devices give the single-device result (docs/design/DESIGN.md s.7)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import mtl_jax as mtl

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(6, 16)), jnp.float32) / 3,
              "w2": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32) / 4}
    x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)

    def losses(p, x, y):
        out = jnp.tanh(x @ p["w1"]) @ p["w2"]
        return jnp.mean((out - y) ** 2, axis=0)          # one loss per output = per task

    tx = optax.chain(mtl.aggregation.pcgrad(num_tasks=3), optax.adam(1e-2))

    def step(p, s, x, y):
        value, jac = mtl.value_and_grads(losses)(p, x, y)
        updates, s = tx.update(jac, s, p, task_losses=value)
        return optax.apply_updates(p, updates), s, value

    step = jax.jit(step)
    p1, s1 = params, tx.init(params)
    for _ in range(5):
        p1, s1, _ = step(p1, s1, x, y)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    rep = NamedSharding(mesh, P())
    p4 = jax.device_put(params, rep)
    s4 = jax.device_put(tx.init(params), rep)
    for _ in range(5):
        p4, s4, _ = step(p4, s4, xs, ys)
    assert len(xs.sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(mtl.aggregation.weights(s1), mtl.aggregation.weights(s4), rtol=1e-5)
    print("OK")
    """
)


@pytest.mark.slow
def test_four_virtual_devices_match_one_device():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
