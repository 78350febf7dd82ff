"""The optax contract: an aggregator's state keeps its structure, shapes and dtypes from ``init`` on.

Every registered aggregator (``mtl.aggregation.AGGREGATORS``, with its defaults) and every registered
scalarizer (``mtl.scalarization.SCALARIZERS`` through ``mtl.scalarization.from_scalarizer``) must work unchanged

* under ``optax.apply_if_finite`` (a ``lax.cond`` between the updated and the kept state),
* as the carry of a ``jax.lax.scan`` over training steps,
* chained before ``optax.MultiSteps`` (gradient accumulation of the aggregated update),

and a jitted step must compile once. Methods whose own state needs K (per-task EMA targets,
reused weights, squared-gradient sums, every scalarizer) raise a ``ValueError`` that names
``num_tasks`` when it is missing, and are then built with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from tests import _matrices as M
from tests._properties import same_batch_twice

K = 3

# Aggregators whose own (not logging) state needs K: built with num_tasks=K.
NEEDS_K = {"gradvac", "excess_mtl", "ema_weights", "db_mtl", "moco", "sdmgrad", "modo"}
# Constructor arguments without a default.
REQUIRED = {"linear": {"weights": [0.5, 1.0, 2.0]}}


def _params() -> dict:
    return {"enc": {"w": jnp.zeros((2, 5)), "b": jnp.zeros((4,))}, "head": jnp.zeros((6,))}


def _jacobian(seed: int, scale: float = 1.0) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "enc": {
            "w": scale * jax.random.normal(keys[0], (K, 2, 5)),
            "b": scale * jax.random.normal(keys[1], (K, 4)),
        },
        "head": scale * jax.random.normal(keys[2], (K, 6)),
    }


def _losses(seed: int) -> jax.Array:
    return 1.0 + jax.random.uniform(jax.random.PRNGKey(100 + seed), (K,))


def _fed(method: mtl.Method):
    """The method's transform, given the inputs the steps here do not pass: ``paired_rows``
    (the rows as both batches) and ``lambda_grad`` (a hypergradient made from the losses)."""
    tx = method.transform
    if "paired_rows" in method.inputs:
        return same_batch_twice(tx)
    if "lambda_grad" not in method.inputs:
        return tx

    def update(jac, state, params=None, *, task_losses=None, **inputs):
        inputs.setdefault("lambda_grad", task_losses - 1.0)
        return tx.update(jac, state, params, task_losses=task_losses, **inputs)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _aggregator(name: str, with_k: bool):
    kwargs = dict(REQUIRED.get(name, {}))
    if with_k or name in NEEDS_K:
        kwargs["num_tasks"] = K
    return _fed(mtl.get_method(name, **kwargs))


def _scalarizer(name: str):
    layer = "enc" if name == "gradnorm" else None  # GradNorm balances one shared layer's norms
    return mtl.scalarization.from_scalarizer(
        mtl.scalarization.get_scalarizer(name), num_tasks=K, grad_norm_layer=layer, name=name
    )


CASES = [(f"agg:{n}", n, False) for n in mtl.aggregation.AGGREGATORS] + [
    (f"agg:{n}[num_tasks]", n, True) for n in mtl.aggregation.AGGREGATORS
]
SCALARIZER_CASES = [f"scal:{n}" for n in mtl.scalarization.SCALARIZERS] + ["method:auto_lambda"]


def _build(case: str):
    kind, _, rest = case.partition(":")
    if kind == "scal":
        return _scalarizer(rest)
    if kind == "method":  # catalogue methods in neither registry (Auto-Lambda)
        return _fed(mtl.get_method(rest, num_tasks=K))
    name = rest.removesuffix("[num_tasks]")
    return _aggregator(name, rest.endswith("[num_tasks]"))


ALL = [c[0] for c in CASES] + SCALARIZER_CASES
# apply_if_finite and MultiSteps wrap what follows the aggregator, whose state does not enter
# their conditionals: the defaults suffice there (num_tasks only adds the logs).
DEFAULTS = [c[0] for c in CASES if not c[2]] + SCALARIZER_CASES


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


@pytest.mark.parametrize("case", ALL)
def test_state_keeps_structure_shapes_and_dtypes(case):
    tx = _build(case)
    params = _params()
    state = tx.init(params)
    _, new_state = jax.eval_shape(
        lambda j, s, loss: tx.update(j, s, params, task_losses=loss),
        _jacobian(0),
        state,
        _losses(0),
    )
    assert _signature(new_state) == _signature(state)


def _jitted_step(tx: optax.GradientTransformation):
    """``(params, state, jac, losses) -> (params, state)``: one jitted update through ``tx``."""

    @jax.jit
    def step(params, state, jac, losses):
        updates, state = tx.update(jac, state, params, task_losses=losses)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("case", DEFAULTS)
def test_apply_if_finite_skips_a_nan_step(case):
    # apply_if_finite wraps what follows the aggregator: optax's rejected branch returns zeros
    # shaped like its *input*, and an aggregator's input (the Jacobian, leaves [K, ...]) is not
    # shaped like its output, so optax.apply_if_finite(optax.chain(aggregator, ...)) cannot
    # type-check whatever the aggregator's state.
    inner = optax.apply_if_finite(optax.sgd(0.1), 3)
    tx = optax.chain(_build(case), inner)
    params = _params()
    state = tx.init(params)
    step = _jitted_step(tx)

    params, state = step(params, state, _jacobian(0), _losses(0))
    assert bool(state[1].last_finite)
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), _jacobian(1))
    kept_state = state[0]
    kept, state = step(params, state, bad, _losses(1))
    assert not bool(state[1].last_finite)
    assert int(state[1].notfinite_count) == 1
    M.assert_trees_equal(kept, params)
    if isinstance(kept_state, mtl.aggregation.AggregatorState):  # the method's own state is kept
        M.assert_trees_equal(state[0].inner, kept_state.inner)
    params, state = step(kept, state, _jacobian(2), _losses(2))
    assert bool(state[1].last_finite)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert step._cache_size() == 1  # one compilation for all three steps


@pytest.mark.parametrize("case", ALL)
def test_state_is_a_lax_scan_carry(case):
    tx = optax.chain(_build(case), optax.sgd(0.1))
    params = _params()
    jacs = jax.tree.map(lambda *xs: jnp.stack(xs), *[_jacobian(i) for i in range(3)])
    losses = jnp.stack([_losses(i) for i in range(3)])

    def body(carry, batch):
        params, state = carry
        jac, loss = batch
        updates, state = tx.update(jac, state, params, task_losses=loss)
        return (optax.apply_updates(params, updates), state), loss

    (scanned, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, (jacs, losses)))(
        (params, tx.init(params))
    )
    # The same three steps, unrolled in Python.
    state = tx.init(params)
    unrolled = params
    for i in range(3):
        updates, state = tx.update(_jacobian(i), state, unrolled, task_losses=_losses(i))
        unrolled = optax.apply_updates(unrolled, updates)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), scanned, unrolled
    )


@pytest.mark.parametrize("case", DEFAULTS)
def test_chained_before_multisteps(case):
    tx = optax.chain(_build(case), optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2))
    params = _params()
    state = tx.init(params)
    step = _jitted_step(tx)

    first, state = step(params, state, _jacobian(0), _losses(0))
    M.assert_trees_equal(first, params)  # accumulating: no update yet
    second, state = step(first, state, _jacobian(1), _losses(1))
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(first), strict=True)
    ]
    assert any(moved) or case.startswith("agg:nocl")  # nocl may legitimately give 0
    assert step._cache_size() == 1


@pytest.mark.parametrize("name", sorted(NEEDS_K))
def test_methods_whose_state_needs_k_say_so(name):
    with pytest.raises(ValueError, match="num_tasks"):
        mtl.get_method(name).transform.init(_params())


def test_num_tasks_is_inferred_from_a_vector_of_k_entries():
    params = _params()
    for tx in (
        mtl.aggregation.linear([0.5, 1.0, 2.0]),
        mtl.aggregation.upgrad(pref_vector=[1.0, 1.0, 2.0]),
        mtl.aggregation.dualproj(pref_vector=[1.0, 1.0, 2.0]),
        mtl.aggregation.conflict_free(pref_vector=[1.0, 1.0, 2.0]),
        mtl.aggregation.aligned_mtl(pref_vector=[1.0, 1.0, 2.0]),
    ):
        state = tx.init(params)
        assert mtl.aggregation.weights(state).shape == (K,)
        _, state = tx.update(_jacobian(0), state, params, task_losses=_losses(0))
        assert mtl.aggregation.weights(state).shape == (K,)


def test_last_weights_without_num_tasks_is_a_clear_error():
    tx = mtl.aggregation.upgrad()
    params = _params()
    state = tx.init(params)
    _, state = tx.update(_jacobian(0), state, params)
    with pytest.raises(ValueError, match="num_tasks"):
        mtl.aggregation.weights(state)
    with pytest.raises(ValueError, match="num_tasks"):
        mtl.aggregation.gram(state)


@pytest.mark.parametrize("granularity", ["global", mtl.gramian.by_module])
def test_conflict_tracker_state_is_a_lax_scan_carry(granularity):
    tracker = mtl.ConflictTracker(num_tasks=K, granularity=granularity)
    params = _params()
    state = tracker.init(params)
    new_state = jax.eval_shape(tracker.update, state, _jacobian(0))
    assert _signature(new_state) == _signature(state)
    jacs = jax.tree.map(lambda *xs: jnp.stack(xs), *[_jacobian(i) for i in range(3)])
    scanned, _ = jax.lax.scan(lambda s, j: (tracker.update(s, j), None), state, jacs)
    assert int(scanned.steps) == 3


@pytest.mark.parametrize("case", DEFAULTS)
def test_skip_nonfinite_wraps_the_whole_chain(case):
    # skip_nonfinite around aggregator + optimizer: the rejected branch is shaped like the
    # chain's output, so the wrapped form type-checks; a NaN step is skipped with every state kept
    tx = mtl.aggregation.skip_nonfinite(optax.chain(_build(case), optax.sgd(0.1)), 3)
    params = _params()
    state = tx.init(params)
    step = _jitted_step(tx)

    params, state = step(params, state, _jacobian(0), _losses(0))
    assert bool(state.last_finite)
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), _jacobian(1))
    kept, new_state = step(params, state, bad, _losses(1))
    assert not bool(new_state.last_finite) and int(new_state.notfinite_count) == 1
    M.assert_trees_equal(kept, params)
    M.assert_trees_equal(new_state.inner_state, state.inner_state)
    params, state = step(kept, new_state, _jacobian(2), _losses(2))
    assert bool(state.last_finite)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert step._cache_size() == 1
