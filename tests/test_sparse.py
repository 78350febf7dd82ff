"""Sparse training: PSN and control masks, mask statistics, and the mask transform."""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_jax as mtl
from mtl_jax.sparse import (
    MaskState,
    apply_mask,
    global_magnitude_mask,
    mask_stats,
    psn_k,
    psn_mask,
    random_mask,
    reverse_mask,
)

ENCODER = "^params/encoder/"
K_TASKS = 3


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.relu(nn.Dense(12, name="dense")(x))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        z = Encoder(name="encoder")(x)
        return jnp.stack([nn.Dense(1, name=f"head{t}")(z)[:, 0] for t in range(K_TASKS)])


def _params(seed=0):
    x = jnp.zeros((2, 5, 5, 3))
    return Net().init(jax.random.PRNGKey(seed), x)


def _data(seed=0, n=16):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, 5, 5, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(K_TASKS, n)), jnp.float32)
    return x, y


def _enc(tree):
    return tree["params"]["encoder"]


# ---------------------------------------------------------------------------------------------
# PSN


def _reference_psn(w, k):
    """numpy: per output unit (last axis), the k largest |w| over the flattened fan-in."""
    cols = np.abs(np.asarray(w)).reshape(-1, w.shape[-1])
    keep = np.zeros_like(cols, bool)
    for j in range(cols.shape[1]):
        keep[np.argsort(-cols[:, j], kind="stable")[:k], j] = True
    return keep.reshape(w.shape)


def test_psn_keeps_the_k_largest_incoming_weights_per_unit():
    params = _params()
    k = 7
    mask = psn_mask(params, k, include=ENCODER)
    for name in ("conv", "dense"):  # conv [3, 3, 3, 6]: fan-in 27; dense [6, 12]: fan-in 6
        w = _enc(params)[name]["kernel"]
        m = np.asarray(_enc(mask)[name]["kernel"])
        np.testing.assert_array_equal(m, _reference_psn(w, k))
        fan_in = int(np.prod(w.shape[:-1]))
        np.testing.assert_array_equal(m.reshape(-1, w.shape[-1]).sum(0), min(k, fan_in))
    # heads stay dense; biases are trained by default
    assert all(bool(np.all(m)) for m in jax.tree.leaves(mask["params"]["head0"]))
    assert bool(np.all(_enc(mask)["conv"]["bias"]))
    frozen = psn_mask(params, k, include=ENCODER, other="freeze")
    assert not np.any(_enc(frozen)["conv"]["bias"]) and np.all(frozen["params"]["head1"]["bias"])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        psn_mask(params, 0)
    with pytest.raises(ValueError, match="other"):
        psn_mask(params, 3, other="dense")


def test_controls_match_the_psn_count():
    params = _params()
    psn = psn_mask(params, 5, include=ENCODER)
    rand = random_mask(params, psn, jax.random.PRNGKey(0), include=ENCODER)
    glob = global_magnitude_mask(params, psn, include=ENCODER)
    rev = reverse_mask(params, psn, include=ENCODER)
    counts = {
        n: mask_stats(m)["trainable"]
        for n, m in dict(psn=psn, rand=rand, glob=glob, rev=rev).items()
    }
    assert len(set(counts.values())) == 1, counts
    for name in ("conv", "dense"):
        w = np.abs(np.asarray(_enc(params)[name]["kernel"])).reshape(
            -1, _enc(params)[name]["kernel"].shape[-1]
        )
        p = np.asarray(_enc(psn)[name]["kernel"]).reshape(w.shape)
        r = np.asarray(_enc(rev)[name]["kernel"]).reshape(w.shape)
        assert np.asarray(_enc(rand)[name]["kernel"]).sum() == p.sum()  # per tensor
        np.testing.assert_array_equal(r.sum(0), p.sum(0))  # per neuron
        for j in range(w.shape[1]):  # reverse keeps the smallest of every unit
            if not r[:, j].all():
                assert w[r[:, j], j].max() <= w[~r[:, j], j].min()
    # global: every kept encoder weight is at least as large as every dropped one
    kept, dropped = [], []
    for name in ("conv", "dense"):
        w = np.abs(np.asarray(_enc(params)[name]["kernel"])).ravel()
        g = np.asarray(_enc(glob)[name]["kernel"]).ravel()
        kept.append(w[g])
        dropped.append(w[~g])
    assert np.concatenate(kept).min() >= np.concatenate(dropped).max()
    # controls differ from PSN, random depends on the key
    assert not np.array_equal(_enc(rand)["conv"]["kernel"], _enc(psn)["conv"]["kernel"])
    rand2 = random_mask(params, psn, jax.random.PRNGKey(1), include=ENCODER)
    assert not np.array_equal(_enc(rand)["conv"]["kernel"], _enc(rand2)["conv"]["kernel"])
    with pytest.raises(ValueError, match="params/encoder/conv/kernel"):
        bad = jax.tree.map(lambda m: m, psn)
        bad["params"]["encoder"]["conv"]["kernel"] = jnp.ones((3, 3))
        reverse_mask(params, bad, include=ENCODER)


