"""value_and_jacobian and mtl_value_and_grad: equal to K separate jax.grad calls, chunked or not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl


def _mlp_params(key, sizes=(6, 8, 5), num_tasks=3):
    keys = jax.random.split(key, len(sizes) + num_tasks)
    trunk = [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=False)
    ]
    heads = [{"w": jax.random.normal(keys[-t - 1], (sizes[-1], 2))} for t in range(num_tasks)]
    return {"trunk": trunk, "heads": heads}


def _encode(trunk, x):
    for layer in trunk:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x


def _head_loss(head, z, y):
    return jnp.mean((z @ head["w"] - y) ** 2)


def _losses(params, x, ys):
    z = _encode(params["trunk"], x)
    return jnp.stack([_head_loss(h, z, y) for h, y in zip(params["heads"], ys, strict=True)])


@pytest.fixture(scope="module")
def problem():
    key = jax.random.PRNGKey(0)
    params = _mlp_params(key)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 6))
    ys = [jax.random.normal(jax.random.PRNGKey(2 + t), (16, 2)) for t in range(3)]
    return params, x, ys


def _separate_grads(params, x, ys):
    return [jax.grad(lambda p, t=t: _losses(p, x, ys)[t])(params) for t in range(len(ys))]


@pytest.mark.parametrize(
    "strategy,chunk_size",
    [
        ("vmap", None),
        ("vmap", 1),
        ("vmap", 2),
        ("vmap", 3),
        ("vmap", 5),
        ("unroll", None),
        ("scan", None),
    ],
)
def test_value_and_jacobian_equals_separate_grads(problem, strategy, chunk_size):
    params, x, ys = problem
    fn = mtl.value_and_jacobian(_losses, chunk_size=chunk_size, strategy=strategy)
    losses, jac = jax.jit(fn)(params, x, ys)
    np.testing.assert_allclose(losses, _losses(params, x, ys), rtol=1e-6)
    for t, grad in enumerate(_separate_grads(params, x, ys)):
        jax.tree.map(
            lambda j, g, t=t: np.testing.assert_allclose(j[t], g, rtol=1e-5, atol=1e-6), jac, grad
        )


def test_value_and_jacobian_argnums_and_aux(problem):
    params, x, ys = problem

    def loss_with_aux(x, params, ys):
        return _losses(params, x, ys), {"n": x.shape[0]}

    (_, aux), (jac_x, jac_p) = mtl.value_and_jacobian(loss_with_aux, argnums=(0, 1), has_aux=True)(
        x, params, ys
    )
    assert aux == {"n": 16}
    assert jac_x.shape == (3, *x.shape)
    np.testing.assert_allclose(
        jac_x[1], jax.grad(lambda x: _losses(params, x, ys)[1])(x), rtol=1e-5
    )
    assert jax.tree.leaves(jac_p)[0].shape[0] == 3


def test_value_and_jacobian_rejects_scalar_losses(problem):
    params, x, ys = problem
    with pytest.raises(ValueError, match="loss vector"):
        mtl.value_and_jacobian(lambda p: jnp.sum(_losses(p, x, ys)))(params)
    with pytest.raises(ValueError, match="chunk_size"):
        mtl.value_and_jacobian(lambda p: _losses(p, x, ys), chunk_size=0)(params)
    with pytest.raises(ValueError, match="strategy"):
        mtl.value_and_jacobian(lambda p: _losses(p, x, ys), strategy="loop")
    with pytest.raises(ValueError, match="'vmap' only"):
        mtl.mtl_value_and_grad(_encode, [_head_loss], strategy="unroll", chunk_size=2)


@pytest.mark.parametrize("form", ["sequence", "mapping", "stacked"])
def test_mtl_value_and_grad_matches_full_jacobian(problem, form):
    params, x, ys = problem
    names = ["a", "b", "c"]
    if form == "sequence":
        heads, fns, targets = params["heads"], [_head_loss] * 3, ys
    elif form == "mapping":
        heads = dict(zip(names, params["heads"], strict=True))
        fns = dict.fromkeys(names, _head_loss)
        targets = dict(zip(names, ys, strict=True))
    else:
        heads = jax.tree.map(lambda *h: jnp.stack(h), *params["heads"])
        fns, targets = _head_loss, jnp.stack(ys)
    fn = jax.jit(mtl.mtl_value_and_grad(_encode, fns))
    losses, enc_jac, head_grads, rep_grads = fn(params["trunk"], heads, x, targets)

    ref_losses, ref_jac = mtl.value_and_jacobian(_losses)(params, x, ys)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        enc_jac,
        ref_jac["trunk"],
    )
    for t in range(3):
        ref_head = jax.tree.map(lambda j, t=t: j[t], ref_jac["heads"][t])
        got = {
            "sequence": lambda: head_grads[t],
            "mapping": lambda: head_grads[names[t]],
            "stacked": lambda: jax.tree.map(lambda g: g[t], head_grads),
        }[form]()
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref_head
        )
    z = _encode(params["trunk"], x)
    for t in range(3):
        expected = jax.grad(_head_loss, argnums=1)(params["heads"][t], z, ys[t])
        np.testing.assert_allclose(rep_grads[t], expected, rtol=1e-5, atol=1e-7)


def test_mtl_value_and_grad_chunked_and_aux(problem):
    params, x, ys = problem

    def encoder(trunk, x):
        return _encode(trunk, x), {"mean_z": jnp.mean(_encode(trunk, x))}

    def head(h, z, y):
        return _head_loss(h, z, y), jnp.zeros(())

    _, ref_jac = mtl.value_and_jacobian(_losses)(params, x, ys)
    for kwargs in ({"chunk_size": 2}, {"strategy": "unroll"}, {"strategy": "scan"}):
        fn = mtl.mtl_value_and_grad(encoder, [head] * 3, has_aux=True, **kwargs)
        (_, (enc_aux, head_aux)), enc_jac, _, _ = fn(params["trunk"], params["heads"], x, ys)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            enc_jac,
            ref_jac["trunk"],
        )
        assert "mean_z" in enc_aux and len(head_aux) == 3


def test_mtl_value_and_grad_errors(problem):
    params, x, ys = problem
    fn = mtl.mtl_value_and_grad(_encode, [_head_loss] * 3)
    with pytest.raises(ValueError, match="sequence of 3"):
        fn(params["trunk"], params["heads"][:2], x, ys)
    fn = mtl.mtl_value_and_grad(_encode, {"a": _head_loss, "b": _head_loss})
    with pytest.raises(ValueError, match="task keys"):
        fn(
            params["trunk"],
            {"a": params["heads"][0], "c": params["heads"][1]},
            x,
            {"a": ys[0], "b": ys[1]},
        )
    with pytest.raises(TypeError, match="scalar-output"):
        mtl.mtl_value_and_grad(_encode, [lambda h, z, y: (z @ h["w"] - y) ** 2])(
            params["trunk"], params["heads"][:1], x, ys[:1]
        )
