"""The Gramian engine below the cut (issue 25; ``mtl_jax/autogram/at_cut.py``).

``value_and_grads(loss_fn, task_specific, gramian=...)`` on a loss vector with task-specific
heads: the heads by one backward, the trunk's G and update from the engine. References are
independent of the library: ``jax.jacrev`` of the loss vector gives the trunk's rows ``J``,
``G = J J^T`` in numpy (float64), the update ``w^T J`` and the heads' gradient
``jax.grad(sum(losses))``; UPGrad's and MGDA's weights are checked against the weights that
the library's weighting gives on the reference G (the weightings' own references are in
tests/test_methods_reference.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl
from mtl_jax import autogram
from mtl_jax.weighting.base import EmptyState, Weighting
from tests._programs import count_products, has_task_by_task_value, traced_shapes

GW = autogram.GramianWeighting
HEADS = {"trunk": False, "heads": True}
TOL = {"float32": 2e-5, "float64": 1e-11}


def stacked_problem(num_tasks: int, dtype=jnp.float32, batch: int = 12):
    """A two-layer trunk and K stacked two-layer heads under one vmap."""
    k = jax.random.split(jax.random.key(7), 6)
    params = {
        "trunk": {
            "w1": jax.random.normal(k[0], (6, 16), dtype) / 2.5,
            "b1": 0.1 * jax.random.normal(k[1], (16,), dtype),
            "w2": jax.random.normal(k[2], (16, 8), dtype) / 4.0,
        },
        "heads": {
            "h": jax.random.normal(k[3], (num_tasks, 8, 5), dtype) / 3.0,
            "o": jax.random.normal(k[4], (num_tasks, 5), dtype),
        },
    }
    x = jax.random.normal(k[5], (batch, 6), dtype)
    y = jax.random.normal(jax.random.key(8), (num_tasks, batch), dtype)

    def task_losses(p, x, y):
        z = jnp.tanh(jnp.tanh(x @ p["trunk"]["w1"] + p["trunk"]["b1"]) @ p["trunk"]["w2"])

        def head(h, yk):
            return jnp.mean((jnp.tanh(z @ h["h"]) @ h["o"] - yk) ** 2)

        return jax.vmap(head)(p["heads"], y)

    return task_losses, params, x, y


def reference(task_losses, params, x, y):
    """Trunk rows by jacrev, G from the definition, the heads' gradient of the summed loss."""
    jac = jax.jacrev(task_losses)(params, x, y)["trunk"]
    rows = [np.reshape(np.asarray(r, np.float64), (r.shape[0], -1)) for r in jax.tree.leaves(jac)]
    J = np.concatenate(rows, axis=1)
    heads = jax.grad(lambda p: jnp.sum(task_losses(p, x, y)))(params)["heads"]
    return jac, J @ J.T, heads


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("task_map", ["vmap", "scan", "unroll"])
@pytest.mark.parametrize("name", ["upgrad", "mgda"])
def test_gram_update_and_heads_match_the_jacobian(name, task_map, dtype):
    with jax.enable_x64(dtype == "float64"):
        task_losses, params, x, y = stacked_problem(4, jnp.dtype(dtype))
        fn = mtl.value_and_grads(task_losses, HEADS, gramian=GW(name), task_map=task_map)
        (losses, aux), grads = jax.jit(fn)(params, x, y)
        jac, gram, heads = reference(task_losses, params, x, y)
        weighting = mtl.weighting.get_weighting(name)
        w_ref, _ = weighting.weigh(jnp.asarray(gram, dtype), EmptyState(), jax.random.key(0), None)
        update = jax.tree.map(lambda r: np.tensordot(np.asarray(aux["weights"]), r, 1), jac)
        tol = TOL[dtype]
        assert rel(losses, task_losses(params, x, y)) < tol
        assert rel(aux["gram"], gram) < tol
        assert rel(aux["weights"], w_ref) < 1e3 * tol  # the QP's own tolerance
        for got, want in zip(jax.tree.leaves(grads["trunk"]), jax.tree.leaves(update), strict=True):
            assert rel(got, want) < tol
        for got, want in zip(jax.tree.leaves(grads["heads"]), jax.tree.leaves(heads), strict=True):
            assert rel(got, want) < tol


def test_pcgrad_key_and_a_list_of_heads():
    """A randomised weighting gets the key; heads given as a Python list of tasks."""
    k = jax.random.split(jax.random.key(1), 4)
    params = {
        "trunk": jax.random.normal(k[0], (5, 7)),
        "heads": [jax.random.normal(k[1], (7,))] * 3,
    }
    x, y = jax.random.normal(k[2], (9, 5)), jax.random.normal(k[3], (3, 9))

    def task_losses(p, x, y):
        z = jnp.tanh(x @ p["trunk"])
        return jnp.stack([jnp.mean((z @ h - yk) ** 2) for h, yk in zip(p["heads"], y, strict=True)])

    labels = {"trunk": False, "heads": [True] * 3}
    grad_fn = mtl.value_and_grads(task_losses, labels, gramian=GW("pcgrad"))
    fn = jax.jit(grad_fn)
    jac, gram, heads = reference(task_losses, params, x, y)
    for seed in range(3):
        (_, aux), grads = fn(params, x, y, key=jax.random.key(seed))
        assert rel(aux["gram"], gram) < 2e-5
        want = np.tensordot(np.asarray(aux["weights"]), np.asarray(jac), 1)
        assert rel(grads["trunk"], want) < 2e-5
        assert rel(grads["heads"], heads) < 2e-5
    assert grad_fn.plan(params, x, y).methods()["heads/0"] == "own"


