"""The representation-gradient path (MGDA-UB, Aligned-MTL-UB): mtl_jax/representation.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl
from tests import _reference as R

K, B, D_IN, D_Z = 3, 8, 5, 4


def encoder(params, x):
    return jnp.tanh(x @ params["w"] + params["b"])


def head_loss(head, z, target):
    return jnp.mean((z @ head["v"] - target) ** 2)


def _problem(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    enc = {"w": rng.normal(size=(D_IN, D_Z)), "b": rng.normal(size=(D_Z,))}
    heads = {"v": rng.normal(size=(K, D_Z, 2))}
    x = rng.normal(size=(B, D_IN))
    targets = rng.normal(size=(K, B, 2)) * np.array([1.0, 5.0, 0.2])[:, None, None]
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
    return cast(enc), cast(heads), cast(x), cast(targets)


def _per_task_reference(enc, heads, x, targets, weights_fn, sum_over_batch=False):
    """K separate backward passes: rep grads, their Gram matrix, weights, sum_k w_k grad_theta L_k."""
    z = encoder(enc, x)
    rep, enc_grads, head_grads = [], [], []
    for k in range(K):
        head_k = jax.tree.map(lambda a, k=k: a[k], heads)
        loss_k = lambda e, h, zz, k=k: head_loss(
            h, zz if zz is not None else encoder(e, x), targets[k]
        )
        rep.append(np.asarray(jax.grad(lambda zz, h=head_k, k=k: head_loss(h, zz, targets[k]))(z)))
        enc_grads.append(jax.grad(lambda e, h=head_k, f=loss_k: f(e, h, None))(enc))
        head_grads.append(jax.grad(lambda h, k=k: head_loss(h, z, targets[k]))(head_k))
    rep = np.stack(rep)
    flat = rep.sum(axis=1).reshape(K, -1) if sum_over_batch else rep.reshape(K, -1)
    G = flat @ flat.T
    w = weights_fn(G)
    enc_grad = jax.tree.map(
        lambda *gs: sum(wk * g for wk, g in zip(w, gs, strict=True)), *enc_grads
    )
    return G, w, enc_grad, head_grads


@pytest.mark.parametrize("sum_over_batch", [False, True])
def test_mgda_ub_matches_k_separate_backward_passes(sum_over_batch):
    with jax.enable_x64(True):
        enc, heads, x, targets = _problem()
        fn = mtl.representation_value_and_grad(
            encoder, head_loss, "mgda", sum_over_batch=sum_over_batch
        )
        res = jax.jit(fn)(enc, heads, x, targets, fn.weighting.init(K))
        G, w, enc_grad, head_grads = _per_task_reference(
            enc, heads, x, targets, R.mgda_bruteforce_weights, sum_over_batch
        )
        np.testing.assert_allclose(res.gram, G, rtol=1e-12)
        np.testing.assert_allclose(res.weights, w, rtol=1e-9, atol=1e-12)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9), res.encoder_grads, enc_grad
        )
        for k in range(K):
            jax.tree.map(
                lambda a, b, k=k: np.testing.assert_allclose(a[k], b, rtol=1e-10),
                res.head_grads,
                head_grads[k],
            )
        losses = [
            head_loss(jax.tree.map(lambda a, k=k: a[k], heads), encoder(enc, x), targets[k])
            for k in range(K)
        ]
        np.testing.assert_allclose(res.losses, losses, rtol=1e-12)


def test_aligned_mtl_ub_and_scaled_heads():
    with jax.enable_x64(True):
        enc, heads, x, targets = _problem(seed=1)
        weighting = mtl.get_weighting("aligned_mtl")
        fn = mtl.representation_value_and_grad(encoder, head_loss, weighting, scale_heads=True)
        res = fn(enc, heads, x, targets, weighting.init(K))
        _, w, enc_grad, head_grads = _per_task_reference(
            enc,
            heads,
            x,
            targets,
            R.aligned_mtl_weights_ref,
        )
        np.testing.assert_allclose(res.weights, w, rtol=1e-10)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9), res.encoder_grads, enc_grad
        )
        for k in range(K):  # scale_heads: head k gets w_k times its gradient (official MGDA code)
            np.testing.assert_allclose(
                res.head_grads["v"][k], w[k] * head_grads[k]["v"], rtol=1e-10
            )


def test_mean_weighting_is_the_gradient_of_the_mean_loss():
    enc, heads, x, targets = _problem(np.float32)
    fn = mtl.representation_value_and_grad(encoder, head_loss, "mean")
    res = jax.jit(fn)(enc, heads, x, targets, None)

    def mean_loss(e):
        z = encoder(e, x)
        return jnp.mean(jax.vmap(head_loss, in_axes=(0, None, 0))(heads, z, targets))

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        res.encoder_grads,
        jax.grad(mean_loss)(enc),
    )


def test_sequence_heads_aux_and_stateful_weighting():
    enc, heads, x, targets = _problem(np.float32, seed=2)
    fns = [lambda h, z, t, k=k: (head_loss(h, z, t), {"task": k}) for k in range(K)]
    head_list = [jax.tree.map(lambda a, k=k: a[k], heads) for k in range(K)]
    target_list = [targets[k] for k in range(K)]

    def encoder_aux(p, xx):
        return encoder(p, xx), {"mean_z": jnp.mean(encoder(p, xx))}

    weighting = mtl.weighting.gradvac_weighting()
    fn = mtl.representation_value_and_grad(encoder_aux, fns, weighting, has_aux=True)
    state = weighting.init(K)
    step = jax.jit(fn)
    for t in range(2):
        res = step(enc, head_list, x, target_list, state, jax.random.PRNGKey(t))
        state = res.state
    (losses, (enc_aux, head_aux)) = res.losses
    assert losses.shape == (K,) and "mean_z" in enc_aux and int(head_aux[1]["task"]) == 1
    assert isinstance(res.head_grads, list) and len(res.head_grads) == K
    assert np.all(np.isfinite(np.asarray(res.weights)))
    assert np.any(np.asarray(state.targets) != 0)  # the EMA targets moved


def test_non_finite_losses_give_nan_encoder_gradients_and_bad_weighting_is_rejected():
    enc, heads, x, targets = _problem(np.float32)
    targets = targets.at[1, 0, 0].set(jnp.nan)
    fn = mtl.representation_value_and_grad(encoder, head_loss, "upgrad")
    res = fn(enc, heads, x, targets, None)
    assert np.all(np.isnan(np.asarray(res.weights)))
    assert all(np.all(np.isnan(np.asarray(g))) for g in jax.tree.leaves(res.encoder_grads))
    with pytest.raises(ValueError, match="Unknown weighting 'mgda_ub'"):
        mtl.representation_value_and_grad(encoder, head_loss, "mgda_ub")
    with pytest.raises(TypeError, match="must be a mtl_jax Weighting"):
        mtl.representation_value_and_grad(encoder, head_loss, object())
