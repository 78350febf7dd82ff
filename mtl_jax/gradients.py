"""Per-task gradients: ONE entry point, :func:`value_and_grads`, for every model shape.

It returns one format: Jacobian rows ``[K, *shape]`` for the shared leaves, each task's own
gradient ``[*shape]`` for task-specific leaves (heads, per-task copies, masks). The model is
a loss-vector function, a :class:`TrunkAndHeads` or a :class:`PerTaskLosses`; ``task_map``
(``"vmap"`` | ``"unroll"`` | ``"scan"``) says how the K tasks are mapped, ``chunk_size`` bounds
a vmap's memory. The representation (MGDA-UB) path is the ``representation`` option of a
:class:`TrunkAndHeads`. :func:`mtl_jax.aggregation.shared_rows` turns the tree into an update.
Costs, strategies and the maths: ``docs/gradients.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax import _tree
from mtl_jax._maps import TASK_MAPS, check_task_map, map_pullback
from mtl_jax.autogram import GramianWeighting, engine_value_and_grads
from mtl_jax.autogram.at_cut import engine_at_cut
from mtl_jax.cut import loss_vector_grads
from mtl_jax.gramian import GLOBAL, combine, group_gramians
from mtl_jax.sharing import task_specific_leaves
from mtl_jax.sharing.grads import per_task_grads
from mtl_jax.weighting.base import Weighting
from mtl_jax.weighting.registry import as_weighting

PyTree = Any

__all__ = [
    "TASK_MAPS",
    "PerTaskLosses",
    "RepresentationWeighting",
    "TrunkAndHeads",
    "WeightedBackward",
    "value_and_grads",
]


# ---------------------------------------------------------------------------------------------
# Model shapes.


@dataclasses.dataclass(frozen=True)
class TrunkAndHeads:
    """A shared trunk and one head per task.

    ``z = trunk_fn(params["trunk"], x)`` (``(z, trunk_aux)`` with ``has_aux``), then task k's
    loss ``head_loss_fns[k](params["heads"][k], z, targets[k])`` (``(loss, head_aux)`` with
    ``has_aux``). The gradient function is called ``fn(params, x, targets)`` with ``params =
    {"trunk": ..., "heads": ...}``. Heads are given three ways, the task order is that of the
    losses everywhere: a sequence of K functions (``heads``, ``targets``: sequences of K); a
    mapping ``name -> function`` (``heads``, ``targets``: mappings with its keys, in its
    order); one function for K homogeneous heads whose parameters and targets are stacked along
    a leading task axis (run under one ``vmap``).
    """

    trunk_fn: Callable[..., Any]
    head_loss_fns: Callable[..., Any] | Sequence[Callable[..., Any]] | Mapping[str, Callable]


@dataclasses.dataclass(frozen=True)
class PerTaskLosses:
    """A per-task model (:func:`mtl_jax.sharing.per_task`): task t's loss on its own view.

    ``task_loss_fn(view_t, t, *args, **kwargs) -> loss_t`` (with ``has_state``:
    ``(view_t, state_t, t, *args, **kwargs) -> (loss_t, new_state_t)``, and the gradient
    function is called ``fn(params, state, *args, **kwargs)``). ``spec`` is the parameters'
    sharing spec; ``state_spec``, ``state_reduction`` and ``axis_name`` are as in
    :func:`mtl_jax.sharing.per_task`. The gradient is taken inside each task's stream, so
    nothing is ever ``[K, K, ...]`` (``docs/gradients.md``).
    """

    task_loss_fn: Callable[..., Any]
    spec: PyTree
    num_tasks: int
    has_state: bool = False
    state_spec: PyTree | None = None
    state_reduction: str | Callable | None = None
    axis_name: str | None = None


@dataclasses.dataclass(frozen=True)
class RepresentationWeighting:
    """The one-backward representation path (MGDA-UB, Sener & Koltun 2018, Sec. 3.3).

    The weighting runs on the Gram matrix of ``d loss_k / d z`` (flattened over batch and
    features as the official code; ``sum_over_batch`` sums the batch axis first, as LibMTL)
    and the trunk gets ``(dz/dtheta)^T sum_k w_k dL_k/dz`` from ONE backward pass.
    ``scale_heads`` multiplies head k's gradient by ``w_k`` (the official MGDA code).
    """

    weighting: Weighting | str
    sum_over_batch: bool = False
    scale_heads: bool = False


@dataclasses.dataclass(frozen=True)
class WeightedBackward:
    """ONE backward pass of ``sum_k w_k L_k`` with weights chosen from the forward pass.

    ``weigh(losses[K], rep_grads) -> (w[K], out)`` runs between the forward pass (and each
    head's own backward pass, which gives ``rep_grads = d L_k / d z``, leaves ``[K, *z.shape]``)
    and the trunk's single backward pass of ``sum_k w_k d L_k / d z``: a loss-only method's
    weights (from the losses and its state), a representation method's (from ``rep_grads``),
    or constant ones. ``out`` is returned as ``aux["weigh"]`` (e.g. the method's new state).
    ``scale_heads``: head k's gradient times ``w_k``, the gradient of the weighted loss (a
    loss-only method); ``False`` keeps each head's own gradient (MGDA-UB, ``mean`` as an
    aggregator). Build it inside the jitted step, closing over the state ``weigh`` needs
    (:attr:`mtl_jax.methods.Method.weigh`; ``docs/custom_loop.md``).
    """

    weigh: Callable[[jax.Array, PyTree], tuple[jax.Array, Any]]
    scale_heads: bool = True


Model = Callable[..., Any] | TrunkAndHeads | PerTaskLosses


# ---------------------------------------------------------------------------------------------
# Checks and the task map.


def _check_params(params: PyTree, where: str) -> None:
    """The parameters, not Flax ``variables``, and floating leaves only (trace time)."""
    _tree.check_not_variables(params, where)
    _tree.check_float_leaves(params, where)


def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# ---------------------------------------------------------------------------------------------
# Loss vector: rows for shared leaves, the summed loss's gradient for task-specific ones.


def _loss_vector_grads(
    loss_fn: Callable[..., Any],
    task_specific: PyTree | Callable[[PyTree], PyTree] | None,
    has_aux: bool,
    task_map: str,
    chunk_size: int | None,
) -> Callable[..., Any]:
    """The loss vector differentiated at its cut (:mod:`mtl_jax.cut`, issue 25): one forward,
    ONE backward of the all-ones cotangent through everything after the cut (every
    task-specific leaf's gradient: only task t's loss reaches its leaves), ``d loss_k / d cut``
    from the entry equations, and K pullbacks of the trunk alone for the shared leaves' rows.
    With stacked heads under one ``vmap`` nothing is ``[K, K, ...]``; where the analysis finds
    no cut the K pullbacks cover the whole program (the plain Jacobian's cost)."""

    def fn(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        _check_params(params, "value_and_grads")
        leaves, treedef = jax.tree.flatten(params)
        if task_specific is None:
            specific = [False] * len(leaves)
        else:
            specific = jax.tree.leaves(task_specific_leaves(task_specific, params))

        def split_loss(flat: list[Any]) -> Any:
            return loss_fn(treedef.unflatten(flat), *args, **kwargs)

        def check(losses: Any) -> None:
            _tree.check_loss_vector(losses, "value_and_grads: loss_fn")

        losses, grads, aux = loss_vector_grads(
            split_loss,
            leaves,
            specific,
            has_aux,
            lambda pullback, cts: map_pullback(pullback, cts, chunk_size, task_map),
            check,
        )
        grads = treedef.unflatten(grads)
        return ((losses, aux), grads) if has_aux else (losses, grads)

    return fn


# ---------------------------------------------------------------------------------------------
# Trunk and heads.


def _head_value_and_grad(
    head_loss_fn: Callable[..., Any], has_aux: bool, head: str = "the head loss"
) -> Callable:
    """``(head_params, z, target) -> (loss, aux, (d loss/d head_params, d loss/d z))``."""

    def checked(head_params: PyTree, z: PyTree, target: PyTree) -> Any:
        out = head_loss_fn(head_params, z, target)
        _tree.check_scalar_loss(out[0] if has_aux else out, f"TrunkAndHeads: {head}")
        return out

    grad_fn = jax.value_and_grad(checked, argnums=(0, 1), has_aux=has_aux)

    def fn(head_params: PyTree, z: PyTree, target: PyTree) -> Any:
        value, grads = grad_fn(head_params, z, target)
        loss, aux = value if has_aux else (value, None)
        return loss, aux, grads

    return fn


def _heads_of(head_loss_fns: Any) -> tuple[bool, list[str] | None, list[Callable] | None]:
    """``(stacked, names, fns)`` for the three ways heads can be given."""
    stacked = callable(head_loss_fns) and not isinstance(head_loss_fns, Mapping | Sequence)
    if stacked:
        return True, None, None
    if isinstance(head_loss_fns, Mapping):
        names = list(head_loss_fns)
        return False, names, [head_loss_fns[n] for n in names]
    fns = list(head_loss_fns)
    if not fns:
        raise ValueError("head_loss_fns is empty; give one head loss function per task.")
    return False, None, fns


def _check_stacked_heads(head_params: PyTree, targets: PyTree) -> None:
    """Stacked heads: every leaf of ``params["heads"]`` and of ``targets`` has the same
    leading task axis K (else ``vmap`` fails with a message naming no path)."""
    sizes: dict[int, list[str]] = {}
    for what, tree in (("params['heads']", head_params), ("targets", targets)):
        for path, leaf in _tree.leaves_with_paths(tree):
            shape = tuple(jnp.shape(leaf))
            name = f"{what}/{path}" if path else what
            if not shape:
                raise ValueError(
                    f"TrunkAndHeads with one stacked head function: {name} is a scalar; every "
                    "leaf of params['heads'] and of targets needs a leading task axis K."
                )
            sizes.setdefault(shape[0], []).append(f"{name} {shape}")
    if len(sizes) > 1:
        detail = "; ".join(f"K={k}: {_tree._listing(v)}" for k, v in sorted(sizes.items()))
        raise ValueError(
            "TrunkAndHeads with one stacked head function: the heads' parameters and the targets "
            f"disagree on the task axis (leading dimension): {detail}. Stack one head and one "
            "target per task, e.g. jax.tree.map(lambda *h: jnp.stack(h), *heads)."
        )


def _per_task_entries(container: Any, names: list[str] | None, num: int, what: str) -> list:
    if names is not None:
        if not isinstance(container, Mapping) or set(container) != set(names):
            got = sorted(container) if isinstance(container, Mapping) else type(container)
            raise ValueError(f"{what} must be a mapping with the task keys {names}; got {got}.")
        return [container[n] for n in names]
    if not isinstance(container, Sequence) or len(container) != num:
        got = len(container) if isinstance(container, Sequence) else type(container).__name__
        raise ValueError(
            f"{what} must be a sequence of {num} entries (one per head: TrunkAndHeads has "
            f"{num} head loss functions); got {got}. Give one entry per head loss, in their "
            "order."
        )
    return list(container)


def _heads_value_and_grads(
    head_loss_fns: Any, has_aux: bool
) -> Callable[[Any, PyTree, Any], tuple[jax.Array, Any, Any, PyTree]]:
    """``(head_params, z, targets) -> (losses[K], head_aux, head_grads, rep_grads)``:
    each head's loss and its gradients with respect to its parameters and to ``z``
    (``rep_grads`` leaves ``[K, *z.shape]``)."""
    stacked, names, fns = _heads_of(head_loss_fns)

    def fn(head_params: Any, z: PyTree, targets: Any) -> Any:
        if stacked:
            _check_stacked_heads(head_params, targets)
            one = _head_value_and_grad(head_loss_fns, has_aux, "the stacked head loss")
            losses, aux, (grads, rep_grads) = jax.vmap(one, in_axes=(0, None, 0))(
                head_params, z, targets
            )
            return losses, aux, grads, rep_grads
        params_k = _per_task_entries(head_params, names, len(fns), "params['heads']")
        targets_k = _per_task_entries(targets, names, len(fns), "targets")
        labels = names if names is not None else list(range(len(fns)))
        results = [
            _head_value_and_grad(f, has_aux, f"head_loss_fns[{label!r}]")(p, z, t)
            for f, p, t, label in zip(fns, params_k, targets_k, labels, strict=True)
        ]
        losses = jnp.stack([r[0] for r in results])
        rep_grads = _stack([r[2][1] for r in results])
        grads_k, aux_k = [r[2][0] for r in results], [r[1] for r in results]
        if names is not None:
            return (
                losses,
                dict(zip(names, aux_k, strict=True)),
                dict(zip(names, grads_k, strict=True)),
                rep_grads,
            )
        grads = type(head_params)(grads_k) if isinstance(head_params, tuple) else grads_k
        return losses, aux_k, grads, rep_grads

    return fn


def _scale_heads(head_grads: Any, weights: jax.Array, head_loss_fns: Any) -> Any:
    """Head k's gradient times ``w_k`` (for the three ways heads can be given)."""
    stacked, names, _ = _heads_of(head_loss_fns)
    if stacked:
        return jax.tree.map(
            lambda g: g * jnp.reshape(weights.astype(g.dtype), (-1,) + (1,) * (g.ndim - 1)),
            head_grads,
        )
    scale = lambda k, tree: jax.tree.map(lambda g: g * weights[k].astype(g.dtype), tree)
    if names is not None:
        return {name: scale(k, head_grads[name]) for k, name in enumerate(names)}
    scaled = [scale(k, g) for k, g in enumerate(head_grads)]
    return type(head_grads)(scaled) if isinstance(head_grads, tuple) else scaled


def _check_trunk_params(params: Any) -> None:
    _tree.check_not_variables(params, "value_and_grads(TrunkAndHeads)")
    if not isinstance(params, Mapping) or set(params) != {"trunk", "heads"}:
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            "A TrunkAndHeads model is differentiated at params = {'trunk': ..., 'heads': ...}; "
            f"got {got}."
        )


def representation_gram(rep_grads: PyTree, sum_over_batch: bool) -> jax.Array:
    """``G[K, K]`` of the representation gradients ``rep_grads`` (leaves ``[K, B, ...]``),
    flattened over batch and features (Sener & Koltun) or summed over the batch first (LibMTL)."""
    reduced = jax.tree.map(lambda r: jnp.sum(r, axis=1), rep_grads) if sum_over_batch else rep_grads
    return group_gramians(reduced, GLOBAL)[GLOBAL]


def _trunk_and_heads_grads(
    model: TrunkAndHeads,
    has_aux: bool,
    task_map: str,
    chunk_size: int | None,
    representation: bool | RepresentationWeighting,
) -> Callable[..., Any]:
    """The trunk's Jacobian rows from ONE forward and K trunk pullbacks of ``d loss_k / d z``
    (never through the heads: a head's rows are zero but its own task's), each head's own
    gradient; or, with a :class:`RepresentationWeighting`, ONE trunk pullback of the weighted
    representation gradients."""
    heads = _heads_value_and_grads(model.head_loss_fns, has_aux)
    if isinstance(representation, WeightedBackward):
        return _weighted_backward_grads(model, heads, has_aux, representation)
    weighted = isinstance(representation, RepresentationWeighting)
    weighting = None
    if weighted:
        weighting = as_weighting(representation.weighting, "RepresentationWeighting.weighting")

    def fn(
        params: Mapping[str, Any],
        x: Any,
        targets: Any,
        *,
        weighting_state: PyTree = None,
        key: jax.Array | None = None,
    ) -> Any:
        if weighted:  # MGDA-UB's one backward: the weights from the representation Gram matrix
            option = WeightedBackward(
                _representation_weigh(weighting, representation, weighting_state, key),
                scale_heads=representation.scale_heads,
            )
            (losses, aux), grads = _weighted_backward_grads(model, heads, has_aux, option)(
                params, x, targets
            )
            gram, new_state = aux.pop("weigh")
            aux.update(gram=gram, weighting_state=new_state)
            return (losses, aux), grads
        losses, aux, head_grads, rep_grads, pullback = _forward(
            model, heads, has_aux, params, x, targets
        )
        (trunk_rows,) = map_pullback(pullback, rep_grads, chunk_size, task_map)
        if representation:
            aux["rep_grads"] = rep_grads
        grads = {"trunk": trunk_rows, "heads": head_grads}
        return ((losses, aux), grads) if aux else (losses, grads)

    if weighted:
        fn.weighting = weighting  # type: ignore[attr-defined]
    return fn


def _forward(
    model: TrunkAndHeads, heads: Callable, has_aux: bool, params: Any, x: Any, targets: Any
) -> tuple[jax.Array, dict[str, Any], Any, PyTree, Callable]:
    """The trunk's forward (``jax.vjp``) and each head's value and gradients:
    ``(losses, aux, head_grads, rep_grads, trunk_pullback)``; ``aux`` holds the trunk's and the
    heads' auxiliary outputs with ``has_aux`` (else it is empty)."""
    _check_trunk_params(params)
    _tree.check_float_leaves(params, "value_and_grads(TrunkAndHeads)")
    encode = lambda p: model.trunk_fn(p, x)
    if has_aux:
        z, pullback, trunk_aux = jax.vjp(encode, params["trunk"], has_aux=True)
    else:
        (z, pullback), trunk_aux = jax.vjp(encode, params["trunk"]), None
    losses, head_aux, head_grads, rep_grads = heads(params["heads"], z, targets)
    aux: dict[str, Any] = {"trunk": trunk_aux, "heads": head_aux} if has_aux else {}
    return losses, aux, head_grads, rep_grads, pullback


def _representation_weigh(
    weighting: Weighting,
    option: RepresentationWeighting,
    weighting_state: PyTree,
    key: jax.Array | None,
) -> Callable[[jax.Array, PyTree], tuple[jax.Array, Any]]:
    """MGDA-UB's ``weigh`` for :class:`WeightedBackward`: the weighting on the Gram matrix of
    the representation gradients, behind the aggregators' NaN guard; returns ``(w, (G,
    new_state))``."""
    from mtl_jax.aggregation.gramspace import guarded_weigh  # the aggregators' NaN guard

    def weigh(losses: jax.Array, rep_grads: PyTree) -> tuple[jax.Array, Any]:
        state = weighting_state
        if state is None:  # a stateless weighting's state; a stateful one needs it
            state = weighting.init(losses.shape[0])
            if jax.tree.leaves(state):
                raise ValueError(
                    "This weighting keeps state across steps: pass weighting_state=... (its "
                    "fn.weighting.init(K) at the start, then aux['weighting_state'])."
                )
        gram = representation_gram(rep_grads, option.sum_over_batch)
        finite = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(losses))
        step_key = jax.random.key(0) if key is None else key
        weights, new_state = guarded_weigh(weighting, gram, state, step_key, losses, finite)
        weights = jnp.where(finite & jnp.all(jnp.isfinite(weights)), weights, jnp.nan)
        return weights, (gram, new_state)

    return weigh