def test_mask_stats_and_psn_k():
    params = _params()
    mask = psn_mask(params, 4, include=ENCODER)
    stats = mask_stats(mask, include=ENCODER)
    conv = stats["leaves"]["params/encoder/conv/kernel"]
    assert conv == {"trainable": 4 * 6, "total": 3 * 3 * 3 * 6, "fraction": 24 / 162}
    assert stats["total"] == sum(v.size for v in jax.tree.leaves(_enc(params)))
    assert stats["trainable"] == 4 * 6 + 4 * 12 + 6 + 12  # kernels + dense biases
    k = psn_k(params, 0.5, include=ENCODER)
    count = lambda k: 6 * min(k, 27) + 12 * min(k, 6)
    assert count(k) >= 0.5 * (162 + 72) > count(k - 1)


# ---------------------------------------------------------------------------------------------
# The mask transform


def test_apply_mask_on_ordinary_and_task_stacked_updates():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}
    mask = {"w": np.array([[1, 0], [0, 1], [1, 1]], bool), "b": True}
    tx = apply_mask(mask)
    state = jax.jit(tx.init)(params)
    assert isinstance(state, MaskState)
    upd, _ = jax.jit(tx.update)(jax.tree.map(lambda p: 2 * p, params), state)
    np.testing.assert_array_equal(upd["w"], 2 * mask["w"])
    np.testing.assert_array_equal(upd["b"], [2, 2])
    jac = {"w": jnp.full((4, 3, 2), jnp.nan), "b": jnp.ones((4, 2))}
    masked_jac, _ = tx.update(jac, state)
    assert masked_jac["w"].shape == (4, 3, 2)
    assert np.all(masked_jac["w"][:, ~mask["w"]] == 0)  # NaN at masked coordinates zeroed too
    assert np.all(np.isnan(masked_jac["w"][:, mask["w"]]))
    # per-task (stacked) masks mask row t with M_t
    per_task_mask = {"w": np.stack([mask["w"], ~mask["w"]]), "b": np.ones((2, 2), bool)}
    rows, _ = apply_mask(per_task_mask).update(
        {"w": jnp.ones((2, 3, 2)), "b": jnp.ones((2, 2))}, MaskState(per_task_mask)
    )
    np.testing.assert_array_equal(rows["w"], per_task_mask["w"])
    # inside optax.masked: hidden leaves pass through
    inner = optax.masked(apply_mask(mask), {"w": True, "b": False})
    out, _ = inner.update(params, inner.init(params))
    np.testing.assert_array_equal(out["w"], mask["w"])


def test_apply_mask_errors_name_the_leaf():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}
    with pytest.raises(ValueError, match=r"w: mask \(2, 3\) vs param \(3, 2\)"):
        apply_mask({"w": np.ones((2, 3)), "b": True}).init(params)
    with pytest.raises(ValueError, match=r"only in the parameters: \[b\]"):
        apply_mask({"w": np.ones((3, 2))}).init(params)
    tx = apply_mask({"w": np.ones((3, 2)), "b": True})
    with pytest.raises(ValueError, match="'w' has shape \\(5, 2\\)"):
        tx.update({"w": jnp.ones((5, 2)), "b": jnp.ones(2)}, tx.init(params))


def _registry_aggregators():
    names = []
    for name, factory in mtl.aggregation.AGGREGATORS.items():
        required = [
            p
            for p in inspect.signature(factory).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not required:
            names.append(name)
    return names


def _build(name):
    factory = mtl.aggregation.AGGREGATORS[name]
    accepted = inspect.signature(factory).parameters
    return factory(num_tasks=K_TASKS) if "num_tasks" in accepted else factory()


class MLPNet(nn.Module):
    """A small dense encoder (fast to compile) with one head per task."""

    @nn.compact
    def __call__(self, x):
        z = nn.Dense(12, name="dense1")(x)
        z = nn.relu(nn.LayerNorm(name="norm")(z))
        z = nn.relu(nn.Dense(12, name="dense2")(z))
        return jnp.stack([nn.Dense(1, name=f"head{t}")(z)[:, 0] for t in range(K_TASKS)])


def _mlp_params():
    return MLPNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))


