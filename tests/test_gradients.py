"""mtl.value_and_grads, the one gradient entry point: every model shape against K separate
jax.grad calls (a loss vector, task-specific leaves, trunk + heads, the representation path)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl
from tests import _reference as R


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
    "task_map,chunk_size",
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
def test_loss_vector_rows_equal_separate_grads(problem, task_map, chunk_size):
    params, x, ys = problem
    fn = mtl.value_and_grads(_losses, chunk_size=chunk_size, task_map=task_map)
    losses, jac = jax.jit(fn)(params, x, ys)
    np.testing.assert_allclose(losses, _losses(params, x, ys), rtol=1e-6)
    for t, grad in enumerate(_separate_grads(params, x, ys)):
        jax.tree.map(
            lambda j, g, t=t: np.testing.assert_allclose(j[t], g, rtol=1e-5, atol=1e-6), jac, grad
        )


def test_task_specific_leaves_get_their_own_tasks_gradient(problem):
    params, x, ys = problem
    labels = {"trunk": False, "heads": True}
    (_, aux), grads = jax.jit(
        mtl.value_and_grads(lambda p: (_losses(p, x, ys), {"n": x.shape[0]}), labels, has_aux=True)
    )(params)
    assert int(aux["n"]) == 16
    separate = _separate_grads(params, x, ys)
    for t in range(3):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            grads["heads"][t],
            separate[t]["heads"][t],
        )
        jax.tree.map(
            lambda j, g, t=t: np.testing.assert_allclose(j[t], g, rtol=1e-5, atol=1e-6),
            grads["trunk"],
            separate[t]["trunk"],
        )


def test_bad_inputs_are_named(problem):
    params, x, ys = problem
    with pytest.raises(ValueError, match="loss vector"):
        mtl.value_and_grads(lambda p: jnp.sum(_losses(p, x, ys)))(params)
    with pytest.raises(ValueError, match="chunk_size"):
        mtl.value_and_grads(lambda p: _losses(p, x, ys), chunk_size=0)
    with pytest.raises(ValueError, match="task_map"):
        mtl.value_and_grads(lambda p: _losses(p, x, ys), task_map="loop")
    with pytest.raises(ValueError, match="'vmap' only"):
        mtl.value_and_grads(
            mtl.TrunkAndHeads(_encode, [_head_loss]), task_map="unroll", chunk_size=2
        )
    with pytest.raises(ValueError, match="needs a TrunkAndHeads"):
        mtl.value_and_grads(lambda p: _losses(p, x, ys), representation=True)
    with pytest.raises(ValueError, match="drop task_specific"):
        mtl.value_and_grads(mtl.TrunkAndHeads(_encode, [_head_loss]), {"heads": True})
    with pytest.raises(TypeError, match="loss-vector function"):
        mtl.value_and_grads(42)


@pytest.mark.parametrize("form", ["sequence", "mapping", "stacked"])
def test_trunk_and_heads_matches_full_jacobian(problem, form):
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
    fn = jax.jit(mtl.value_and_grads(mtl.TrunkAndHeads(_encode, fns), representation=True))
    (losses, aux), grads = fn({"trunk": params["trunk"], "heads": heads}, x, targets)
    head_grads, rep_grads = grads["heads"], aux["rep_grads"]

    ref_losses = _losses(params, x, ys)
    separate = _separate_grads(params, x, ys)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for t in range(3):
        jax.tree.map(
            lambda a, b, t=t: np.testing.assert_allclose(a[t], b, rtol=1e-5, atol=1e-6),
            grads["trunk"],
            separate[t]["trunk"],
        )
        got = {
            "sequence": lambda: head_grads[t],
            "mapping": lambda: head_grads[names[t]],
            "stacked": lambda: jax.tree.map(lambda g: g[t], head_grads),
        }[form]()
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            got,
            separate[t]["heads"][t],
        )
    z = _encode(params["trunk"], x)
    for t in range(3):
        expected = jax.grad(_head_loss, argnums=1)(params["heads"][t], z, ys[t])
        np.testing.assert_allclose(rep_grads[t], expected, rtol=1e-5, atol=1e-7)


def test_trunk_and_heads_task_maps_and_aux(problem):
    params, x, ys = problem

    def encoder(trunk, x):
        return _encode(trunk, x), {"mean_z": jnp.mean(_encode(trunk, x))}

    def head(h, z, y):
        return _head_loss(h, z, y), jnp.zeros(())

    _, ref_jac = mtl.value_and_grads(_losses)(params, x, ys)
    for kwargs in ({"chunk_size": 2}, {"task_map": "unroll"}, {"task_map": "scan"}):
        fn = mtl.value_and_grads(mtl.TrunkAndHeads(encoder, [head] * 3), has_aux=True, **kwargs)
        (_, aux), grads = fn(params, x, ys)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            grads["trunk"],
            ref_jac["trunk"],
        )
        assert "mean_z" in aux["trunk"] and len(aux["heads"]) == 3 and "rep_grads" not in aux


def test_trunk_and_heads_errors(problem):
    params, x, ys = problem
    fn = mtl.value_and_grads(mtl.TrunkAndHeads(_encode, [_head_loss] * 3))
    with pytest.raises(ValueError, match="sequence of 3"):
        fn({"trunk": params["trunk"], "heads": params["heads"][:2]}, x, ys)
    with pytest.raises(ValueError, match="'trunk': ..., 'heads'"):
        fn({"encoder": params["trunk"], "heads": params["heads"]}, x, ys)
    fn = mtl.value_and_grads(mtl.TrunkAndHeads(_encode, {"a": _head_loss, "b": _head_loss}))
    with pytest.raises(ValueError, match="task keys"):
        fn(
            {"trunk": params["trunk"], "heads": {"a": params["heads"][0], "c": params["heads"][1]}},
            x,
            {"a": ys[0], "b": ys[1]},
        )
    bad = mtl.TrunkAndHeads(_encode, [lambda h, z, y: (z @ h["w"] - y) ** 2])
    with pytest.raises(
        ValueError, match=r"head_loss_fns\[0\] must return one task's loss.*\(16, 2\)"
    ):
        mtl.value_and_grads(bad)(
            {"trunk": params["trunk"], "heads": params["heads"][:1]}, x, ys[:1]
        )


# ---------------------------------------------------------------------------------------------
# The one-backward representation path (MGDA-UB, Aligned-MTL-UB).

K, B, D_IN, D_Z = 3, 8, 5, 4


def encoder(params, x):  # the representation tests' trunk
    return jnp.tanh(x @ params["w"] + params["b"])


def head_loss(head, z, target):
    return jnp.mean((z @ head["v"] - target) ** 2)


class _Result(NamedTuple):
    losses: Any
    encoder_grads: Any
    head_grads: Any
    weights: Any
    gram: Any


def _result(out) -> _Result:
    """The representation path's ``((losses, aux), grads)`` by name."""
    (losses, aux), grads = out
    return _Result(losses, grads["trunk"], grads["heads"], aux["weights"], aux["gram"])


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
        fn = mtl.value_and_grads(
            mtl.TrunkAndHeads(encoder, head_loss),
            representation=mtl.RepresentationWeighting("mgda", sum_over_batch=sum_over_batch),
        )
        res = _result(jax.jit(fn)({"trunk": enc, "heads": heads}, x, targets))
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
        weighting = mtl.weighting.get_weighting("aligned_mtl")
        fn = mtl.value_and_grads(
            mtl.TrunkAndHeads(encoder, head_loss),
            representation=mtl.RepresentationWeighting(weighting, scale_heads=True),
        )
        res = _result(fn({"trunk": enc, "heads": heads}, x, targets))
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
    fn = mtl.value_and_grads(
        mtl.TrunkAndHeads(encoder, head_loss), representation=mtl.RepresentationWeighting("mean")
    )
    res = _result(jax.jit(fn)({"trunk": enc, "heads": heads}, x, targets))

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
    fn = mtl.value_and_grads(
        mtl.TrunkAndHeads(encoder_aux, fns),
        has_aux=True,
        representation=mtl.RepresentationWeighting(weighting),
    )
    params = {"trunk": enc, "heads": head_list}
    with pytest.raises(ValueError, match="keeps state across steps"):
        fn(params, x, target_list)
    state = weighting.init(K)
    step = jax.jit(fn)
    for t in range(2):
        (losses, aux), grads = step(
            params, x, target_list, weighting_state=state, key=jax.random.key(t)
        )
        state = aux["weighting_state"]
    assert losses.shape == (K,) and "mean_z" in aux["trunk"] and int(aux["heads"][1]["task"]) == 1
    assert isinstance(grads["heads"], list) and len(grads["heads"]) == K
    assert np.all(np.isfinite(np.asarray(aux["weights"])))
    assert np.any(np.asarray(state.targets) != 0)  # the EMA targets moved


def test_non_finite_losses_give_nan_encoder_gradients_and_bad_weighting_is_rejected():
    enc, heads, x, targets = _problem(np.float32)
    targets = targets.at[1, 0, 0].set(jnp.nan)
    model = mtl.TrunkAndHeads(encoder, head_loss)
    fn = mtl.value_and_grads(model, representation=mtl.RepresentationWeighting("upgrad"))
    res = _result(fn({"trunk": enc, "heads": heads}, x, targets))
    assert np.all(np.isnan(np.asarray(res.weights)))
    assert all(np.all(np.isnan(np.asarray(g))) for g in jax.tree.leaves(res.encoder_grads))
    with pytest.raises(ValueError, match="Unknown weighting 'mgda_ub'"):
        mtl.value_and_grads(model, representation=mtl.RepresentationWeighting("mgda_ub"))
    with pytest.raises(TypeError, match="must be a mtl_jax Weighting"):
        mtl.value_and_grads(model, representation=mtl.RepresentationWeighting(object()))
