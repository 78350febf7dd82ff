"""No path from the task Jacobian to the update holds a concatenated ``[K, P_total]`` copy.

Issue 16 ("Memory"): the Gram matrix is a sum of per-leaf ``K x K`` products and the combination
is per leaf, so no program needs a buffer of all K rows of all P parameters at once beyond the
Jacobian's own leaves. These tests trace each path (``jax.make_jaxpr``, sub-jaxprs included,
``tests/_programs.py``) rather than read XLA's printed HLO: no value in the program, before XLA
optimizes it, may have ``K * P_total`` elements or more, where every leaf is well below
``P_total``. A deliberately concatenating Gramian (``ravel_pytree``) is checked to
trip the same detector, so the test fails when the feature breaks.

Also: ``chunk_size`` gives the unchunked Jacobian (against ``jax.jacrev``) and bounds the K-row
activation cotangents (the compiled temp bytes shrink).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import mtl_jax as mtl
from tests._programs import largest_traced_size

K = 6
BATCH = 4
SIZES = (40, 48, 48, 40)  # three layers of similar size: the largest leaf is ~1/3 of P_total


def _params(key: jax.Array) -> dict:
    keys = jax.random.split(key, len(SIZES) - 1)
    return {
        f"l{i}": {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:], strict=True))
    }


def _encode(params: dict, x: jax.Array) -> jax.Array:
    for i in range(len(SIZES) - 1):
        x = jnp.tanh(x @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"])
    return x


def _head_loss(head: jax.Array, z: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((z @ head - y) ** 2)


def _losses(params: dict, heads: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    z = _encode(params, x)
    return jax.vmap(_head_loss, in_axes=(0, None, 0))(heads, z, y)


def _problem():
    key = jax.random.PRNGKey(0)
    params = _params(key)
    heads = jax.random.normal(jax.random.PRNGKey(1), (K, SIZES[-1])) / np.sqrt(SIZES[-1])
    x = jax.random.normal(jax.random.PRNGKey(2), (BATCH, SIZES[0]))
    y = jax.random.normal(jax.random.PRNGKey(3), (K, BATCH))
    return params, heads, x, y


def _p_total(params: dict) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def _jacobian(params, heads, x, y):
    grad_fn = mtl.value_and_grads(mtl.TrunkAndHeads(_encode, _head_loss))
    return grad_fn({"trunk": params, "heads": heads}, x, y)[1]["trunk"]


def test_problem_makes_the_detector_meaningful():
    params, heads, x, y = _problem()
    p_total = _p_total(params)
    largest_leaf = max(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
    assert 2 * largest_leaf < p_total  # a [K, P_total] buffer cannot be one leaf's rows
    assert K * BATCH * max(SIZES) < K * p_total  # nor an activation cotangent
    # The detector fires on a Gramian that concatenates the leaves into one [K, P] matrix.
    jac = _jacobian(params, heads, x, y)

    def concatenating_gramian(jac):
        rows = jax.vmap(lambda row: ravel_pytree(row)[0])(jac)  # [K, P_total]
        return rows @ rows.T

    assert largest_traced_size(concatenating_gramian, jac) >= K * p_total
    np.testing.assert_allclose(
        mtl.gramian.gramian(jac), concatenating_gramian(jac), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "granularity", ["global", "leaf", mtl.gramian.by_module], ids=["global", "leaf", "by_module"]
)
def test_gramian_and_groupings_never_concatenate_leaves(granularity):
    params, heads, x, y = _problem()
    jac = _jacobian(params, heads, x, y)
    limit = K * _p_total(params)
    assert largest_traced_size(lambda j: mtl.gramian.gramian(j, granularity), jac) < limit


@pytest.mark.parametrize("name", ["upgrad", "mgda", "pcgrad"])
def test_full_step_never_concatenates_leaves(name):
    """Jacobian + Gram + aggregator (solve, combine) + conflict tracker + Adam, one program."""
    params, heads, x, y = _problem()
    limit = K * _p_total(params)
    tracker = mtl.ConflictTracker(num_tasks=K, granularity=mtl.gramian.by_module)
    tx = optax.chain(mtl.get_method(name, num_tasks=K).transform, optax.adam(1e-3))

    def step(params, heads, opt_state, cstate, x, y):
        grad_fn = mtl.value_and_grads(mtl.TrunkAndHeads(_encode, _head_loss))
        losses, grads = grad_fn({"trunk": params, "heads": heads}, x, y)
        jac, head_grads = grads["trunk"], grads["heads"]
        updates, opt_state = tx.update(jac, opt_state, params, task_losses=losses)
        cstate = tracker.update(cstate, jac)
        return optax.apply_updates(params, updates), head_grads, opt_state, cstate

    args = (params, heads, tx.init(params), tracker.init(params), x, y)
    assert largest_traced_size(step, *args) < limit


def test_chunked_step_never_concatenates_leaves():
    params, heads, x, y = _problem()
    tx = optax.chain(mtl.aggregation.upgrad(num_tasks=K), optax.sgd(1e-2))

    def step(params, opt_state):
        losses, jac = mtl.value_and_grads(_losses, chunk_size=2)(params, heads, x, y)
        return tx.update(jac, opt_state, params, task_losses=losses)

    assert largest_traced_size(step, params, tx.init(params)) < K * _p_total(params)


def test_per_task_grads_step_never_concatenates_leaves():
    """``per_task_grads`` + ``shared_rows(UPGrad)``: rows for the trunk, heads' own gradients."""
    params, heads, x, y = _problem()
    full = {"trunk": params, "heads": heads}
    labels = {"trunk": False, "heads": True}

    def task_loss(view, t, x, y):
        return _head_loss(view["heads"][t], _encode(view["trunk"], x), y[t])

    grads_fn = mtl.value_and_grads(
        mtl.PerTaskLosses(task_loss, mtl.SHARED, K), task_specific=labels
    )
    tx = optax.chain(mtl.shared_rows(mtl.aggregation.upgrad(num_tasks=K), labels), optax.sgd(1e-2))

    def step(full, opt_state):
        losses, grads = grads_fn(full, x, y)
        return tx.update(grads, opt_state, full, task_losses=losses)

    assert largest_traced_size(step, full, tx.init(full)) < K * _p_total(params)


