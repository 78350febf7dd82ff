"""Aggregators: optax transforms that turn a task Jacobian into an ordinary gradient.

Every aggregator returns an ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
task Jacobian (leaves ``[K, *param.shape]``) and returns a gradient pytree shaped like the
parameters, so it chains in front of any optax optimizer (DESIGN.md section 3)::

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
Gram matrices of the last step (``mtl.last_weights(state)``, ``mtl.last_gram(state)``). Their
shapes need K: pass ``num_tasks=K`` to get a fixed-shape state from ``init`` (needed for
``lax.scan`` loops and by stateful methods); without it the logged weights are allocated at the
first update, and a jitted step retraces once.

Bad input: a Jacobian whose leaves disagree on K, a Jacobian that does not match the parameters,
or ``task_losses`` of the wrong length raise ``ValueError`` at trace time. Non-finite gradients or
losses make the whole update NaN (never a finite but wrong update); to skip such steps put
``optax.apply_if_finite`` *after* the aggregator, around the optimizer
(``optax.chain(mtl.pcgrad(), optax.apply_if_finite(optax.adam(1e-3), 5))``), or check the losses
in the train loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree
from mtl_jax.gramian import GLOBAL, Granularity, combine, group_gramians, group_names, leaf_groups
from mtl_jax.weighting.base import Weighting
from mtl_jax.weighting.basic import linear_weighting, mean_weighting, sum_weighting
from mtl_jax.weighting.cagrad import cagrad_weighting
from mtl_jax.weighting.imtl import imtl_g_weighting
from mtl_jax.weighting.mgda import mgda_weighting
from mtl_jax.weighting.pcgrad import pcgrad_weighting

PyTree = Any
Transform = optax.GradientTransformationExtraArgs

__all__ = [
    "AGGREGATORS",
    "AggregatorState",
    "cagrad",
    "from_weighting",
    "get_aggregator",
    "graddrop",
    "imtl_g",
    "last_gram",
    "last_weights",
    "linear",
    "mean",
    "mgda",
    "multitask",
    "pcgrad",
    "sum",
    "sum_rows",
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
    k = 0 if num_tasks is None else int(num_tasks)
    dtype = _float_dtype()
    weights = {g: jnp.zeros((k,), dtype) for g in groups}
    gram = {g: jnp.zeros((k, k), dtype) for g in groups}
    return weights, gram


def _validate(
    jac: PyTree, params: PyTree | None, task_losses: Any, num_tasks: int | None, name: str
) -> int:
    k = _tree.task_axis_size(jac)
    if params is not None:
        _tree.check_jacobian_matches(jac, params)
    _tree.check_task_losses(task_losses, k)
    if num_tasks is not None and k != num_tasks:
        raise ValueError(
            f"{name} was built with num_tasks={num_tasks}, but the Jacobian has K={k}."
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
    return {g: v.astype(old[g].dtype) if g in old else v for g, v in new.items()}


def from_weighting(
    weighting: Weighting,
    *,
    granularity: Granularity = GLOBAL,
    seed: int = 0,
    num_tasks: int | None = None,
    name: str = "aggregator",
) -> Transform:
    """Builds an aggregator from a Gram-space :class:`~mtl_jax.weighting.base.Weighting`.

    Args:
      weighting: ``init(num_tasks)`` / ``weigh(G, state, key, losses) -> (w, state)``.
      granularity: where G is computed and the weights applied: ``"global"``, ``"leaf"`` or a
        callable ``path -> group`` (e.g. :func:`mtl_jax.by_module`).
      seed: seed of the PRNG key kept in the state.
      num_tasks: K, for a fixed-shape state from ``init`` (required by stateful weightings).
      name: used in error messages.
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
        weights, inner = {}, {}
        for (group, gram), group_key in zip(grams.items(), keys, strict=True):
            w, inner[group] = weighting.weigh(gram, state.inner[group], group_key, task_losses)
            finite = _finite_mask(gram, task_losses) & jnp.all(jnp.isfinite(w))
            weights[group] = jnp.where(finite, w, jnp.nan)
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


def mean(*, num_tasks: int | None = None) -> Transform:
    """The mean of the task gradients (equal weighting / joint training)."""
    return from_weighting(mean_weighting(), num_tasks=num_tasks, name="mean")


def sum(*, num_tasks: int | None = None) -> Transform:
    """The sum of the task gradients (the gradient of the summed loss)."""
    return from_weighting(sum_weighting(), num_tasks=num_tasks, name="sum")


def linear(weights: Sequence[float] | jax.Array, *, num_tasks: int | None = None) -> Transform:
    """A constant combination ``sum_k weights[k] g_k``."""
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


def _unwrap_groups(logs: dict[str, jax.Array]) -> jax.Array | dict[str, jax.Array] | None:
    if not logs or any(v.shape[0] == 0 for v in logs.values()):
        return None
    if set(logs) == {GLOBAL}:
        return logs[GLOBAL]
    return dict(logs)


def last_weights(state: PyTree) -> jax.Array | dict[str, jax.Array] | None:
    """The weights ``w[K]`` of the last step of the (first) aggregator inside an optax state.

    Returns an array for ``granularity="global"``, a ``{group: w}`` dict otherwise, and ``None``
    before the first step (when ``num_tasks`` was not given) or if the state holds no
    Gram-space aggregator.
    """
    states = _find_states(state)
    return _unwrap_groups(states[0].weights) if states else None


def last_gram(state: PyTree) -> jax.Array | dict[str, jax.Array] | None:
    """The Gram matrices ``G[K, K]`` of the last step, like :func:`last_weights`."""
    states = _find_states(state)
    return _unwrap_groups(states[0].gram) if states else None


AGGREGATORS: dict[str, Callable[..., Transform]] = {
    "mean": mean,
    "sum": sum,
    "linear": linear,
    "pcgrad": pcgrad,
    "mgda": mgda,
    "cagrad": cagrad,
    "imtl_g": imtl_g,
    "graddrop": graddrop,
}


def get_aggregator(name: str, **hyperparams: Any) -> Transform:
    """Builds the aggregator registered as ``name`` (experiment configs select methods by name).

    Raises:
      ValueError: for an unknown name (listing the valid ones) or an unknown hyper-parameter
        (listing the method's).
    """
    if name not in AGGREGATORS:
        raise ValueError(f"Unknown aggregator {name!r}; valid names: {sorted(AGGREGATORS)}.")
    factory = AGGREGATORS[name]
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(hyperparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"Unknown hyper-parameter(s) {unknown} for aggregator {name!r}; it accepts {sorted(accepted)}."
        )
    return factory(**hyperparams)