def test_no_task_by_task_value_at_k40_unlike_the_plain_engine():
    """The plain engine pulls K cotangents through the K stacked heads: ``[K, K, ...]``."""
    num = 40
    task_losses, params, x, y = stacked_problem(num)
    at_cut = mtl.value_and_grads(task_losses, HEADS, gramian=GW("mean"))
    plain = autogram.engine_value_and_grads(task_losses, GW("mean"), HEADS)
    assert not has_task_by_task_value(traced_shapes(at_cut, params, x, y), num)
    assert has_task_by_task_value(traced_shapes(plain, params, x, y), num)


def test_one_trunk_forward():
    """The cut's heads read the engine's own forward of the trunk: the first layer's ``x @ w1``
    runs once in the step (it ran twice, the cut's and the engine's, before)."""
    task_losses, params, x, y = stacked_problem(3)
    fn = mtl.value_and_grads(task_losses, HEADS, gramian=GW("upgrad"))
    w1 = params["trunk"]["w1"]
    assert count_products(fn, x.shape, w1.shape, params, x, y) == 1
    assert count_products(task_losses, x.shape, w1.shape, params, x, y) == 1  # the helper


@pytest.mark.parametrize("num_tasks, method", [(2, "rows"), (40, "identity")])
def test_dense_leaf_takes_the_cheaper_method_and_its_update(num_tasks, method):
    """``z1 @ w2`` with 16 inputs and 12 samples: at K = 2 its K rows (combined for the update)
    cost fewer flops than the identity plus a weighted VJP, at K = 40 more (``layers.choose``);
    both give the reference G and update."""
    task_losses, params, x, y = stacked_problem(num_tasks)
    fn = mtl.value_and_grads(task_losses, HEADS, gramian=GW("upgrad"))
    assert fn.plan(params, x, y).methods()["trunk/w2"] == method
    (_, aux), grads = jax.jit(fn)(params, x, y)
    jac, gram, _ = reference(task_losses, params, x, y)
    update = np.tensordot(np.asarray(aux["weights"]), np.asarray(jac["w2"], np.float64), 1)
    assert rel(aux["gram"], gram) < 2e-5
    assert rel(grads["trunk"]["w2"], update) < 2e-5


def test_plan_says_the_heads_are_after_the_cut():
    task_losses, params, x, y = stacked_problem(3)
    gramian = GW("upgrad", identities="always")
    plan = mtl.value_and_grads(task_losses, HEADS, gramian=gramian).plan(params, x, y)
    methods = plan.methods()
    assert plan.num_objectives == 3
    assert {methods[p] for p in methods if p.startswith("heads")} == {"own"}
    assert methods["trunk/w1"] == "identity" and methods["trunk/w2"] == "identity"


def test_shared_leaves_after_the_cut_fall_back_to_the_plain_engine():
    """Without labels the heads are shared: their rows belong in G (block-diagonal)."""
    task_losses, params, x, y = stacked_problem(3)
    fn = mtl.value_and_grads(task_losses, gramian=GW("mean"))
    (_, aux), _ = fn(params, x, y)
    jac = jax.jacrev(task_losses)(params, x, y)
    rows = [np.reshape(np.asarray(r, np.float64), (3, -1)) for r in jax.tree.leaves(jac)]
    J = np.concatenate(rows, axis=1)
    assert rel(aux["gram"], J @ J.T) < 2e-5
    assert "own" not in fn.plan(params, x, y).methods().values()


def test_a_weighting_sees_the_true_losses_and_aux_and_state_pass_through():
    """The engine differentiates a projection of the trunk; the weighting must still get the
    loss vector's values, the state must thread and ``has_aux`` must return the model's aux."""
    seen = {}

    def init(num_tasks):
        return jnp.zeros((num_tasks,))

    def weigh(gram, state, key, losses):
        seen["losses"] = losses
        return losses / jnp.sum(losses), state + losses

    task_losses, params, x, y = stacked_problem(3)

    def with_aux(p, x, y):
        losses = task_losses(p, x, y)
        return losses, {"total": jnp.sum(losses)}

    fn = mtl.value_and_grads(with_aux, HEADS, has_aux=True, gramian=GW(Weighting(init, weigh)))
    state = fn.init_weighting_state(params, 3)
    (_, aux), _ = fn(params, x, y, weighting_state=state)
    want = task_losses(params, x, y)
    assert rel(seen["losses"], want) < 1e-6
    assert rel(aux["weighting_state"], want) < 1e-6
    assert rel(aux["aux"]["total"], jnp.sum(want)) < 1e-6
    assert rel(aux["weights"], want / jnp.sum(want)) < 1e-6
