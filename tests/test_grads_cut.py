"""The loss-vector path differentiated at its cut (mtl_jax/cut.py, issue 25).

References are independent: per-task ``jax.grad`` of ``loss_fn(params)[t]`` (rows of shared
leaves) and ``jax.grad`` of the summed loss (task-specific leaves); the traced program is read
for ``[K, K, ...]`` values (tests/_programs.py). ``plain_loss_vector_grads`` is the pre-issue-25
algorithm (K pullbacks of the whole loss vector), kept as the baseline that has the
task-by-task buffers the new path must not have.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl
from mtl_jax.cut import describe_cut
from tests._programs import has_task_by_task_value, temp_bytes, traced_shapes

B, D, H, C = 6, 5, 7, 3  # batch, input, features, classes: distinct from every K below


def plain_loss_vector_grads(loss_fn, task_specific, has_aux=False):
    """K pullbacks of the whole loss vector for shared leaves, one of the all-ones cotangent for
    task-specific ones (what value_and_grads did before the cut; [K, K, ...] after the heads)."""

    def fn(params, *args):
        treedef = jax.tree.structure(params)
        labels = jax.tree.leaves(mtl.sharing.task_specific_leaves(task_specific, params))
        out = jax.vjp(lambda p: loss_fn(p, *args), params, has_aux=has_aux)
        losses, pull = out[:2]
        rows = jax.vmap(lambda c: jax.tree.leaves(pull(c)[0]))(jnp.eye(losses.shape[0]))
        total = jax.tree.leaves(pull(jnp.ones_like(losses))[0])
        grads = [t if s else r for r, t, s in zip(rows, total, labels, strict=True)]
        value = (losses, out[2]) if has_aux else losses
        return value, treedef.unflatten(grads)

    return fn


def _reference(loss_fn, params, args, labels):
    """Rows from per-task jax.grad for shared leaves; the summed loss's gradient elsewhere."""
    num = loss_fn(params, *args).shape[0]
    per_task = [jax.grad(lambda p, t=t: loss_fn(p, *args)[t])(params) for t in range(num)]
    total = jax.grad(lambda p: jnp.sum(loss_fn(p, *args)))(params)
    rows = jax.tree.map(lambda *g: jnp.stack(g), *per_task)
    flags = mtl.sharing.task_specific_leaves(labels, params)
    return jax.tree.map(lambda r, t, s: t if s else r, rows, total, flags)


def _close(a, b, rtol=2e-5, atol=2e-6):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def _stacked(num_tasks, dtype=jnp.float32, seed=0):
    """MLP trunk D-H-H, K stacked heads H-H-C under one vmap, integer labels (the README path)."""
    rng = np.random.default_rng(seed)
    arr = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-2] if len(s) > 1 else 1), dtype)
    params = {
        "trunk": [{"w": arr(D, H), "b": arr(H)}, {"w": arr(H, H), "b": arr(H)}],
        "heads": {
            "h": {"w": arr(num_tasks, H, H), "b": arr(num_tasks, H)},
            "o": {"w": arr(num_tasks, H, C), "b": arr(num_tasks, C)},
        },
    }
    x = jnp.asarray(rng.normal(size=(B, D)), dtype)
    y = jnp.asarray(rng.integers(0, C, size=(num_tasks, B)))
    return params, x, y


def _trunk(trunk, x):
    for layer in trunk:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x


