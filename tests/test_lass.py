"""LaSS: per-tensor magnitude masks, the pruning step, masked per-task forwards, sub-network sizes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax.lass import lass_masks, lass_spec, magnitude_mask, subnetwork_sizes
from mtl_jax.sharing import SHARED, Masked, make_spec, per_task, spec_task_specific

K = 2


class TwoTaskNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        z = nn.relu(nn.Dense(16, name="enc0")(x))
        z = nn.relu(nn.Dense(16, name="enc1")(z))
        return nn.Dense(K, name="head")(z)  # column t is task t's prediction


def _data(seed=0, n=32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = np.stack([x @ rng.normal(size=6), np.sin(x[:, 0]) - x[:, 1]]).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)  # y: [K, n]


def _official_rule(w, prob):
    """NLP-Playground/LaSS gen_each_mask_with_prob: |w| > kthvalue(|w|, int(prob * n))."""
    a = np.abs(np.asarray(w, np.float32)).ravel()
    kth = int(prob * a.size)
    return (a > np.sort(a)[kth - 1]).reshape(np.shape(w))


def test_magnitude_mask_matches_the_official_rule_per_tensor():
    params = TwoTaskNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 6)))
    mask = magnitude_mask(params, keep_fraction=0.7)
    for name in ("enc0", "enc1", "head"):
        w = params["params"][name]["kernel"]
        m = np.asarray(mask["params"][name]["kernel"])
        np.testing.assert_array_equal(m, _official_rule(w, 0.3))
        assert m.sum() == w.size - int(0.3 * w.size)
        assert np.all(mask["params"][name]["bias"])  # weights only: biases are not pruned
    assert not np.any(magnitude_mask(params, 0.0)["params"]["enc0"]["kernel"])
    with_biases = magnitude_mask(params, 0.5, weights_only=False, include="enc1")
    assert with_biases["params"]["enc1"]["bias"].sum() == 8
    assert np.all(with_biases["params"]["enc0"]["kernel"])  # outside include: kept whole
    with pytest.raises(ValueError, match="keep_fraction"):
        magnitude_mask(params, 1.5)


def test_embeddings_are_skipped_unless_included():
    params = {
        "embed": jnp.arange(12.0).reshape(3, 4),
        "dense": {"kernel": jnp.arange(12.0).reshape(4, 3)},
    }
    assert np.all(magnitude_mask(params, 0.5)["embed"])
    assert magnitude_mask(params, 0.5, include_embedding=True)["embed"].sum() == 6


@jax.jit
def _sgd_step(params, x, y, task):
    def loss(p):
        return jnp.mean((TwoTaskNet().apply(p, x)[:, task] - y[task]) ** 2)

    return jax.tree.map(lambda p, g: p - 0.05 * g, params, jax.grad(loss)(params))


def _finetune(params, task, x, y, steps=15):
    """Step 2 of LaSS: a copy trained on task `task`'s loss alone (one compile for all tasks)."""
    for _ in range(steps):
        params = _sgd_step(params, x, y, task)
    return params


def test_lass_pipeline_gradient_is_zero_outside_each_task_mask():
    x, y = _data()
    params = TwoTaskNet().init(jax.random.PRNGKey(0), x)  # stands in for the trained MTL model
    finetuned = [_finetune(params, t, x, y) for t in range(K)]
    encoder = "^params/enc"  # the head stays dense
    masks = lass_masks(finetuned, prune_fraction=0.5, include=encoder)
    spec = lass_spec(finetuned, prune_fraction=0.5, include=encoder)
    assert isinstance(spec["params"]["enc0"]["kernel"], Masked)
    assert spec["params"]["enc0"]["bias"] is SHARED and spec["params"]["head"]["kernel"] is SHARED
    m0 = np.asarray(masks["params"]["enc1"]["kernel"])
    assert m0.shape == (K, 16, 16) and not np.array_equal(m0[0], m0[1])  # tasks differ

    forward = per_task(TwoTaskNet().apply, spec, K)

    def losses(p):
        outs = forward(p, x)  # [K, n, K]: task t's stream, all heads
        return jnp.stack([jnp.mean((outs[t, :, t] - y[t]) ** 2) for t in range(K)])

    _, jac = jax.jit(mtl.value_and_grads(losses))(params)  # w.r.t. the shared theta
    for name in ("enc0", "enc1"):
        keep = np.asarray(masks["params"][name]["kernel"])
        rows = np.asarray(jac["params"][name]["kernel"])  # [K, *shape]
        for t in range(K):
            assert np.all(rows[t][~keep[t]] == 0)  # exactly zero outside M_t
            assert np.count_nonzero(rows[t][keep[t]]) > 0.5 * keep[t].sum()
    # the forward of task t is the model with theta * M_t
    theta_0 = jax.tree.map(lambda p, m: p * m[0], params, masks)
    np.testing.assert_allclose(
        forward(params, x)[0], TwoTaskNet().apply(theta_0, x), rtol=1e-5, atol=1e-6
    )

    # step 4: continue training theta with PCGrad on the masked per-task gradients
    task_specific = spec_task_specific(spec)
    _, grads = jax.jit(mtl.value_and_grads(losses, task_specific))(params)
    tx = optax.chain(mtl.shared_rows(mtl.aggregation.pcgrad(), task_specific), optax.adam(1e-2))
    updates, _ = tx.update(grads, tx.init(params), params)
    outside_all = ~np.any(np.asarray(masks["params"]["enc1"]["kernel"]), axis=0)
    assert np.all(np.asarray(updates["params"]["enc1"]["kernel"])[outside_all] == 0)

    sizes = subnetwork_sizes(spec)
    n = 6 * 16 + 16 * 16
    np.testing.assert_array_equal(sizes["kept"], [n // 2, n // 2])
    assert sizes["total"] == n
    np.testing.assert_array_equal(np.diag(sizes["overlap"]), sizes["kept"])
    inter = int(np.sum(np.all(np.asarray(masks["params"]["enc0"]["kernel"]), 0))) + int(
        np.sum(np.all(m0, 0))
    )
    assert sizes["shared_by_all"] == sizes["overlap"][0, 1] == inter
    assert sizes["union"] == 2 * (n // 2) - inter
    assert sizes["leaves"]["params/enc1/kernel"]["total"] == 256
    # from the raw masks every leaf counts (biases and the dense head included)
    assert subnetwork_sizes(masks)["total"] == sum(v.size for v in jax.tree.leaves(params))


def test_lass_masks_errors():
    params = TwoTaskNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 6)))
    with pytest.raises(ValueError, match="one fine-tuned"):
        lass_masks([], 0.5)
    with pytest.raises(ValueError, match="differ in structure"):
        lass_masks([params, {"params": params["params"]["enc0"]}], 0.5)
    with pytest.raises(ValueError, match="prune_fraction"):
        lass_masks([params], -0.1)
    with pytest.raises(ValueError, match="no masks"):
        subnetwork_sizes(make_spec(params))