def _weighted_backward_grads(
    model: TrunkAndHeads, heads: Callable, has_aux: bool, option: WeightedBackward
) -> Callable[..., Any]:
    """One trunk forward, each head's own value and gradient, ``option.weigh``, ONE trunk
    backward of the weighted representation gradients: the cost of a joint step."""

    def fn(params: Mapping[str, Any], x: Any, targets: Any) -> Any:
        losses, aux, head_grads, rep_grads, pullback = _forward(
            model, heads, has_aux, params, x, targets
        )
        weights, out = option.weigh(losses, rep_grads)
        cotangent = jax.tree.map(lambda r: combine(weights, r), rep_grads)  # float32 sums
        (trunk_grad,) = pullback(cotangent)
        if option.scale_heads:
            head_grads = _scale_heads(head_grads, weights, model.head_loss_fns)
        aux.update(weights=weights, weigh=out)
        return (losses, aux), {"trunk": trunk_grad, "heads": head_grads}

    return fn


def _gramian_grads(
    model: Any,
    gramian: GramianWeighting,
    task_specific: Any,
    has_aux: bool,
    task_map: str,
    chunk_size: int | None,
    representation: Any,
) -> Callable[..., Any]:
    """The Gramian engine's step (:mod:`mtl_jax.autogram`): G without the Jacobian."""
    if isinstance(model, TrunkAndHeads | PerTaskLosses) or not callable(model):
        raise ValueError(
            "gramian= takes a loss function (params, *args) -> losses[K] (per sample with "
            f"GramianWeighting(..., instance_wise=True)); got {type(model).__name__}."
        )
    if chunk_size is not None or representation is not False:
        raise ValueError(
            "gramian= computes G without K backward passes of the parameters: drop chunk_size "
            "and representation (task_map maps the engine's K cotangent pullbacks)."
        )
    if gramian.instance_wise:
        return engine_value_and_grads(
            model, gramian, task_specific, has_aux=has_aux, task_map=task_map
        )
    return engine_at_cut(model, gramian, task_specific, has_aux=has_aux, task_map=task_map)