def _head_loss(head, z, y):
    h = jnp.tanh(z @ head["h"]["w"] + head["h"]["b"])
    logits = h @ head["o"]["w"] + head["o"]["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _stacked_losses(params, x, y):
    z = _trunk(params["trunk"], x)
    return jax.vmap(_head_loss, in_axes=(0, None, 0))(params["heads"], z, y)


LABELS = {"trunk": False, "heads": True}


@pytest.mark.parametrize(
    "task_map,chunk_size,jit",
    [
        ("vmap", None, True),
        ("vmap", None, False),
        ("vmap", 2, True),
        ("unroll", None, True),
        ("scan", None, True),
    ],
)
def test_stacked_heads_equal_per_task_grads(task_map, chunk_size, jit):
    params, x, y = _stacked(4)
    fn = mtl.value_and_grads(_stacked_losses, LABELS, task_map=task_map, chunk_size=chunk_size)
    losses, grads = (jax.jit(fn) if jit else fn)(params, x, y)
    _close(losses, _stacked_losses(params, x, y))
    _close(grads, _reference(_stacked_losses, params, (x, y), LABELS))
    assert grads["trunk"][0]["w"].shape == (4, D, H)
    assert grads["heads"]["o"]["w"].shape == (4, H, C)


def test_float64_is_exact_to_float64_rounding():
    with jax.enable_x64(True):
        params, x, y = _stacked(3, jnp.float64)
        _, grads = jax.jit(mtl.value_and_grads(_stacked_losses, LABELS))(params, x, y)
        assert grads["trunk"][0]["w"].dtype == jnp.float64
        _close(grads, _reference(_stacked_losses, params, (x, y), LABELS), rtol=1e-12, atol=1e-13)


def test_stacked_heads_cut_is_the_features_and_no_task_by_task_value():
    num = 40
    params, x, y = _stacked(num)
    leaves, treedef = jax.tree.flatten(params)
    found = describe_cut(lambda flat: _stacked_losses(treedef.unflatten(flat), x, y), leaves)
    assert found["cut"] == [(B, H)]  # z, the trunk's output
    assert found["entries"] == [("dot_general", "sliced")]  # z @ W_k under the task vmap
    new = traced_shapes(mtl.value_and_grads(_stacked_losses, LABELS), params, x, y)
    old = traced_shapes(plain_loss_vector_grads(_stacked_losses, LABELS), params, x, y)
    assert (num, num, B, H) in old and has_task_by_task_value(old, num)  # the check can see it
    assert not has_task_by_task_value(new, num)
    # and in the compiled program: less scratch memory than one [K, K, B, H] cotangent
    task_by_task = num * num * B * H * 4
    assert temp_bytes(plain_loss_vector_grads(_stacked_losses, LABELS), params, x, y) >= (
        task_by_task
    )
    assert temp_bytes(mtl.value_and_grads(_stacked_losses, LABELS), params, x, y) < task_by_task


def test_same_as_trunk_and_heads():
    params, x, y = _stacked(5)
    losses, grads = jax.jit(mtl.value_and_grads(_stacked_losses, LABELS))(params, x, y)
    ref_losses, ref = jax.jit(mtl.value_and_grads(mtl.TrunkAndHeads(_trunk, _head_loss)))(
        params, x, y
    )
    _close(losses, ref_losses)
    _close(grads, ref)


def _list_losses(params, x, y):
    z = _trunk(params["trunk"], x)
    return jnp.stack([_head_loss(h, z, t) for h, t in zip(params["heads"], y, strict=True)])


def test_list_of_heads_and_the_full_jacobian():
    params, x, y = _stacked(3)
    params["heads"] = [jax.tree.map(lambda v, t=t: v[t], params["heads"]) for t in range(3)]
    leaves, treedef = jax.tree.flatten(params)
    found = describe_cut(lambda flat: _list_losses(treedef.unflatten(flat), x, y), leaves)
    assert found["cut"] == [(B, H)]
    assert [kind for _, kind in found["entries"]] == ["task"] * 3  # one VJP per head
    for labels in (LABELS, None, {"trunk": True, "heads": True}):
        _, grads = jax.jit(mtl.value_and_grads(_list_losses, labels))(params, x, y)
        ref = _reference(_list_losses, params, (x, y), False if labels is None else labels)
        _close(grads, ref)
    # the full Jacobian of a head leaf: row t is head t's gradient, the others are zero
    _, full = mtl.value_and_grads(_list_losses)(params, x, y)
    assert full["heads"][1]["o"]["w"].shape == (3, H, C)
    assert np.count_nonzero(full["heads"][1]["o"]["w"][0]) == 0


def test_recon_branch_then_shared_layer_inside_the_streams():
    """trunk -> per-task copy [K, ...] -> a SHARED layer run in every task stream -> heads:
    the shared layer after the branch gets its rows from the all-ones backward, sliced."""
    num = 3
    rng = np.random.default_rng(1)
    p = {
        "trunk": jnp.asarray(rng.normal(size=(D, H)), jnp.float32),
        "branch": jnp.asarray(rng.normal(size=(num, H, H)) / 3, jnp.float32),
        "out": jnp.asarray(rng.normal(size=(H, H)) / 3, jnp.float32),
        "heads": jnp.asarray(rng.normal(size=(num, H)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)

    def losses(p, x):
        z = jnp.tanh(x @ p["trunk"])
        streams = jax.vmap(lambda w: jnp.tanh(jnp.tanh(z @ w) @ p["out"]))(p["branch"])  # [K,B,H]
        return jnp.mean((jnp.einsum("kbh,kh->kb", streams, p["heads"]) - 1.0) ** 2, axis=1)

    labels = {"trunk": False, "branch": True, "out": False, "heads": True}
    _, grads = jax.jit(mtl.value_and_grads(losses, labels))(p, x)
    _close(grads, _reference(losses, p, (x,), labels))
    assert grads["branch"].shape == (num, H, H)
    new = traced_shapes(mtl.value_and_grads(losses, labels), p, x)
    assert not has_task_by_task_value(new, num)


@jax.custom_jvp
def _modulate(z, s):  # a custom_jvp entry: z[B, H] * s[K, H] -> [K, B, H]
    return z[None] * s[:, None]


@_modulate.defjvp
def _modulate_jvp(primals, tangents):
    (z, s), (dz, ds) = primals, tangents
    return _modulate(z, s), dz[None] * s[:, None] + z[None] * ds[:, None]


def test_an_unsliceable_entry_falls_back_to_masked_pullbacks():
    num = 4
    params, x, y = _stacked(num)
    params["scale"] = jnp.asarray(np.random.default_rng(2).normal(size=(num, H)), jnp.float32)

    def losses(p, x, y):
        z = _modulate(_trunk(p["trunk"], x), p["scale"])  # [K, B, H]
        return jax.vmap(_head_loss, in_axes=(0, 0, 0))(p["heads"], z, y)

    labels = {"trunk": False, "heads": True, "scale": True}
    leaves, treedef = jax.tree.flatten(params)
    found = describe_cut(lambda flat: losses(treedef.unflatten(flat), x, y), leaves)
    assert found["entries"] == [("custom_jvp_call", "masked")]
    _, grads = jax.jit(mtl.value_and_grads(losses, labels))(params, x, y)
    _close(grads, _reference(losses, params, (x, y), labels))


def test_an_opaque_loss_op_puts_everything_in_the_trunk_and_stays_exact():
    params, x, y = _stacked(3)

    def losses(p, x, y):  # tasks mixed by a scan over the task axis: no separable head
        per_task = _stacked_losses(p, x, y)
        _, out = jax.lax.scan(lambda c, v: (c + v, v + 0.1 * c), 0.0, per_task)
        return out

    leaves, treedef = jax.tree.flatten(params)
    found = describe_cut(lambda flat: losses(treedef.unflatten(flat), x, y), leaves)
    assert len(found["trunk_leaves"]) == len(leaves)  # every leaf is trunk: the plain Jacobian
    _, grads = jax.jit(mtl.value_and_grads(losses, LABELS))(params, x, y)
    _close(grads, _reference(losses, params, (x, y), LABELS))


def test_has_aux_and_a_shared_bias_on_every_head():
    params, x, y = _stacked(3)
    params["bias"] = jnp.arange(C, dtype=jnp.float32) / 10  # shared, added to every head

    def losses(p, x, y):
        z = _trunk(p["trunk"], x)
        z_mean = jnp.mean(z)  # read by no loss, before the heads read z: z is still the cut
        out = jax.vmap(
            lambda h, t: _head_loss(
                {"h": h["h"], "o": {"w": h["o"]["w"], "b": h["o"]["b"] + p["bias"]}}, z, t
            )
        )(p["heads"], y)
        return out, {"z_mean": z_mean}

    labels = {"trunk": False, "heads": True, "bias": False}
    (_, aux), grads = jax.jit(mtl.value_and_grads(losses, labels, has_aux=True))(params, x, y)
    _close(aux["z_mean"], jnp.mean(_trunk(params["trunk"], x)))
    _close(grads, _reference(lambda p, x, y: losses(p, x, y)[0], params, (x, y), labels))
    assert grads["bias"].shape == (3, C)


def test_concatenate_reshape_transpose_and_sliced_head_groups():
    """Heads in two vmapped groups (slices of the stacked leaves, concatenated losses), with
    concatenate / reshape / transpose inside each head: the labels follow every one of them."""
    num = 4
    params, x, y = _stacked(num)

    def head(h, z, t):
        a = jnp.tanh(z @ h["h"]["w"] + h["h"]["b"])  # [B, H]
        both = jnp.concatenate([a, a**2], axis=-1).reshape(B, 2, H).transpose(1, 0, 2)
        logits = both.sum(0) @ h["o"]["w"] + h["o"]["b"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, None], axis=1))

    def losses(p, x, y):
        z = _trunk(p["trunk"], x)
        first = jax.tree.map(lambda v: v[:2], p["heads"])
        rest = jax.tree.map(lambda v: v[2:], p["heads"])
        group = lambda hs, ys: jax.vmap(head, in_axes=(0, None, 0))(hs, z, ys)
        return jnp.concatenate([group(first, y[:2]), group(rest, y[2:])])

    leaves, treedef = jax.tree.flatten(params)
    found = describe_cut(lambda flat: losses(treedef.unflatten(flat), x, y), leaves)
    assert found["cut"] == [(B, H)]
    assert all(kind == "sliced" for _, kind in found["entries"])
    _, grads = jax.jit(mtl.value_and_grads(losses, LABELS))(params, x, y)
    _close(grads, _reference(losses, params, (x, y), LABELS))
    new = traced_shapes(mtl.value_and_grads(losses, LABELS), params, x, y)
    assert not has_task_by_task_value(new, num)