def _train(tx, params, steps=10, task_specific=None, paired=False):
    """``steps`` of ``tx``: on the full Jacobian, or with ``task_specific`` on the gradient tree
    of ``mtl.value_and_grads`` (heads: their own gradient). ``paired``: a cross-batch method
    also gets the rows as both of its two batches (``paired_rows``)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(K_TASKS, 16)), jnp.float32)

    def losses(p):
        return jnp.mean((MLPNet().apply(p, x) - y) ** 2, axis=1)

    if task_specific is None:
        grad_fn = mtl.value_and_grads(losses)
    else:
        grad_fn = mtl.value_and_grads(losses, task_specific)

    @jax.jit
    def step(p, s):
        value, grads = grad_fn(p)
        extra = {"paired_rows": jax.tree.map(lambda g: jnp.stack([g, g]), grads)} if paired else {}
        updates, s = tx.update(grads, s, p, task_losses=value, **extra)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def _is_head(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: "head" in jax.tree_util.keystr(p), params)


@pytest.mark.parametrize("name", _registry_aggregators())
def test_frozen_parameters_stay_bit_identical_with_adamw(name):
    params = _mlp_params()
    encoder = "^params/(dense|norm)"  # the heads stay dense
    mask = psn_mask(params, 5, include=encoder, other="freeze")
    tx = optax.chain(
        mtl.shared_rows(_build(name), _is_head(params)),
        optax.adamw(1e-2, weight_decay=0.1),  # momentum and weight decay
        apply_mask(mask),  # after the optimizer: frozen coordinates stay put
    )
    paired = name in mtl.aggregation.CROSS_BATCH_AGGREGATORS
    trained = _train(tx, params, task_specific=_is_head(params), paired=paired)
    _assert_frozen(params, trained, mask, name)


def _assert_frozen(params, trained, mask, name=""):
    moved = 0
    for old, new, m in zip(
        jax.tree.leaves(params), jax.tree.leaves(trained), jax.tree.leaves(mask), strict=True
    ):
        old, new, m = np.asarray(old), np.asarray(new), np.asarray(m)
        np.testing.assert_array_equal(old[~m].view(np.uint32), new[~m].view(np.uint32))
        moved += int(np.sum(old[m] != new[m]))
    assert moved > 0.5 * mask_stats(mask)["trainable"], name


def test_mask_in_front_of_the_aggregator_masks_every_task_gradient():
    params = _mlp_params()
    mask = psn_mask(params, 5, include="^params/dense")
    aggregator = mtl.aggregation.pcgrad(num_tasks=K_TASKS)
    tx = optax.chain(
        apply_mask(mask),  # every task's gradient restricted to the trainable subspace
        mtl.shared_rows(aggregator, _is_head(params)),
        optax.adamw(1e-2, weight_decay=0.1),
        apply_mask(mask),
    )
    _assert_frozen(params, _train(tx, params, task_specific=_is_head(params)), mask)

    x = jnp.ones((4, 8))
    losses = lambda p: jnp.mean(MLPNet().apply(p, x) ** 2, axis=1) + jnp.arange(K_TASKS)
    value, grads = mtl.value_and_grads(losses, _is_head(params))(params)
    _, state = tx.update(grads, tx.init(params), params, task_losses=value)
    masked, _ = apply_mask(mask).update(grads, MaskState(mask))
    # the Gram matrix of the masked shared rows (heads: no rows, zeros)
    shared = jax.tree.map(
        lambda g, h: jnp.zeros((K_TASKS, *g.shape), g.dtype) if h else g, masked, _is_head(params)
    )
    np.testing.assert_allclose(
        mtl.aggregation.gram(state), mtl.gramian.gramian(shared), rtol=1e-5, atol=1e-7
    )


def test_weight_decay_moves_frozen_parameters_without_the_trailing_mask():
    params = _mlp_params()
    mask = psn_mask(params, 5, include="dense")
    tx = optax.chain(apply_mask(mask), mtl.aggregation.mean(), optax.adamw(1e-2, weight_decay=0.1))
    trained = _train(tx, params, steps=2)
    w, m = params["params"]["dense1"]["kernel"], np.asarray(mask["params"]["dense1"]["kernel"])
    assert np.any(np.asarray(trained["params"]["dense1"]["kernel"])[~m] != np.asarray(w)[~m])


def test_nnx_state_masks():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(8, 6, rngs=rngs)
            self.head = nnx.Linear(6, 1, rngs=rngs)

    _, state = nnx.split(Model(nnx.Rngs(0)))
    mask = psn_mask(state, 3, include="^encoder/")
    kernel = np.asarray(mask["encoder"]["kernel"][...])
    np.testing.assert_array_equal(kernel.sum(0), 3)
    assert np.all(np.asarray(mask["head"]["kernel"][...]))
    tx = apply_mask(mask)
    upd, _ = tx.update(jax.tree.map(jnp.ones_like, state), tx.init(state))
    np.testing.assert_array_equal(upd["encoder"]["kernel"][...], kernel)
