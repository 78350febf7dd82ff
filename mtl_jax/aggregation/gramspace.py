"""The Gram-space adapter: a :class:`~mtl_jax.weighting.base.Weighting` as an optax transform.

:func:`from_weighting` computes ``G = J J^T`` per parameter group (``granularity``: ``"global"``,
``"leaf"`` or a callable ``path -> group`` such as :func:`mtl_jax.gramian.by_module`), maps each G to
weights ``w[K]`` with the weighting and returns ``d = sum_k w_k g_k`` group by group (two passes
over the Jacobian plus a K x K solve; docs/design/DESIGN.md section 3). Several groups run as one
``vmap``-ed solve over ``G[n_groups, K, K]``. :func:`from_weights_fn` does the same for weights
that come from elsewhere (losses, representation gradients). The state, :class:`AggregatorState`,
keeps the PRNG key, the weighting's state and the last weights and Gram matrices (logged only when
K is known: ``num_tasks`` or a per-task vector). Non-finite input gives an all-NaN update and
keeps the weighting's state. The long story: ``docs/methods.md``, "Aggregators as optax
transforms".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree
from mtl_jax.gramian import GLOBAL, Granularity, combine, group_gramians, group_names, leaf_groups
from mtl_jax.weighting.base import Weighting

from ._checks import (
    check_num_tasks,
    compute_dtype_losses,
    finite_mask,
    float_dtype,
    map_unmasked,
    validate_jacobian,
)

__all__ = [
    "AggregatorState",
    "WeightsFn",
    "batched_weighting",
    "cast_like",
    "empty_logs",
    "from_weighting",
    "from_weights_fn",
    "guarded_weigh",
    "weigh_first",
]

PyTree = Any
Transform = optax.GradientTransformationExtraArgs


class AggregatorState(NamedTuple):
    """State of an aggregator.

    Attributes:
      key: typed PRNG key (``jax.random.key``) split at every step for randomised methods.
      weights: ``{group: w[K]}``, the weights of the last step.
      gram: ``{group: G[K, K]}``, the Gram matrices of the last step.
      inner: ``{group: state}``, the weighting's own state per group.
    """

    key: jax.Array
    weights: dict[str, jax.Array]
    gram: dict[str, jax.Array]
    inner: dict[str, PyTree]


def empty_logs(groups: Sequence[str], num_tasks: int | None) -> tuple[dict, dict]:
    """Zero logs ``({group: w[K]}, {group: G[K, K]})``; none (empty dicts) when K is unknown."""
    if num_tasks is None:
        return {}, {}
    k = int(num_tasks)
    dtype = float_dtype()
    weights = {g: jnp.zeros((k,), dtype) for g in groups}
    gram = {g: jnp.zeros((k, k), dtype) for g in groups}
    return weights, gram


def cast_like(new: dict[str, jax.Array], old: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The new logs in the dtypes of the old ones; no logs when the state keeps none."""
    return {g: new[g].astype(v.dtype) for g, v in old.items()}


def guarded_weigh(
    weighting: Weighting,
    gram: jax.Array,
    inner: PyTree,
    key: jax.Array,
    task_losses: Any,
    finite: jax.Array,
) -> tuple[jax.Array, PyTree]:
    """``weighting.weigh`` under ``lax.cond(finite, ...)``: non-finite input skips the solver.

    The skipped branch returns NaN weights (the documented all-NaN update) and leaves the
    weighting's state unchanged. The conditional also keeps the solver's LAPACK calls (eigh,
    solve) out of the top level of the step's XLA:CPU program, where each one costs about 1 ms of
    lost parallelism in the rest of the step (measured with benchmarks/step_time.py at K = 2).
    A weighting whose ``weigh`` changes the structure or shapes of its state is called directly.
    """

    def solve(_: Any) -> tuple[jax.Array, PyTree]:
        return weighting.weigh(gram, inner, key, task_losses)

    w_shape, state_shape = jax.eval_shape(solve, None)
    same = jax.tree.structure(state_shape) == jax.tree.structure(inner) and all(
        jnp.shape(x) == s.shape
        for x, s in zip(jax.tree.leaves(inner), jax.tree.leaves(state_shape), strict=True)
    )
    if not same:
        return solve(None)

    def skip(_: Any) -> tuple[jax.Array, PyTree]:
        kept = jax.tree.map(lambda x, s: jnp.asarray(x, s.dtype), inner, state_shape)
        return jnp.full(w_shape.shape, jnp.nan, w_shape.dtype), kept

    return jax.lax.cond(finite, solve, skip, None)


def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree: PyTree, num: int) -> list[PyTree]:
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(num)]


