"""value_and_grads + shared_rows: one gradient tree, one optimizer, O(K) task-specific leaves.

References are independent: per-task ``jax.grad`` calls (rows of shared leaves, each copy's own
task gradient) and ``jax.grad`` of the summed loss (task-specific leaves).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax.sharing import COPIED, SHARED, copy_per_task, make_spec, per_task, spec_from_masks
from tests._programs import has_task_by_task_value, temp_bytes, traced_shapes
from tests.test_grads_cut import plain_loss_vector_grads

K, B, D, H = 3, 5, 4, 16  # distinct sizes, so a task axis is recognisable in shapes


def _close(a, b, **kw):
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, **{"rtol": 1e-5, "atol": 1e-6, **kw}), a, b
    )


def _x(n=B, d=D, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)), jnp.float32)


# ---------------------------------------------------------------------------------------------
# A plain-JAX trunk with K heads


def _mlp():
    rng = np.random.default_rng(0)
    params = {
        "trunk": [
            {"w": jnp.asarray(rng.normal(size=(D, H)) / 2, jnp.float32), "b": jnp.zeros(H)},
            {"w": jnp.asarray(rng.normal(size=(H, H)) / 4, jnp.float32), "b": jnp.zeros(H)},
        ],
        "heads": [{"w": jnp.asarray(rng.normal(size=(H, 2)), jnp.float32)} for _ in range(K)],
    }
    ys = jnp.asarray(rng.normal(size=(K, B, 2)), jnp.float32)
    return params, ys


def _mlp_losses(params, x, ys):
    z = x
    for layer in params["trunk"]:
        z = jnp.tanh(z @ layer["w"] + layer["b"])
    return jnp.stack(
        [jnp.mean((z @ h["w"] - y) ** 2) for h, y in zip(params["heads"], ys, strict=True)]
    )


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "task_map,chunk_size", [("vmap", None), ("vmap", 2), ("unroll", None), ("scan", None)]
)
def test_shared_rows_and_head_gradients_equal_per_task_grads(jit, task_map, chunk_size):
    params, ys = _mlp()
    x = _x()
    fn = mtl.value_and_grads(
        _mlp_losses, {"trunk": False, "heads": True}, task_map=task_map, chunk_size=chunk_size
    )
    fn = jax.jit(fn) if jit else fn
    losses, grads = fn(params, x, ys)
    _close(losses, _mlp_losses(params, x, ys))
    per_task_grads = [jax.grad(lambda p, t=t: _mlp_losses(p, x, ys)[t])(params) for t in range(K)]
    for t in range(K):
        _close(jax.tree.map(lambda g: g[t], grads["trunk"]), per_task_grads[t]["trunk"])
        # head t: the gradient of the summed loss is its own task's gradient
        _close(grads["heads"][t], per_task_grads[t]["heads"][t])
    total = jax.grad(lambda p: jnp.sum(_mlp_losses(p, x, ys)))(params)
    _close(grads["heads"], total["heads"])
    assert grads["trunk"][1]["w"].shape == (K, H, H)
    assert grads["heads"][0]["w"].shape == (H, 2)


def test_all_shared_equals_value_and_jacobian_and_all_specific_equals_grad():
    params, ys = _mlp()
    x = _x()
    losses, rows = mtl.value_and_grads(_mlp_losses, False)(params, x, ys)
    _, jac = mtl.value_and_grads(_mlp_losses)(params, x, ys)
    _close(rows, jac)
    _, total = mtl.value_and_grads(_mlp_losses, True)(params, x, ys)
    _close(total, jax.grad(lambda p: jnp.sum(_mlp_losses(p, x, ys)))(params))
    assert losses.shape == (K,)


def test_has_aux_and_callable_labels():
    params, ys = _mlp()
    x = _x()

    def with_aux(p, x, ys):
        losses = _mlp_losses(p, x, ys)
        return losses, {"sum": jnp.sum(losses)}

    labels = lambda p: {"trunk": False, "heads": True}
    (losses, aux), grads = jax.jit(mtl.value_and_grads(with_aux, labels, has_aux=True))(
        params, x, ys
    )
    _close(aux["sum"], jnp.sum(losses))
    assert grads["trunk"][0]["w"].shape == (K, D, H)


def test_bad_task_specific_is_a_clear_error():
    params, ys = _mlp()
    x = _x()
    with pytest.raises(ValueError, match=r"without a label: \[heads/0/w"):
        mtl.value_and_grads(_mlp_losses, {"trunk": False})(params, x, ys)
    with pytest.raises(ValueError, match=r"labels without parameters: \[neck"):
        mtl.value_and_grads(_mlp_losses, {"trunk": False, "heads": True, "neck": True})(
            params, x, ys
        )
    with pytest.raises(ValueError, match=r"'heads/0/w' is 'yes'"):
        mtl.value_and_grads(_mlp_losses, {"trunk": False, "heads": "yes"})(params, x, ys)
    with pytest.raises(ValueError, match="loss vector"):
        mtl.value_and_grads(lambda p, x, ys: jnp.sum(_mlp_losses(p, x, ys)), False)(params, x, ys)


# ---------------------------------------------------------------------------------------------
# A Linen model with a per-task copied layer (Recon) and K heads


class Body(nn.Module):
    """trunk (shared) -> branch (copied per task) -> out (shared, once per task stream)."""

    width: int = H

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width, name="trunk")(x))
        x = nn.relu(nn.Dense(self.width, name="branch")(x))
        return nn.Dense(self.width, name="out")(x)


def _linen_problem(width: int = H):
    model = Body(width)
    x = _x()
    body = model.init(jax.random.PRNGKey(0), x)["params"]
    spec = make_spec(body, copied="^branch/")
    body = copy_per_task(body, spec, K)
    body = jax.tree_util.tree_map_with_path(  # make the copies differ
        lambda p, v: (
            v * jnp.arange(1.0, K + 1.0).reshape((K,) + (1,) * (v.ndim - 1))
            if "branch" in jax.tree_util.keystr(p)
            else v
        ),
        body,
    )
    heads = [{"w": jax.random.normal(jax.random.PRNGKey(10 + t), (width, 2)) / 4} for t in range(K)]
    params = {"body": body, "heads": heads}
    ys = jnp.asarray(np.random.default_rng(3).normal(size=(K, B, 2)), jnp.float32)
    forward = per_task(lambda p, x: model.apply({"params": p}, x), spec, K)

    def losses(params, x, ys):
        z = forward(params["body"], x)  # [K, B, H]
        return jnp.stack(
            [jnp.mean((z[t] @ params["heads"][t]["w"] - ys[t]) ** 2) for t in range(K)]
        )

    task_specific = {"body": spec, "heads": True}
    return params, x, ys, losses, task_specific


def test_copies_get_only_their_own_task_gradient():
    params, x, ys, losses, task_specific = _linen_problem()
    _, grads = jax.jit(mtl.value_and_grads(losses, task_specific))(params, x, ys)
    kernel = grads["body"]["branch"]["kernel"]
    assert kernel.shape == (K, H, H)  # one copy axis, no row axis
    for t in range(K):
        grad_t = jax.grad(lambda p: losses(p, x, ys)[t])(params)
        ref = grad_t["body"]["branch"]["kernel"]
        _close(kernel[t], ref[t])
        for s in range(K):  # task t's loss never reaches another task's copy
            assert (np.count_nonzero(ref[s]) == 0) == (s != t)
        _close(jax.tree.map(lambda g: g[t], grads["body"]["trunk"]), grad_t["body"]["trunk"])
        _close(jax.tree.map(lambda g: g[t], grads["body"]["out"]), grad_t["body"]["out"])
        _close(grads["heads"][t], grad_t["heads"][t])


def test_task_specific_leaves_never_get_a_task_by_task_jacobian():
    params, x, ys, losses, task_specific = _linen_problem()
    new = mtl.value_and_grads(losses, task_specific)
    # the traced outputs: copied leaves [K, H, H], heads [H, 2]
    out = jax.eval_shape(new, params, x, ys)[1]
    assert out["body"]["branch"]["kernel"].shape == (K, H, H)
    assert out["heads"][0]["w"].shape == (H, 2)
    assert out["body"]["trunk"]["kernel"].shape == (K, D, H)
    # the compiled program: no [K, K, W, W] buffer, read from its scratch memory rather than its
    # printed HLO. At W = 128 that buffer dominates (the bound: K = 3 of them); the
    # pre-cut algorithm (K pullbacks of the whole loss vector) holds one, so the check can see it.
    width = 128
    params, x, ys, losses, task_specific = _linen_problem(width)
    task_by_task_bytes = K * K * width * width * 4  # f32[K, K, W, W]
    assert temp_bytes(plain_loss_vector_grads(losses, False), params, x, ys) >= (task_by_task_bytes)
    assert temp_bytes(mtl.value_and_grads(losses, task_specific), params, x, ys) < (
        task_by_task_bytes
    )


def test_shared_rows_chain_updates_every_parameter():
    params, x, ys, losses, task_specific = _linen_problem()
    tx = optax.chain(
        mtl.shared_rows(mtl.aggregation.pcgrad(seed=0, num_tasks=K), task_specific), optax.sgd(0.1)
    )
    state = tx.init(params)
    grad_fn = mtl.value_and_grads(losses, task_specific)

    @jax.jit
    def step(params, state):
        task_losses, grads = grad_fn(params, x, ys)
        updates, state = tx.update(grads, state, params, task_losses=task_losses)
        return optax.apply_updates(params, updates), state, updates

    new_params, new_state, updates = step(params, state)
    # state keeps its structure and shapes from init
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    jax.tree.map(lambda a, b: np.testing.assert_equal(np.shape(a), np.shape(b)), new_state, state)
    step(new_params, new_state)  # and plugs back in

    # by hand: PCGrad on the shared rows alone; task-specific gradients unchanged
    task_losses, grads = grad_fn(params, x, ys)
    shared = {k: v for k, v in grads["body"].items() if k != "branch"}
    shared_params = {k: v for k, v in params["body"].items() if k != "branch"}
    agg = mtl.aggregation.pcgrad(seed=0)
    by_hand, _ = agg.update(shared, agg.init(shared_params), task_losses=task_losses)
    _close(
        {k: v for k, v in updates["body"].items() if k != "branch"},
        jax.tree.map(lambda g: -0.1 * g, by_hand),
    )
    _close(updates["body"]["branch"], jax.tree.map(lambda g: -0.1 * g, grads["body"]["branch"]))
    _close(updates["heads"], jax.tree.map(lambda g: -0.1 * g, grads["heads"]))


def test_shared_rows_rejects_a_full_jacobian_for_task_specific_leaves():
    params, x, ys, losses, task_specific = _linen_problem()
    tx = mtl.shared_rows(mtl.aggregation.mean(), task_specific)
    _, jac = mtl.value_and_grads(losses)(params, x, ys)
    with pytest.raises(ValueError, match=r"body/branch/bias: grad \(3, 3, 16\) vs param \(3, 16\)"):
        tx.update(jac, tx.init(params), params)
    with pytest.raises(ValueError, match="only in the parameters: .*heads"):
        tx.update({"body": jac["body"]}, tx.init(params), params)


def test_labels_from_a_spec_with_masks_and_copies():
    params = _linen_problem()[0]
    masks = jax.tree.map(lambda v: np.ones((K, *np.shape(v)), bool), params["body"])
    masks["trunk"]["kernel"] = np.random.default_rng(0).random((K, D, H)) < 0.5
    spec = spec_from_masks(masks)
    spec["branch"] = {"kernel": COPIED, "bias": COPIED}
    labels = mtl.sharing.task_specific_leaves({"body": spec, "heads": True}, params)
    assert labels["body"]["trunk"] == {"kernel": False, "bias": False}
    assert labels["body"]["branch"] == {"kernel": True, "bias": True}
    assert SHARED is spec["out"]["kernel"]


# ---------------------------------------------------------------------------------------------
# per_task_grads: the gradient inside the task vmap (no task-by-task activation cotangents)


def _stacked_heads_problem():
    params, x, ys, losses, task_specific = _linen_problem()
    stacked = {
        "body": params["body"],
        "heads": {"w": jnp.stack([h["w"] for h in params["heads"]])},
    }
    spec = {"body": task_specific["body"], "heads": {"w": COPIED}}
    model = Body()

    def task_loss(view, t, x, ys):
        z = model.apply({"params": view["body"]}, x)
        return jnp.mean((z @ view["heads"]["w"] - ys[t]) ** 2)

    def joint(p, x, ys):
        return losses({"body": p["body"], "heads": [{"w": w} for w in p["heads"]["w"]]}, x, ys)

    return stacked, spec, x, ys, task_loss, joint


def test_per_task_grads_equals_value_and_grads():
    stacked, spec, x, ys, task_loss, joint = _stacked_heads_problem()
    losses, grads = jax.jit(mtl.value_and_grads(mtl.PerTaskLosses(task_loss, spec, K)))(
        stacked, x, ys
    )
    ref_losses, ref = mtl.value_and_grads(joint, spec)(stacked, x, ys)
    _close(losses, ref_losses)
    _close(grads, ref)
    assert grads["body"]["trunk"]["kernel"].shape == (K, D, H)
    assert grads["heads"]["w"].shape == (K, H, 2)


def test_per_task_grads_has_no_task_by_task_buffer():
    stacked, spec, x, ys, task_loss, joint = _stacked_heads_problem()
    # read from the traced program (before XLA): K pullbacks of the whole joint loss vector carry
    # [K, K, B, H] activation cotangents; the gradient inside the task vmap carries none, nor
    # does the joint loss differentiated at its cut (tests/test_grads_cut.py)
    joint_shapes = traced_shapes(plain_loss_vector_grads(joint, spec), stacked, x, ys)
    assert (K, K, B, H) in joint_shapes and has_task_by_task_value(joint_shapes, K)
    cut_shapes = traced_shapes(mtl.value_and_grads(joint, spec), stacked, x, ys)
    assert not has_task_by_task_value(cut_shapes, K)
    shapes = traced_shapes(
        mtl.value_and_grads(mtl.PerTaskLosses(task_loss, spec, K)), stacked, x, ys
    )
    assert not has_task_by_task_value(shapes, K)  # no [K, K, ...] anything: leaves or activations
    with pytest.raises(ValueError, match=r"task_loss_fn must return one task's loss.*\(2,\)"):
        mtl.value_and_grads(mtl.PerTaskLosses(lambda v, t, x, ys: jnp.zeros(2), spec, K))(
            stacked, x, ys
        )


def test_per_task_grads_unrolled_with_heterogeneous_heads():
    params, x, _, _, labels = _linen_problem()
    body_spec = labels["body"]
    names = ["a", "b", "c"]
    widths = {"a": 2, "b": 3, "c": 1}
    heads = {
        n: {"w": jax.random.normal(jax.random.PRNGKey(20 + i), (H, widths[n])) / 4}
        for i, n in enumerate(names)
    }
    rng = np.random.default_rng(5)
    ys = {n: jnp.asarray(rng.normal(size=(B, widths[n])), jnp.float32) for n in names}
    p = {"body": params["body"], "heads": heads}
    model = Body()

    def task_loss(view, t, x, ys):  # t is a Python int: pick the task's own head by name
        z = model.apply({"params": view["body"]}, x)
        return jnp.mean((z @ view["heads"][names[t]]["w"] - ys[names[t]]) ** 2)

    def joint(p, x, ys):
        z = per_task(lambda q, x: model.apply({"params": q}, x), body_spec, K)(p["body"], x)
        return jnp.stack(
            [jnp.mean((z[t] @ p["heads"][n]["w"] - ys[n]) ** 2) for t, n in enumerate(names)]
        )

    labels = {"body": body_spec, "heads": True}
    fn = mtl.value_and_grads(
        mtl.PerTaskLosses(task_loss, {"body": body_spec, "heads": SHARED}, K),
        task_map="unroll",
        task_specific=labels,
    )
    losses_u, grads = jax.jit(fn)(p, x, ys)
    ref_losses, ref = mtl.value_and_grads(joint, labels)(p, x, ys)
    _close(losses_u, ref_losses)
    _close(grads, ref)
    assert grads["heads"]["b"]["w"].shape == (H, 3)  # own gradient, no row axis
    assert grads["body"]["branch"]["kernel"].shape == (K, H, H)
    assert grads["body"]["trunk"]["kernel"].shape == (K, D, H)
    with pytest.raises(ValueError, match="axis_name needs the task vmap"):
        mtl.value_and_grads(
            mtl.PerTaskLosses(task_loss, labels, K, axis_name="tasks"), task_map="unroll"
        )
