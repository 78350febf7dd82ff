"""Bad input gets a clear error, or a documented and tested behaviour -- never a silent wrong answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from tests import _matrices as M

EVERY = [
    mtl.aggregation.mean,
    mtl.aggregation.sum_,
    mtl.aggregation.pcgrad,
    mtl.aggregation.mgda,
    mtl.aggregation.cagrad,
    mtl.aggregation.imtl_g,
    mtl.aggregation.graddrop,
    lambda: mtl.aggregation.linear([1.0, 2.0, 3.0]),
]


def _problem(k=3):
    jac = M.to_tree(M.sample("conflicting", k))
    return jac, M.params_like(jac)


@pytest.mark.parametrize("make", EVERY)
def test_leaves_disagreeing_on_k(make):
    jac, params = _problem()
    jac["head"] = jac["head"][:2]
    tx = make()
    with pytest.raises(ValueError, match="disagree on the task axis"):
        tx.update(jac, tx.init(params), params)


@pytest.mark.parametrize("make", EVERY)
def test_task_losses_of_the_wrong_length(make):
    jac, params = _problem()
    tx = make()
    with pytest.raises(ValueError, match=r"task_losses has shape \(2,\).*K=3"):
        tx.update(jac, tx.init(params), params, task_losses=jnp.ones(2))


@pytest.mark.parametrize("make", EVERY)
def test_jacobian_not_matching_params(make):
    jac, params = _problem()
    tx = make()
    state = tx.init(params)
    bad = dict(params, head=np.zeros(15, np.float32))
    with pytest.raises(ValueError, match=r"head: jac \(3, 16\) vs param \(15,\)"):
        tx.update(jac, state, bad)
    with pytest.raises(ValueError, match="structure of the parameters"):
        tx.update(jac, state, {"enc": params["enc"]})


@pytest.mark.parametrize("make", EVERY)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradients_give_an_all_nan_update(make, bad):
    """Documented behaviour: a non-finite Jacobian entry makes the whole update NaN."""
    jac, params = _problem()
    jac["enc"]["w"][1, 0, 0] = bad
    tx = make()
    out, _ = jax.jit(tx.update)(jac, tx.init(params), params)
    assert all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(out))


@pytest.mark.parametrize("make", EVERY)
def test_non_finite_losses_give_an_all_nan_update(make):
    jac, params = _problem()
    tx = make()
    out, _ = tx.update(jac, tx.init(params), params, task_losses=jnp.array([1.0, jnp.nan, 1.0]))
    assert all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(out))


def test_apply_if_finite_skips_non_finite_steps():
    jac, params = _problem()
    params = jax.tree.map(lambda p: p + 1.0, params)
    # optax.apply_if_finite goes after the aggregator (whose NaN update it then rejects): its
    # rejected update is zeros shaped like its input, which must be the parameters' shape.
    tx = optax.chain(
        mtl.aggregation.pcgrad(), optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5)
    )
    state = tx.init(params)
    jac["head"][0, 0] = np.nan
    updates, state = tx.update(jac, state, params)
    new = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, new, params)
    assert int(state[1].notfinite_count) == 1


def test_num_tasks_mismatch_and_linear_length():
    jac, params = _problem()
    tx = mtl.aggregation.pcgrad(num_tasks=4)
    with pytest.raises(ValueError, match="num_tasks=4.*K=3"):
        tx.update(jac, tx.init(params), params)
    tx = mtl.aggregation.linear([1.0, 2.0])
    with pytest.raises(ValueError, match="length 2.*K=3"):
        tx.update(jac, tx.init(params), params)


def test_unknown_aggregator_name_and_hyperparameter():
    with pytest.raises(ValueError, match=r"Unknown method 'pcgard'.*valid names.*pcgrad"):
        mtl.get_method("pcgard")
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) \['alpha'\].*'c'"):
        mtl.get_method("cagrad", alpha=0.4)


def test_scalar_leaf_in_jacobian():
    with pytest.raises(ValueError, match="scalar"):
        mtl.aggregation.mean().update(
            {"a": jnp.ones(())}, mtl.aggregation.mean().init({"a": jnp.ones(())})
        )