def keep_unless(finite: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` where ``finite``, else ``old``, in ``old``'s dtype (a typed PRNG key stays one)."""
    out = jnp.where(finite, new, old)
    return out if jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key) else out.astype(old.dtype)


def batched_weighting(weighting: Weighting) -> Weighting:
    """``weighting`` over a stack of groups: ``weigh(G[n, K, K], states[n], keys[n], losses)``.

    One ``vmap``: the compiled program holds one solver for all groups (the losses are shared).
    """

    def weigh(grams: jax.Array, states: PyTree, keys: jax.Array, losses: Any = None) -> Any:
        one = lambda gram, state, key: weighting.weigh(gram, state, key, losses)
        return jax.vmap(one)(grams, states, keys)

    return Weighting(init=weighting.init, weigh=weigh)


def _weigh_groups(
    weighting: Weighting,
    grams: dict[str, jax.Array],
    inner: dict[str, PyTree],
    keys: jax.Array,
    task_losses: Any,
    batch: bool,
) -> tuple[dict[str, jax.Array], dict[str, PyTree]]:
    """Weights and new states ``{group: w[K]}``, ``{group: state}`` for every group.

    ``batch``: one guarded, ``vmap``-ed solve over the stacked groups (any non-finite group or
    loss makes every group's weights NaN and keeps every state); otherwise one guarded solve per
    group in a Python loop (the layout before batching, kept for benchmarks/by_module.py).
    """
    groups = list(grams)
    if batch and len(groups) > 1:
        stacked = jnp.stack([grams[g] for g in groups])
        finite = finite_mask(stacked, task_losses)
        w, states = guarded_weigh(
            batched_weighting(weighting),
            stacked,
            _stack([inner[g] for g in groups]),
            keys,
            task_losses,
            finite,
        )
        outs = zip(_unstack(w, len(groups)), _unstack(states, len(groups)), strict=True)
        per_group = {g: (w_g, s_g, finite) for g, (w_g, s_g) in zip(groups, outs, strict=True)}
    else:
        per_group = {}
        for group, group_key in zip(groups, keys, strict=True):
            finite = finite_mask(grams[group], task_losses)
            w_g, s_g = guarded_weigh(
                weighting, grams[group], inner[group], group_key, task_losses, finite
            )
            per_group[group] = (w_g, s_g, finite)
    weights = {
        g: jnp.where(finite & jnp.all(jnp.isfinite(w_g)), w_g, jnp.nan)
        for g, (w_g, _, finite) in per_group.items()
    }
    return weights, {g: s_g for g, (_, s_g, _) in per_group.items()}


def from_weighting(
    weighting: Weighting,
    *,
    granularity: Granularity = GLOBAL,
    seed: int = 0,
    num_tasks: int | None = None,
    name: str = "aggregator",
    _batch_groups: bool = True,
) -> Transform:
    """Builds an aggregator from a Gram-space :class:`~mtl_jax.weighting.base.Weighting`.

    Args:
      weighting: ``init(num_tasks)`` / ``weigh(G, state, key, losses) -> (w, state)``.
      granularity: where G is computed and the weights applied: ``"global"``, ``"leaf"`` or a
        callable ``path -> group`` (e.g. :func:`mtl_jax.gramian.by_module`).
      seed: seed of the PRNG key kept in the state.
      num_tasks: K: the state then logs the last weights and Gram matrices (:func:`weights`);
        required by weightings whose own state needs K.
      name: used in error messages.
      _batch_groups: private; ``False`` solves the groups one by one (benchmark baseline).
    """
    check_num_tasks(num_tasks, name)

    def init(params: PyTree) -> AggregatorState:
        _tree.check_not_variables(params, f"{name}.init")
        groups = group_names(params, granularity)
        weights, gram = empty_logs(groups, num_tasks)
        inner = {g: weighting.init(num_tasks) for g in groups}
        return AggregatorState(jax.random.key(seed), weights, gram, inner)

    def update(
        jac: PyTree,
        state: AggregatorState,
        params: PyTree | None = None,
        *,
        task_losses: Any = None,
        **extra_args: Any,
    ) -> tuple[PyTree, AggregatorState]:
        del extra_args
        validate_jacobian(jac, params, task_losses, num_tasks, name)
        task_losses = compute_dtype_losses(task_losses)  # G is float32 too (gramian._flat_rows)
        grams = group_gramians(jac, granularity)
        unknown = [g for g in grams if g not in state.inner]
        if unknown:
            raise ValueError(
                f"{name}: the Jacobian has parameter groups {unknown} that the state (made by "
                "init) does not; call init with parameters of the same structure."
            )
        key, sub = jax.random.split(state.key)
        keys = jax.random.split(sub, len(grams))
        weights, inner = _weigh_groups(
            weighting, grams, state.inner, keys, task_losses, _batch_groups
        )
        groups = leaf_groups(jac, granularity)
        updates = map_unmasked(jac, lambda i, leaf: combine(weights[groups[i]], leaf))
        new_state = AggregatorState(
            key,
            cast_like(weights, state.weights),
            cast_like(grams, state.gram),
            {**state.inner, **inner},
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


WeightsFn = Callable[[PyTree, jax.Array, PyTree, jax.Array, Any, dict], tuple[jax.Array, PyTree]]


def from_weights_fn(
    weights_fn: WeightsFn,
    init_inner: Callable[[], PyTree],
    *,
    num_tasks: int,
    seed: int = 0,
    inner_key: str = GLOBAL,
    name: str = "aggregator",
) -> Transform:
    """An aggregator ``sum_k w_k g_k`` whose weights come from something other than the Jacobian's
    Gram matrix (the losses of a loss-only method, the representation gradients of MGDA-UB).

    ``weights_fn(jac, gram, inner_state, key, task_losses, extra_args) -> (w[K], inner_state)``;
    ``gram`` is the Jacobian's global Gram matrix (logged in the state like every aggregator's);
    ``extra_args`` are the other keyword arguments of ``update``. The state is an
    :class:`AggregatorState` whose ``inner`` is ``{inner_key: inner_state}``, so
    :func:`mtl_jax.aggregation.weights` works; non-finite input gives the documented all-NaN update.
    """

    check_num_tasks(num_tasks, name)

    def init(params: PyTree) -> AggregatorState:
        _tree.check_not_variables(params, f"{name}.init")
        weights, gram = empty_logs([GLOBAL], num_tasks)
        return AggregatorState(jax.random.key(seed), weights, gram, {inner_key: init_inner()})

    def update(jac, state, params=None, *, task_losses=None, **extra_args):
        validate_jacobian(jac, params, task_losses, num_tasks, name)
        task_losses = compute_dtype_losses(task_losses)
        gram = group_gramians(jac, GLOBAL)[GLOBAL]
        w, new_state = _weights_step(
            weights_fn, inner_key, state, jac, gram, task_losses, extra_args
        )
        updates = map_unmasked(jac, lambda i, leaf: combine(w, leaf))
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _weights_step(
    weights_fn: WeightsFn,
    inner_key: str,
    state: AggregatorState,
    jac: PyTree | None,
    gram: jax.Array | None,
    task_losses: Any,
    extra_args: dict[str, Any],
) -> tuple[jax.Array, AggregatorState]:
    """The weights of one step and the state after it, shared by :func:`from_weights_fn`'s
    ``update`` and :func:`weigh_first` (``jac``/``gram`` ``None``: no Jacobian; the logged Gram
    matrix is kept)."""
    key, sub = jax.random.split(state.key)
    w, inner = weights_fn(jac, gram, state.inner[inner_key], sub, task_losses, extra_args)
    finite = jnp.all(jnp.isfinite(w))
    finite &= finite_mask(jnp.zeros(()) if gram is None else gram, task_losses)
    w = jnp.where(finite, w, jnp.nan)
    # Non-finite input leaves the method's own state unchanged (the module's contract).
    old_inner = state.inner[inner_key]
    inner = jax.tree.map(lambda new, old: keep_unless(finite, new, old), inner, old_inner)
    logged_gram = state.gram if gram is None else cast_like({GLOBAL: gram}, state.gram)
    new_state = AggregatorState(
        key, cast_like({GLOBAL: w}, state.weights), logged_gram, {inner_key: inner}
    )
    return w, new_state


#: ``(state, task_losses, **inputs) -> (w[K], new_state)``: see :func:`weigh_first`.
WeighFirst = Callable[..., tuple[jax.Array, AggregatorState]]


def weigh_first(weights_fn: WeightsFn, *, inner_key: str = GLOBAL, name: str) -> WeighFirst:
    """The weights of a :func:`from_weights_fn` aggregator BEFORE the backward pass.

    A method whose weights do not need the Jacobian (a loss-only method: they come from the
    losses; a representation method: from ``d L_k / d z``) runs at its own cost as
    ``w, state = weigh(state, task_losses, **inputs)``, then ONE backward pass with ``w`` as the
    cotangent of the losses, then the optimizer on that gradient. ``state`` is the aggregator's
    own (``from_weights_fn(weights_fn, ...).init``) and ends exactly as its ``update`` would leave
    it -- the weights, the weighting's state, the key -- except the logged Gram matrix of the
    Jacobian, which this path never forms (it keeps its last value). ``weights_fn`` receives
    ``jac=None`` and ``gram=None``.
    """

    def weigh(state: AggregatorState, task_losses: Any = None, **extra_args: Any) -> Any:
        if not isinstance(state, AggregatorState):
            raise TypeError(
                f"{name}: weigh takes the aggregator's own state (its transform's init(params)); "
                f"got {type(state).__name__}."
            )
        task_losses = compute_dtype_losses(task_losses)
        return _weights_step(weights_fn, inner_key, state, None, None, task_losses, extra_args)

    return weigh
