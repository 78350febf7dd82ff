"""TaskModulation: per-task, per-channel scales through the sharing spec and per_task."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mtl_jax as mtl
from mtl_jax.lass import lass_spec
from mtl_jax.modules import NNXTaskModulation, TaskModulation, is_modulation, modulation_spec
from mtl_jax.sharing import (
    COPIED,
    SHARED,
    Masked,
    copy_per_task,
    merge_specs,
    per_task,
    spec_task_specific,
    task_params,
)

K, C = 3, 4


class ConvNet(nn.Module):
    """Two conv blocks, each followed by a modulation, and two heads."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(TaskModulation(name="mod0")(nn.Conv(C, (3, 3), name="conv0")(x)))
        x = nn.relu(TaskModulation(name="mod1")(nn.Conv(C, (3, 3), name="conv1")(x)))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(2, name="head_a")(x), nn.Dense(1, name="head_b")(x)


def _x(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, 6, 6, 3)), jnp.float32)


def _random_scales(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, v: (
            jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
            if is_modulation(mtl._tree.path_str(p))
            else v
        ),
        params,
    )


def test_spec_marks_every_modulation_copied_and_copies_start_at_one():
    x = _x()
    params = ConvNet().init(jax.random.PRNGKey(0), x)
    spec = modulation_spec(params)
    assert spec["params"]["mod0"]["task_scale"] is COPIED
    assert spec["params"]["conv0"]["kernel"] is SHARED
    stacked = copy_per_task(params, spec, K)
    np.testing.assert_array_equal(stacked["params"]["mod1"]["task_scale"], np.ones((K, C)))
    outs_a, _ = per_task(ConvNet().apply, spec, K)(stacked, x)
    ref_a, _ = ConvNet().apply(params, x)
    for t in range(K):  # modulation starts as the identity: every task stream is the plain model
        np.testing.assert_allclose(outs_a[t], ref_a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no parameter named 'task_scale'"):
        modulation_spec({"params": {"conv": {"kernel": jnp.ones((3, 3))}}})


def test_task_streams_differ_exactly_by_their_scales():
    class ConvMod(nn.Module):
        @nn.compact
        def __call__(self, x):
            return TaskModulation()(nn.Conv(C, (3, 3), name="conv")(x))

    x = _x()
    params = ConvMod().init(jax.random.PRNGKey(0), x)
    spec = modulation_spec(params)
    stacked = _random_scales(copy_per_task(params, spec, K))
    outs = jax.jit(per_task(ConvMod().apply, spec, K))(stacked, x)  # [K, 2, 6, 6, C]
    features = nn.Conv(C, (3, 3)).apply({"params": params["params"]["conv"]}, x)
    scales = stacked["params"]["TaskModulation_0"]["task_scale"]  # [K, C]
    for t in range(K):
        np.testing.assert_allclose(outs[t], features * scales[t], rtol=1e-6, atol=1e-6)
    with pytest.raises(flax.errors.ScopeParamShapeError, match="task_scale"):
        ConvMod().apply(stacked, x)  # stacked scales outside per_task: Flax's shape check


def test_modulated_conv_net_forward_and_gradients():
    x = _x()
    params = ConvNet().init(jax.random.PRNGKey(0), x)
    spec = modulation_spec(params)
    stacked = _random_scales(copy_per_task(params, spec, K))
    forward = per_task(ConvNet().apply, spec, K)
    outs_a, outs_b = forward(stacked, x)
    for t in range(K):
        ref_a, ref_b = ConvNet().apply(task_params(stacked, spec, t), x)
        np.testing.assert_allclose(outs_a[t], ref_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(outs_b[t], ref_b, rtol=1e-5, atol=1e-6)

    def losses(p):
        a, b = forward(p, x)
        return jnp.stack([jnp.mean(a[t] ** 2) + jnp.mean(b[t] ** 2) for t in range(K)])

    _, jac = jax.jit(mtl.value_and_grads(losses))(stacked)
    rows = np.asarray(jac["params"]["mod0"]["task_scale"])  # [K rows, K copies, C]
    for t in range(K):
        for c in range(K):
            assert np.any(rows[t, c] != 0) == (t == c)
    assert np.all(np.any(np.asarray(jac["params"]["conv0"]["kernel"]) != 0, axis=(1, 2, 3, 4)))
    labels = spec_task_specific(spec)
    assert labels["params"]["mod1"]["task_scale"] and not labels["params"]["conv1"]["kernel"]


def test_modulation_combines_with_lass_masks():
    x = _x()
    params = ConvNet().init(jax.random.PRNGKey(0), x)
    finetuned = [
        jax.tree.map(
            lambda v, t=t: v + 0.01 * t * jnp.sin(jnp.arange(v.size).reshape(v.shape)), params
        )
        for t in range(K)
    ]
    lass = lass_spec(finetuned, 0.5, include="conv1")
    # a modulation scale is [C] (ndim 1), so LaSS's weights-only rule never masks it
    spec = merge_specs(lass, modulation_spec(params))
    assert isinstance(spec["params"]["conv1"]["kernel"], Masked)
    assert spec["params"]["mod1"]["task_scale"] is COPIED
    stacked = _random_scales(copy_per_task(params, spec, K))
    outs_a, _ = per_task(ConvNet().apply, spec, K)(stacked, x)
    for t in range(K):
        ref_a, _ = ConvNet().apply(task_params(stacked, spec, t), x)
        np.testing.assert_allclose(outs_a[t], ref_a, rtol=1e-5, atol=1e-6)


def test_nnx_task_modulation():
    class NNXConvNet(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, C, (3, 3), rngs=rngs)
            self.mod = NNXTaskModulation(C)
            self.head = nnx.Linear(C, 1, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.mean(nnx.relu(self.mod(self.conv(x))), axis=(1, 2)))

    x = _x()
    graphdef, state = nnx.split(NNXConvNet(nnx.Rngs(0)))
    spec = modulation_spec(state)
    stacked = _random_scales(copy_per_task(state, spec, K))
    assert stacked["mod"]["task_scale"][...].shape == (K, C)
    apply = lambda s, x: nnx.merge(graphdef, s, copy=True)(x)
    outs = jax.jit(per_task(apply, spec, K))(stacked, x)
    for t in range(K):
        np.testing.assert_allclose(
            outs[t], apply(task_params(stacked, spec, t), x), rtol=1e-5, atol=1e-6
        )
    assert not np.allclose(outs[0], outs[1])
    with pytest.raises(ValueError, match="through mtl.per_task"):
        apply(stacked, x)  # stacked scales outside per_task
