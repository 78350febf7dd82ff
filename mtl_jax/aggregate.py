"""Aggregators: optax transforms that turn a task Jacobian into an ordinary gradient.

Every aggregator returns an ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
task Jacobian (leaves ``[K, *param.shape]``) and returns a gradient pytree shaped like the
parameters, so it chains in front of any optax optimizer (docs/design/DESIGN.md section 3)::

  tx = optax.chain(mtl.pcgrad(seed=0), optax.adam(1e-3))
  state = tx.init(params)
  losses, jac = mtl.value_and_jacobian(loss_fn)(params, batch)
  updates, state = tx.update(jac, state, params, task_losses=losses)
  params = optax.apply_updates(params, updates)

Gram-space aggregators (:func:`from_weighting`) compute ``G = J J^T`` per group (``granularity``:
``"global"``, ``"leaf"`` or a callable ``path -> group`` such as :func:`mtl_jax.by_module`), map
each G to weights with a :class:`~mtl_jax.weighting.base.Weighting`, and return
``sum_k w_k g_k`` group by group: two passes over the Jacobian plus a K x K solve.

State: :class:`AggregatorState` keeps the PRNG key, the weighting's own state, and the weights and
Gram matrices of the last step (``mtl.last_weights(state)``, ``mtl.last_gram(state)``). The state
has the same structure, shapes and dtypes from ``init`` on (``optax.apply_if_finite``,
``lax.scan`` carries and ``optax.MultiSteps`` need that; a jitted step compiles once). ``init``
sees the parameters, not the Jacobian, so K is known there only from ``num_tasks=K`` or from a
vector of K entries (``linear`` weights, ``pref_vector``): with K known the state logs the last
weights and Gram matrices; without it the logs are empty (and ``mtl.last_weights`` says to pass
``num_tasks``). Methods whose own state needs K (GradVac, EMA weights, ExcessMTL, Nash-MTL with
``update_weights_every > 1``) raise a ``ValueError`` at ``init`` without it.

Per-group weightings (``granularity="leaf"`` or a grouping function) run as one batched solve:
the groups' Gram matrices are stacked ``[n_groups, K, K]`` and the weighting is ``vmap``-ed over
them (one solver in the compiled program, whatever the model's depth).

Bad input: a Jacobian whose leaves disagree on K, a Jacobian that does not match the parameters,
or ``task_losses`` of the wrong length raise ``ValueError`` at trace time. Non-finite gradients or
losses make the whole update NaN (never a finite but wrong update) and leave the method's own state
(EMA targets, reused weights) unchanged; to skip such steps put
``optax.apply_if_finite`` *after* the aggregator, around the optimizer
(``optax.chain(mtl.pcgrad(), optax.apply_if_finite(optax.adam(1e-3), 5))``), or check the losses
in the train loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree
from mtl_jax.gramian import GLOBAL, Granularity, combine, group_gramians, group_names, leaf_groups
from mtl_jax.weighting.aligned_mtl import aligned_mtl_weighting
from mtl_jax.weighting.base import Weighting, require_num_tasks
from mtl_jax.weighting.basic import linear_weighting, mean_weighting, sum_weighting
from mtl_jax.weighting.cagrad import cagrad_weighting
from mtl_jax.weighting.config import config_weighting
from mtl_jax.weighting.dualproj import dualproj_weighting
from mtl_jax.weighting.excess_mtl import ExcessMTLState, excess_mtl_step
from mtl_jax.weighting.fairgrad import fairgrad_weighting
from mtl_jax.weighting.gradvac import gradvac_weighting
from mtl_jax.weighting.imtl import imtl_g_weighting
from mtl_jax.weighting.mgda import mgda_weighting
from mtl_jax.weighting.nash_mtl import nash_mtl_weighting
from mtl_jax.weighting.nocl import nocl_weighting
from mtl_jax.weighting.pcgrad import pcgrad_weighting
from mtl_jax.weighting.registry import build, ema_weights_weighting
from mtl_jax.weighting.rlw import random_weighting as random_weighting_
from mtl_jax.weighting.upgrad import upgrad_weighting

PyTree = Any
Transform = optax.GradientTransformationExtraArgs

__all__ = [
    "AGGREGATORS",
    "AggregatorState",
    "aligned_mtl",
    "apply_if_finite",
    "cagrad",
    "config",
    "dualproj",
    "ema_weights",
    "excess_mtl",
    "fairgrad",
    "from_weighting",
    "from_weights_fn",
    "get_aggregator",
    "graddrop",
    "gradvac",
    "imtl_g",
    "last_gram",
    "last_weights",
    "linear",
    "mean",
    "mgda",
    "multitask",
    "nash_mtl",
    "nocl",
    "pcgrad",
    "random_weighting",
    "sum",
    "sum_rows",
    "upgrad",
]


class AggregatorState(NamedTuple):
    """State of an aggregator.

    Attributes:
      key: PRNG key (``uint32[2]``) split at every step for randomised methods.
      weights: ``{group: w[K]}``, the weights of the last step.
      gram: ``{group: G[K, K]}``, the Gram matrices of the last step.
      inner: ``{group: state}``, the weighting's own state per group.
    """

    key: jax.Array
    weights: dict[str, jax.Array]
    gram: dict[str, jax.Array]
    inner: dict[str, PyTree]


def _float_dtype() -> jnp.dtype:
    return jnp.zeros(()).dtype  # float32, or float64 under jax_enable_x64


def _empty_logs(groups: Sequence[str], num_tasks: int | None) -> tuple[dict, dict]:
    """Zero logs ``({group: w[K]}, {group: G[K, K]})``; none (empty dicts) when K is unknown."""
    if num_tasks is None:
        return {}, {}
    k = int(num_tasks)
    dtype = _float_dtype()
    weights = {g: jnp.zeros((k,), dtype) for g in groups}
    gram = {g: jnp.zeros((k, k), dtype) for g in groups}
    return weights, gram


def _validate(
    jac: PyTree, params: PyTree | None, task_losses: Any, num_tasks: int | None, name: str
) -> int:
    k = _tree.task_axis_size(jac)
    if k == 0:
        raise ValueError(
            f"{name}: the task Jacobian has K=0 tasks (an empty leading axis); an aggregator "
            "needs at least one task gradient."
        )
    if params is not None:
        _tree.check_jacobian_matches(jac, params)
    _tree.check_task_losses(task_losses, k)
    if num_tasks is not None and k != num_tasks:
        raise ValueError(
            f"{name} was built for {num_tasks} tasks (num_tasks={num_tasks}, or a per-task "
            f"vector of length {num_tasks}), but the Jacobian has K={k}."
        )
    return k


def _finite_mask(gram: jax.Array, task_losses: Any) -> jax.Array:
    finite = jnp.all(jnp.isfinite(gram))
    if task_losses is not None:
        finite &= jnp.all(jnp.isfinite(task_losses))
    return finite


def _map_unmasked(tree: PyTree, fn: Callable[[int, jax.Array], jax.Array]) -> PyTree:
    """Applies ``fn(i, leaf)`` to the i-th non-masked leaf; ``MaskedNode`` leaves pass through."""
    flat, treedef = jax.tree_util.tree_flatten(
        tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    out, i = [], 0
    for leaf in flat:
        if isinstance(leaf, optax.MaskedNode):
            out.append(leaf)
        else:
            out.append(fn(i, leaf))
            i += 1
    return treedef.unflatten(out)


def _cast_like(new: dict[str, jax.Array], old: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The new logs in the dtypes of the old ones; no logs when the state keeps none."""
    return {g: new[g].astype(v.dtype) for g, v in old.items()}