# ---------------------------------------------------------------------------------------------
# The entry point.


def value_and_grads(
    model: Model,
    task_specific: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    has_aux: bool = False,
    task_map: str = "vmap",
    chunk_size: int | None = None,
    representation: bool | RepresentationWeighting | WeightedBackward = False,
    gramian: GramianWeighting | None = None,
) -> Callable[..., Any]:
    """Task losses and ONE gradient tree: Jacobian rows for shared leaves, own gradients elsewhere.

    ``grads`` has the structure of the parameters; a **shared** leaf gets its K rows
    ``[K, *shape]`` (row k = d loss_k / d leaf), a **task-specific** leaf (a head, a per-task
    copy ``[K, ...]``, a modulation scale) the gradient of its own task's loss, ``[*shape]``.
    Give it to ``optax.chain(mtl.aggregation.shared_rows(aggregator, task_specific), opt)``.

    Args:
      model: what is differentiated.

        * a function ``(params, *args, **kwargs) -> losses[K]`` (any loss vector);
          ``task_specific`` labels its task-specific leaves (default: none, the full Jacobian);
        * a :class:`TrunkAndHeads`: called ``(params, x, targets)`` with ``params = {"trunk",
          "heads"}``; the trunk gets rows (from ``d loss_k / d z``: the K pullbacks never pass
          the heads), the heads their own gradients;
        * a :class:`PerTaskLosses` (a per-task model): each task's loss is differentiated in
          its own stream; ``task_specific`` labels more task-specific leaves (heads, SHARED in
          the spec), copied leaves are task-specific anyway.
      task_specific: a bool pytree, a sharing spec (the parameters' structure or a prefix) or
        a callable ``params -> either`` (:func:`mtl_jax.sharing.task_specific_leaves`).
      has_aux: the model's functions return ``(loss, aux)``; the result is then
        ``((losses, aux), grads)``. For a :class:`TrunkAndHeads`, ``aux = {"trunk": ...,
        "heads": ...}``.
      task_map: ``"vmap"`` (one batched backward pass; default), ``"unroll"`` (K passes in the
        compiled program: on CPU up to 2x faster for conv nets; needed for a
        :class:`PerTaskLosses` whose tasks' losses differ in structure) or ``"scan"`` (K
        passes in a loop; a :class:`PerTaskLosses` maps with ``"vmap"`` or ``"unroll"``).
      chunk_size: with ``"vmap"``, run the K backward passes in chunks of this many tasks
        (bounds the activation cotangents, not the ``K x P`` rows).
      representation: :class:`TrunkAndHeads` only. ``True``: also return
        ``aux["rep_grads"]`` (``d loss_k / d z``, leaves ``[K, *z.shape]``) for the
        representation methods (``mtl.get_method("mgda_ub")``). A
        :class:`RepresentationWeighting`: the one-backward path: the trunk gets the weighted
        gradient ``[*shape]`` (no rows) and the function takes ``weighting_state=`` (and
        ``key=``), returning ``aux["weights"]``, ``aux["gram"]``, ``aux["weighting_state"]``.
        A :class:`WeightedBackward`: ONE backward of ``sum_k w_k L_k`` with ``w`` from its
        ``weigh`` (a method at its own cost); returns ``aux["weights"]``, ``aux["weigh"]``.

      gramian: a :class:`mtl_jax.autogram.GramianWeighting`: the Gramian engine (a
        loss-vector model only): G from per-layer activations and cotangents, never the
        Jacobian, then the weighting and the update ``sum_k w_k g_k`` (task-specific leaves:
        their own gradient); ``fn(params, *args, weighting_state=None, key=None)`` returns
        ``((losses, aux), grads)`` with ``aux["weights"]``, ``aux["gram"]``,
        ``aux["weighting_state"]``; ``fn.plan(params, *args)`` is the per-leaf report
        (``docs/autogram.md``).
    Returns:
      ``fn(params, *args, **kwargs) -> (losses, grads)`` or ``((losses, aux), grads)``; for a
      :class:`PerTaskLosses` with ``has_state``: ``fn(params, state, ...) -> ((losses,
      new_state), grads)``. Pure and jit-able.

    Example::

      grad_fn = mtl.value_and_grads(loss_fn, task_specific={"encoder": False, "heads": True})
      tx = optax.chain(mtl.aggregation.shared_rows(mtl.aggregation.upgrad(),
                                                   {"encoder": False, "heads": True}),
                       optax.adam(1e-3))
      losses, grads = grad_fn(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
    """
    check_task_map(task_map, chunk_size)
    if gramian is not None:
        return _gramian_grads(
            model, gramian, task_specific, has_aux, task_map, chunk_size, representation
        )
    if representation is not False and not isinstance(model, TrunkAndHeads):
        raise ValueError(
            "representation= needs a TrunkAndHeads model (the representation is the trunk's "
            f"output); got {type(model).__name__}."
        )
    if isinstance(model, TrunkAndHeads):
        if task_specific is not None:
            raise ValueError(
                "A TrunkAndHeads model's heads are its task-specific leaves; drop task_specific."
            )
        return _trunk_and_heads_grads(model, has_aux, task_map, chunk_size, representation)
    if isinstance(model, PerTaskLosses):
        if task_map == "scan" or chunk_size is not None:
            raise ValueError(
                "A PerTaskLosses model maps its tasks with task_map='vmap' or 'unroll' (no "
                "chunk_size): each task's stream is differentiated on its own."
            )
        if has_aux:
            raise ValueError(
                "PerTaskLosses has no aux output; its state (has_state=True) is returned with "
                "the losses."
            )
        return per_task_grads(
            model.task_loss_fn,
            model.spec,
            model.num_tasks,
            has_state=model.has_state,
            state_spec=model.state_spec,
            state_reduction=model.state_reduction,
            axis_name=model.axis_name,
            unroll=task_map == "unroll",
            task_specific=task_specific,
        )
    if not callable(model):
        raise TypeError(
            "value_and_grads takes a loss-vector function, a TrunkAndHeads or a PerTaskLosses; "
            f"got {type(model).__name__}."
        )
    return _loss_vector_grads(model, task_specific, has_aux, task_map, chunk_size)