def test_representation_path_never_concatenates_representation_leaves():
    """MGDA-UB on a representation with two leaves: the Gram matrix sums their blocks."""
    params, heads, x, y = _problem()

    def encode_two(p, x):
        z = _encode(p, x)
        return {"a": z[:, :20], "b": z[:, 20:]}

    def head_two(head, z, y):
        return _head_loss(head, jnp.concatenate([z["a"], z["b"]], axis=1), y)

    fn = mtl.value_and_grads(
        mtl.TrunkAndHeads(encode_two, head_two),
        representation=mtl.RepresentationWeighting("mgda"),
    )
    state = fn.weighting.init(K)
    (_, aux), _ = fn({"trunk": params, "heads": heads}, x, y, weighting_state=state)
    # Reference: G_kl = <dL_k/dz, dL_l/dz> over batch and features, z concatenated in NumPy.
    rep = jax.vmap(jax.grad(lambda h, z, y: _head_loss(h, z, y), argnums=1), in_axes=(0, None, 0))
    r = np.asarray(rep(heads, _encode(params, x), y)).reshape(K, -1)
    np.testing.assert_allclose(aux["gram"], r @ r.T, rtol=1e-4, atol=1e-7)
    limit = K * BATCH * SIZES[-1]  # the concatenated [K, B * D] representation-gradient matrix
    largest = largest_traced_size(
        lambda p, s: fn({"trunk": p, "heads": heads}, x, y, weighting_state=s)[1]["trunk"],
        params,
        state,
    )
    assert largest < max(limit, _p_total(params))


def test_chunk_size_equals_jacrev_and_bounds_cotangents():
    params, heads, _, _ = _problem()
    big_x = jax.random.normal(jax.random.PRNGKey(4), (256, SIZES[0]))
    big_y = jax.random.normal(jax.random.PRNGKey(5), (K, 256))
    ref = jax.jacrev(_losses)(params, heads, big_x, big_y)
    temps = {}
    for chunk in (None, 2, 1):
        fn = mtl.value_and_grads(_losses, chunk_size=chunk)
        _, jac = jax.jit(fn)(params, heads, big_x, big_y)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), jac, ref)
        compiled = jax.jit(fn).lower(params, heads, big_x, big_y).compile()
        temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
    # K x [256, 48] activation cotangents at once without chunks; 2 or 1 task at a time with.
    assert temps[1] < temps[None]
    assert temps[2] < temps[None]