def _infer_num_tasks(num_tasks: int | None, vector: Any, name: str) -> int | None:
    """``num_tasks``, else the length of a per-task vector (weights, preference) when given."""
    if vector is None:
        return num_tasks
    length = len(vector)
    if num_tasks is not None and num_tasks != length:
        raise ValueError(f"{name}: num_tasks={num_tasks} but the per-task vector has {length}.")
    return length


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
        finite = _finite_mask(stacked, task_losses)
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
            finite = _finite_mask(grams[group], task_losses)
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
        callable ``path -> group`` (e.g. :func:`mtl_jax.by_module`).
      seed: seed of the PRNG key kept in the state.
      num_tasks: K: the state then logs the last weights and Gram matrices (``last_weights``);
        required by weightings whose own state needs K.
      name: used in error messages.
      _batch_groups: private; ``False`` solves the groups one by one (benchmark baseline).
    """
    if num_tasks is not None and num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}.")

    def init(params: PyTree) -> AggregatorState:
        groups = group_names(params, granularity)
        weights, gram = _empty_logs(groups, num_tasks)
        inner = {g: weighting.init(num_tasks) for g in groups}
        return AggregatorState(jax.random.PRNGKey(seed), weights, gram, inner)

    def update(
        jac: PyTree,
        state: AggregatorState,
        params: PyTree | None = None,
        *,
        task_losses: Any = None,
        **extra_args: Any,
    ) -> tuple[PyTree, AggregatorState]:
        del extra_args
        _validate(jac, params, task_losses, num_tasks, name)
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
        updates = _map_unmasked(jac, lambda i, leaf: combine(weights[groups[i]], leaf))
        new_state = AggregatorState(
            key,
            _cast_like(weights, state.weights),
            _cast_like(grams, state.gram),
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
    :func:`last_weights` works; non-finite input gives the documented all-NaN update.
    """

    def init(params: PyTree) -> AggregatorState:
        del params
        weights, gram = _empty_logs([GLOBAL], num_tasks)
        return AggregatorState(jax.random.PRNGKey(seed), weights, gram, {inner_key: init_inner()})

    def update(jac, state, params=None, *, task_losses=None, **extra_args):
        _validate(jac, params, task_losses, num_tasks, name)
        gram = group_gramians(jac, GLOBAL)[GLOBAL]
        key, sub = jax.random.split(state.key)
        w, inner = weights_fn(jac, gram, state.inner[inner_key], sub, task_losses, extra_args)
        finite = _finite_mask(gram, task_losses) & jnp.all(jnp.isfinite(w))
        w = jnp.where(finite, w, jnp.nan)
        # Non-finite input leaves the method's own state unchanged (the module's contract).
        old_inner = state.inner[inner_key]
        inner = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old).astype(jnp.result_type(old)),
            inner,
            old_inner,
        )
        updates = _map_unmasked(jac, lambda i, leaf: combine(w, leaf))
        new_state = AggregatorState(
            key,
            _cast_like({GLOBAL: w}, state.weights),
            _cast_like({GLOBAL: gram}, state.gram),
            {inner_key: inner},
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def mean(*, num_tasks: int | None = None) -> Transform:
    """The mean of the task gradients (equal weighting / joint training)."""
    return from_weighting(mean_weighting(), num_tasks=num_tasks, name="mean")


def sum(*, num_tasks: int | None = None) -> Transform:
    """The sum of the task gradients (the gradient of the summed loss)."""
    return from_weighting(sum_weighting(), num_tasks=num_tasks, name="sum")


def linear(weights: Sequence[float] | jax.Array, *, num_tasks: int | None = None) -> Transform:
    """A constant combination ``sum_k weights[k] g_k``."""
    num_tasks = _infer_num_tasks(num_tasks, weights, "linear")
    return from_weighting(linear_weighting(weights), num_tasks=num_tasks, name="linear")


def pcgrad(
    seed: int = 0,
    shuffle: bool = True,
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """PCGrad (Yu et al. 2020, Algorithm 1), see :mod:`mtl_jax.weighting.pcgrad`.

    The sum of the projected task gradients; every task visits the others in a fresh random order
    at every step (drawn from the key in the state); ``shuffle=False`` uses index order.
    """
    return from_weighting(
        pcgrad_weighting(shuffle),
        granularity=granularity,
        seed=seed,
        num_tasks=num_tasks,
        name="pcgrad",
    )


def mgda(
    normalization: str = "none",
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """MGDA (Sener & Koltun 2018): the exact min-norm point of the hull, :mod:`mtl_jax.weighting.mgda`."""
    return from_weighting(
        mgda_weighting(normalization), granularity=granularity, num_tasks=num_tasks, name="mgda"
    )


def cagrad(
    c: float = 0.5,
    rescale: bool = False,
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """CAGrad (Liu et al. 2021): ``g0 + c |g0| g_w / |g_w|``, :mod:`mtl_jax.weighting.cagrad`."""
    return from_weighting(
        cagrad_weighting(c, rescale), granularity=granularity, num_tasks=num_tasks, name="cagrad"
    )


def imtl_g(*, granularity: Granularity = GLOBAL, num_tasks: int | None = None) -> Transform:
    """IMTL-G (Liu et al. 2021), closed form, :mod:`mtl_jax.weighting.imtl`."""
    return from_weighting(
        imtl_g_weighting(), granularity=granularity, num_tasks=num_tasks, name="imtl_g"
    )


def gradvac(
    beta: float = 0.5,
    seed: int = 0,
    shuffle: bool = True,
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """GradVac (Wang et al. 2021, Algorithm 1), see :mod:`mtl_jax.weighting.gradvac`.

    Every group keeps EMA targets of the pairwise cosines (rate ``beta``) and lifts each task
    gradient's cosine with the others up to its target; the update is the sum of the corrected
    gradients. Group as in the paper with ``granularity``: ``"global"`` (whole model),
    :func:`mtl_jax.by_module` (per layer) or ``"leaf"`` (per matrix). Needs ``num_tasks``.
    """
    return from_weighting(
        gradvac_weighting(beta, shuffle),
        granularity=granularity,
        seed=seed,
        num_tasks=num_tasks,
        name="gradvac",
    )


def nash_mtl(
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """Nash-MTL (Navon et al. 2022): the bargaining solution ``G a = 1/a``, clipped to ``max_norm``.

    Solved exactly inside jit (:mod:`mtl_jax.weighting.nash_mtl`); ``update_weights_every > 1``
    reuses the weights between updates and needs ``num_tasks``; ``max_norm = 0`` disables the
    clipping of the update's norm.
    """
    return from_weighting(
        nash_mtl_weighting(max_norm, update_weights_every),
        granularity=granularity,
        num_tasks=num_tasks,
        name="nash_mtl",
    )


def aligned_mtl(
    scale_mode: str = "min",
    pref_vector: Sequence[float] | None = None,
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """Aligned-MTL (Senushkin et al. 2023): ``J^T B pref`` with the balance transformation of G.

    ``scale_mode``: ``"min"`` (paper), ``"median"`` or ``"rmse"``; see
    :mod:`mtl_jax.weighting.aligned_mtl`.
    """
    return from_weighting(
        aligned_mtl_weighting(scale_mode, pref_vector),
        granularity=granularity,
        num_tasks=_infer_num_tasks(num_tasks, pref_vector, "aligned_mtl"),
        name="aligned_mtl",
    )


def upgrad(
    pref_vector: Sequence[float] | None = None,
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """UPGrad (Quinton & Rey 2024): the mean of the task gradients projected onto the dual cone.

    Exact projections (:mod:`mtl_jax.weighting._qp`); non-conflicting, linear under scaling.
    """
    return from_weighting(
        upgrad_weighting(pref_vector),
        granularity=granularity,
        num_tasks=_infer_num_tasks(num_tasks, pref_vector, "upgrad"),
        name="upgrad",
    )


def dualproj(
    pref_vector: Sequence[float] | None = None,
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """DualProj (Quinton & Rey 2024): the mean gradient projected onto the dual cone (exact)."""
    return from_weighting(
        dualproj_weighting(pref_vector),
        granularity=granularity,
        num_tasks=_infer_num_tasks(num_tasks, pref_vector, "dualproj"),
        name="dualproj",
    )


def config(
    pref_vector: Sequence[float] | None = None,
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """ConFIG (Liu, Chu & Thuerey 2024): the equal-cosine direction with projection length.

    Expressed as a weighting of G, see :mod:`mtl_jax.weighting.config`.
    """
    return from_weighting(
        config_weighting(pref_vector),
        granularity=granularity,
        num_tasks=_infer_num_tasks(num_tasks, pref_vector, "config"),
        name="config",
    )


def random_weighting(
    seed: int = 0, *, granularity: Granularity = GLOBAL, num_tasks: int | None = None
) -> Transform:
    """RLW (Lin et al. 2022): ``softmax(z)`` weights, ``z ~ N(0, I)`` drawn at every step."""
    return from_weighting(
        random_weighting_(),
        granularity=granularity,
        seed=seed,
        num_tasks=num_tasks,
        name="random_weighting",
    )


def fairgrad(
    alpha: float = 1.0, *, granularity: Granularity = GLOBAL, num_tasks: int | None = None
) -> Transform:
    """FairGrad (Ban & Ji 2024): the alpha-fair allocation ``G w = w^(-1/alpha)``, exact.

    The update is homogeneous of degree ``(1 - alpha) / (1 + alpha)`` in the gradients, see
    :mod:`mtl_jax.weighting.fairgrad`.
    """
    return from_weighting(
        fairgrad_weighting(alpha), granularity=granularity, num_tasks=num_tasks, name="fairgrad"
    )


def nocl(*, granularity: Granularity = GLOBAL, num_tasks: int | None = None) -> Transform:
    """CoNAL's rule: a group whose task gradients conflict (any ``g_i . g_j < 0``) gets no update.

    Otherwise the mean. Pass the shared blocks as ``granularity`` (a grouping function, or
    :func:`mtl_jax.by_module`), see :mod:`mtl_jax.weighting.nocl`.
    """
    return from_weighting(
        nocl_weighting(), granularity=granularity, num_tasks=num_tasks, name="nocl"
    )


def ema_weights(
    method: str = "mgda",
    alpha: float = 0.9,
    method_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    *,
    granularity: Granularity = GLOBAL,
    num_tasks: int | None = None,
) -> Transform:
    """CR-MOGM-style smoothing: the EMA ``alpha w_{t-1} + (1 - alpha) w_t`` of a weighting's output.

    ``method`` names any weighting of :data:`mtl_jax.weighting.WEIGHTINGS` (built with
    ``method_kwargs``); see :mod:`mtl_jax.weighting.ema`. Needs ``num_tasks``.
    """
    return from_weighting(
        ema_weights_weighting(method, alpha, method_kwargs),
        granularity=granularity,
        seed=seed,
        num_tasks=num_tasks,
        name="ema_weights",
    )


def _leaves_finite(leaves: Sequence[jax.Array], task_losses: Any) -> jax.Array:
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))
    if task_losses is not None:
        finite &= jnp.all(jnp.isfinite(task_losses))
    return finite


def excess_mtl(
    robust_step_size: float = 1e-2, warmup_steps: int = 1, *, num_tasks: int | None = None
) -> Transform:
    """ExcessMTL (He et al. 2024): weights from AdaGrad-estimated excess risks, exponentiated steps.

    Not a Gram-space method: the state accumulates squared task gradients per coordinate (as
    large as the Jacobian), see :mod:`mtl_jax.weighting.excess_mtl`. Needs ``num_tasks``. The state
    is an :class:`AggregatorState` (``mtl.last_weights`` works).
    """
    if robust_step_size <= 0:
        raise ValueError(f"excess_mtl's robust_step_size must be > 0; got {robust_step_size}.")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"excess_mtl's warmup_steps must be an integer >= 0; got {warmup_steps}.")
    warmup = int(warmup_steps)

    def init(params: PyTree) -> AggregatorState:
        k = require_num_tasks(num_tasks, "excess_mtl", "squared task gradients per coordinate")
        dtype = _float_dtype()
        leaves = [leaf for _, leaf in _tree.leaves_with_paths(params)]
        inner = ExcessMTLState(
            sq_sums=[jnp.zeros((k, *jnp.shape(leaf)), dtype) for leaf in leaves],
            weights=jnp.full((k,), 1.0 / k, dtype),
            baseline=jnp.zeros((k,), dtype),
            warmup_sum=jnp.zeros((k,), dtype),
            step=jnp.zeros((), jnp.int32),
        )
        weights, gram = _empty_logs([GLOBAL], k)
        return AggregatorState(jax.random.PRNGKey(0), weights, gram, {GLOBAL: inner})

    def update(jac, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        _validate(jac, params, task_losses, num_tasks, "excess_mtl")
        leaves = [leaf for _, leaf in _tree.leaves_with_paths(jac)]
        inner = state.inner[GLOBAL]
        if len(leaves) != len(inner.sq_sums):
            raise ValueError(
                f"excess_mtl: the Jacobian has {len(leaves)} leaves but the state (made by init) "
                f"has {len(inner.sq_sums)}; call init with parameters of the same structure."
            )
        w, new_inner = excess_mtl_step(leaves, inner, robust_step_size, warmup)
        finite = _leaves_finite(leaves, task_losses)
        w = jnp.where(finite, w, jnp.nan)
        new_inner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_inner, inner)
        gram = group_gramians(jac, GLOBAL)
        updates = _map_unmasked(jac, lambda i, leaf: combine(w, leaf))
        new_state = AggregatorState(
            state.key,
            _cast_like({GLOBAL: w}, state.weights),
            _cast_like(gram, state.gram),
            {GLOBAL: new_inner},
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


class GradDropState(NamedTuple):
    """State of :func:`graddrop`: the PRNG key."""

    key: jax.Array


def graddrop_leaf(leaf: jax.Array, key: jax.Array, leak: jax.Array) -> jax.Array:
    """GradDrop on one Jacobian leaf ``[K, ...]`` (Chen et al. 2020, eqs. 1-3).

    ``P = (1 + sum_k g_k / sum_k |g_k|) / 2`` is the positive-sign purity of every coordinate;
    with ``U ~ Uniform(0, 1)`` per coordinate, task k keeps its coordinate when
    ``(P > U and g_k > 0) or (P < U and g_k < 0)``; the output is
    ``sum_k (leak_k + (1 - leak_k) M_k) g_k``.
    """
    total = jnp.sum(leaf, axis=0)
    mass = jnp.sum(jnp.abs(leaf), axis=0)
    purity = 0.5 * (1.0 + jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1.0), 0.0))
    u = jax.random.uniform(key, purity.shape, dtype=purity.dtype)
    keep = ((purity > u) & (leaf > 0)) | ((purity < u) & (leaf < 0))
    leak = jnp.reshape(leak.astype(leaf.dtype), (-1,) + (1,) * (leaf.ndim - 1))
    return jnp.sum((leak + (1.0 - leak) * keep.astype(leaf.dtype)) * leaf, axis=0)


def graddrop(
    leak: float | Sequence[float] = 0.0, seed: int = 0, *, num_tasks: int | None = None
) -> Transform:
    """GradDrop (Chen et al., "Just Pick a Sign", NeurIPS 2020) on the parameter Jacobian.

    Not a Gram-space method: it drops, per coordinate, the gradient values whose sign disagrees
    with a sign sampled from the coordinate's sign purity (:func:`graddrop_leaf`); ``leak`` is the
    paper's per-task leak ``l_k`` (0: full dropping).

    Departure from the paper: the paper applies GradDrop to the gradient with respect to a layer's
    activations, summed over the batch; like TorchJD's ``GradDrop`` this applies it to the
    per-task parameter gradients (each leaf element is a coordinate).
    """
    leak_arr = jnp.atleast_1d(jnp.asarray(leak, dtype=_float_dtype()))

    def init(params: PyTree) -> GradDropState:
        del params
        return GradDropState(jax.random.PRNGKey(seed))

    def update(jac, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        k = _validate(jac, params, task_losses, num_tasks, "graddrop")
        if leak_arr.shape[0] not in (1, k):
            raise ValueError(f"graddrop leak has {leak_arr.shape[0]} entries for K={k} tasks.")
        leak_k = jnp.broadcast_to(leak_arr, (k,))
        key, sub = jax.random.split(state.key)
        n_leaves = len(_tree.leaves_with_paths(jac))
        keys = jax.random.split(sub, n_leaves)
        finite = jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(x)) for _, x in _tree.leaves_with_paths(jac)])
        )
        if task_losses is not None:
            finite &= jnp.all(jnp.isfinite(task_losses))

        def one(i: int, leaf: jax.Array) -> jax.Array:
            out = graddrop_leaf(leaf, keys[i], leak_k)
            return jnp.where(finite, out, jnp.nan)

        return _map_unmasked(jac, one), GradDropState(key)

    return optax.GradientTransformationExtraArgs(init, update)


def sum_rows() -> Transform:
    """Sums the task axis: the update of task-specific parameters (heads, per-task copies)."""

    def init(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(jac, state, params=None, **extra_args):
        del params, extra_args
        if _tree.leaves_with_paths(jac):
            _tree.task_axis_size(jac, "task-specific Jacobian")
        return _map_unmasked(jac, lambda i, leaf: jnp.sum(leaf, axis=0)), state

    return optax.GradientTransformationExtraArgs(init, update)


def multitask(
    aggregator: optax.GradientTransformation,
    task_specific: PyTree | Callable[[PyTree], PyTree],
) -> Transform:
    """Aggregates the shared parameters' rows and sums the task-specific ones.

    A head's Jacobian rows are zero except its own task's, so they are summed, not aggregated
    (aggregating them would let e.g. MGDA rescale a head's only gradient). Per-task copies with a
    leading K axis (Recon, CoNAL) are summed the same way.

    Args:
      aggregator: any aggregator (applied to the shared leaves only).
      task_specific: a pytree of bools shaped like the parameters (or a prefix of them), or a
        callable returning one; ``True`` marks task-specific leaves. A callable is applied to the
        parameters at ``init`` and to the Jacobian at ``update``, so it must depend on the tree's
        structure and paths, not on leaf shapes.
    """

    def is_specific(tree: PyTree) -> PyTree:
        return task_specific(tree) if callable(task_specific) else task_specific

    def is_shared(tree: PyTree) -> PyTree:
        return jax.tree.map(lambda b: not b, is_specific(tree))

    return optax.chain(optax.masked(aggregator, is_shared), optax.masked(sum_rows(), is_specific))


def _find_states(state: PyTree) -> list[AggregatorState]:
    found: list[AggregatorState] = []

    def visit(x: Any) -> Any:
        if isinstance(x, AggregatorState):
            found.append(x)
        return x

    jax.tree.map(visit, state, is_leaf=lambda x: isinstance(x, AggregatorState))
    return found


def _unwrap_groups(logs: dict[str, jax.Array], what: str) -> jax.Array | dict[str, jax.Array]:
    if not logs:
        raise ValueError(
            f"This aggregator's state keeps no {what}: it was built without the number of tasks. "
            "Pass num_tasks=K to the aggregator (e.g. mtl.upgrad(num_tasks=K)) to log them."
        )
    if set(logs) == {GLOBAL}:
        return logs[GLOBAL]
    return dict(logs)


def last_weights(state: PyTree) -> jax.Array | dict[str, jax.Array] | None:
    """The weights ``w[K]`` of the last step of the (first) aggregator inside an optax state.

    Returns an array for ``granularity="global"``, a ``{group: w}`` dict otherwise (zeros before
    the first step), and ``None`` if the state holds no aggregator that logs weights (GradDrop,
    a plain optimizer).

    Raises:
      ValueError: if the aggregator was built without ``num_tasks`` (and K could not be inferred
        from a per-task vector): its state has no room for the weights.
    """
    states = _find_states(state)
    return _unwrap_groups(states[0].weights, "weights") if states else None


def last_gram(state: PyTree) -> jax.Array | dict[str, jax.Array] | None:
    """The Gram matrices ``G[K, K]`` of the last step, like :func:`last_weights`."""
    states = _find_states(state)
    return _unwrap_groups(states[0].gram, "Gram matrices") if states else None


AGGREGATORS: dict[str, Callable[..., Transform]] = {
    "mean": mean,
    "sum": sum,
    "linear": linear,
    "pcgrad": pcgrad,
    "mgda": mgda,
    "cagrad": cagrad,
    "imtl_g": imtl_g,
    "graddrop": graddrop,
    "gradvac": gradvac,
    "nash_mtl": nash_mtl,
    "aligned_mtl": aligned_mtl,
    "upgrad": upgrad,
    "dualproj": dualproj,
    "config": config,
    "random_weighting": random_weighting,
    "fairgrad": fairgrad,
    "nocl": nocl,
    "excess_mtl": excess_mtl,
    "ema_weights": ema_weights,
}


def get_aggregator(name: str, **hyperparams: Any) -> Transform:
    """Builds the aggregator registered as ``name`` (experiment configs select methods by name).

    Raises:
      ValueError: for an unknown name (listing the valid ones) or an unknown hyper-parameter
        (listing the method's).
    """
    return build("aggregator", AGGREGATORS, name, hyperparams)


def shared_rows(
    aggregator: optax.GradientTransformation,
    task_specific: PyTree | Callable[[PyTree], PyTree],
) -> Transform:
    """Aggregates the shared leaves' rows; task-specific leaves' gradients pass through unchanged.

    The companion of :func:`mtl_jax.value_and_grads`, whose gradient tree has Jacobian rows
    ``[K, *shape]`` for shared leaves and ordinary gradients ``[*shape]`` for task-specific ones
    (heads, per-task copies ``[K, ...]``: each copy already holds its own task's gradient). The
    aggregator sees only the shared leaves (the others are ``optax.MaskedNode``), so one
    ``optax.chain(shared_rows(aggregator, ...), optimizer)`` updates every parameter. Unlike
    :func:`multitask`, nothing task-specific ever has a task axis of rows to sum.

    Args:
      aggregator: any aggregator (applied to the shared leaves only).
      task_specific: as in :func:`mtl_jax.value_and_grads`: a bool pytree or a sharing spec
        (structure of the parameters or a prefix), or a callable ``params -> either``.

    Returns:
      A transform whose ``update(grads, state, params=None, *, task_losses=None)`` returns a
      gradient pytree shaped like the parameters; its state is ``optax.MaskedState`` of the
      aggregator's state, with the structure ``init`` gave it.

    Raises:
      ValueError: (at trace time) if a task-specific gradient is not shaped like its parameter
        (e.g. a task Jacobian from :func:`value_and_jacobian` was given: use :func:`multitask`).

    Example::

      spec = ...  # e.g. from mtl.recon.branch
      tx = optax.chain(mtl.shared_rows(mtl.pcgrad(), spec), optax.adam(1e-3))
      opt_state = tx.init(params)
      losses, grads = mtl.value_and_grads(loss_fn, spec)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
    """
    from mtl_jax.sharing import task_specific_leaves

    def is_shared(tree: PyTree) -> PyTree:
        return jax.tree.map(lambda s: not s, task_specific_leaves(task_specific, tree))

    inner = optax.masked(aggregator, is_shared)

    def init(params: PyTree) -> PyTree:
        return inner.init(params)

    def update(grads, state, params=None, **extra_args):
        if params is not None:
            grad_pairs, par_pairs = _tree.leaves_with_paths(grads), _tree.leaves_with_paths(params)
            if [p for p, _ in grad_pairs] != [p for p, _ in par_pairs]:
                missing, extra = _tree.path_difference(
                    [p for p, _ in par_pairs], [p for p, _ in grad_pairs]
                )
                raise ValueError(
                    "shared_rows: the gradients do not have the structure of the parameters; "
                    f"only in the parameters: [{_tree._listing(missing)}], only in the "
                    f"gradients: [{_tree._listing(extra)}]."
                )
            specific = jax.tree.leaves(task_specific_leaves(task_specific, params))
            bad = [
                f"{path}: grad {tuple(jnp.shape(g))} vs param {tuple(jnp.shape(p))}"
                for s, (path, g), (_, p) in zip(specific, grad_pairs, par_pairs, strict=True)
                if s and tuple(jnp.shape(g)) != tuple(jnp.shape(p))
            ]
            if bad:
                raise ValueError(
                    "shared_rows: task-specific gradients must be shaped like their parameters "
                    "(the ordinary gradient from mtl.value_and_grads); for a full task Jacobian "
                    "use mtl.multitask. Mismatching leaves: " + _tree._listing(bad)
                )
        return inner.update(grads, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init, update)


def apply_if_finite(
    inner: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
    """``optax.apply_if_finite`` for transforms that change the shape of the updates.

    Wraps a whole chain that starts with an aggregator, e.g.
    ``mtl.apply_if_finite(optax.chain(mtl.upgrad(), optax.sgd(1e-2)), 3)``: a step whose task
    Jacobian (the input) or ``task_losses`` holds a NaN or an inf is skipped -- the update is
    zero and the inner state (the aggregator's keys, EMA targets, the optimizer's moments) is
    kept -- until ``max_consecutive_errors`` such steps in a row, after which the update goes
    through. The state is ``optax.ApplyIfFiniteState``, as optax's.

    Departure from ``optax.apply_if_finite``: optax's rejected branch returns zeros shaped like
    the transform's *input*; an aggregator's input is the Jacobian (leaves ``[K, ...]``) and its
    output is shaped like the parameters, so optax's version cannot wrap it (the two branches of
    its ``lax.cond`` differ in type). Here the rejected branch returns zeros shaped like the
    inner transform's output (``jax.eval_shape``). Wrapping only what follows the aggregator,
    ``optax.chain(aggregator, optax.apply_if_finite(optimizer, n))``, works with optax's own.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params: PyTree) -> optax.ApplyIfFiniteState:
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update(updates, state, params=None, **extra_args):
        checked = [*jax.tree.leaves(updates)]
        if extra_args.get("task_losses") is not None:
            checked.append(jnp.asarray(extra_args["task_losses"]))
        isfinite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in checked]))
        notfinite_count = jnp.where(isfinite, 0, state.notfinite_count + 1).astype(jnp.int32)

        def do_update(_):
            return inner.update(updates, state.inner_state, params, **extra_args)

        out_shape = jax.eval_shape(do_update, None)[0]

        def reject_update(_):
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
            return zeros, state.inner_state

        new_updates, new_inner = jax.lax.cond(
            isfinite | (notfinite_count > max_consecutive_errors),
            do_update,
            reject_update,
            None,
        )
        return new_updates, optax.ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=isfinite,
            total_notfinite=jnp.where(isfinite, state.total_notfinite, state.total_notfinite + 1),
            inner_state=new_inner,
        )

    return optax.GradientTransformationExtraArgs(init, update)
