"""The Gramian engine: ``G = J J^T`` without the ``K x P`` Jacobian, the weights, the update.

Every Gram-space method needs the task gradients only through ``G`` ([K, K]) and then
``d = sum_k w_k g_k``. The Jacobian path (:func:`mtl_jax.value_and_grads`) holds all K rows;
this engine (the JAX counterpart of TorchJD's ``autogram.Engine``, Quinton & Rey 2024) never
does:

1. ONE forward pass, traced into a jaxpr and re-run with a zero perturbation on the output of
   every *site*, the equation where a parameter meets an activation (``walk.py``);
2. K pullbacks of that forward with respect to the perturbations only: the activation
   cotangents ``delta_k`` of every site (no weight gradients are formed);
3. each leaf's ``[K, K]`` block from its site's activations and cotangents: the dense kernel
   identity, or the site's own VJP rows turned into ``rows rows^T`` and dropped
   (``layers.py``: the cheaper in flops, the update included; a Dense leaf whose rows are
   cheaper keeps them for step 5); a leaf the walk cannot place falls back to its exact K rows;
4. the weights from any Gram-space :class:`~mtl_jax.weighting.base.Weighting` (stateful ones:
   the state threads through ``weighting_state=``; ``granularity`` gives one G per group, as
   GradVac's per-layer variant needs);
5. the update ``sum_k w_k g_k``: the backward of ``sum_k w_k L_k`` taken from the cotangents
   already computed (``sum_k w_k delta_k`` through each site's VJP: one weight-gradient pass;
   the activation cotangents are not propagated again), or the kept rows combined.

Memory: O(K^2 + K x site outputs + activations), never O(K P) (benchmarks/gramian_engine.py
measures it) beyond the Dense leaves that keep their rows (chosen only where K rows cost fewer
flops than the identity: few objectives, or fewer inputs than positions). Exact: ``G`` equals
``mtl.gramian.gramian`` of the explicit Jacobian and the update the Jacobian path's, to float
rounding (tests/test_autogram.py).

**Instance-wise objectives** (``instance_wise=True``): the loss function is per sample,
``(params, *sample) -> loss`` or ``losses[T]``, every argument has a leading batch axis B and
every (sample, task) pair is an objective (K = B T, order ``b T + t``): IWRM with T = 1,
instance-wise MTL with T tasks. The engine ``vmap``-s the per-sample function, so ONE batched
forward and T pullbacks give every objective's cotangents (an objective only reaches its own
sample), and the dense identity costs O(B^2 (C + T^2 F)). A model that mixes samples
(BatchNorm in training mode) cannot be written per sample: use the default mode, where the
batch is one sample and BatchNorm is exact.

Departures from TorchJD's engine: one forward (TorchJD runs it twice), the whole step in one
jitted program, BatchNorm exact in the default mode, and the update from the stored cotangents
(no second backward). Limits: ``docs/autogram.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax import _tree
from mtl_jax._maps import check_task_map, map_pullback
from mtl_jax.autogram import layers
from mtl_jax.autogram.walk import Analysis, analyze, evaluate
from mtl_jax.gramian import GLOBAL, Granularity, combine, leaf_groups
from mtl_jax.weighting.base import Weighting
from mtl_jax.weighting.registry import as_weighting

PyTree = Any

__all__ = [
    "EnginePlan",
    "GramianWeighting",
    "LeafPlan",
    "engine_value_and_grads",
    "value_and_gramian",
]

#: Methods a leaf's Gram block can come from (the report's ``method`` column).
METHODS = ("identity", "rows", "fallback", "unused")


@dataclasses.dataclass(frozen=True)
class GramianWeighting:
    """The Gramian-engine option of :func:`mtl_jax.value_and_grads`.

    Args:
      weighting: a Gram-space :class:`~mtl_jax.weighting.base.Weighting` or its registered
        name (``"upgrad"``, ``"mgda"``, ``"gradvac"``, ...).
      granularity: ``"global"`` (one G), ``"leaf"`` or a callable ``path -> group`` such as
        :func:`mtl_jax.gramian.by_module`: one G and one weight vector per group, and each
        group's leaves are updated with its own weights (GradVac per layer).
      instance_wise: the loss function is per sample and every (sample, task) pair is an
        objective (IWRM, instance-wise MTL; module docstring).
      identities: ``True``: the dense identity where it costs fewer flops than the rows;
        ``"always"``: wherever it applies; ``False``: rows everywhere (for checks and
        benchmarks).
    """

    weighting: Weighting | str
    granularity: Granularity = GLOBAL
    instance_wise: bool = False
    identities: bool | str = True


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one parameter leaf's Gram block is computed."""

    path: str
    method: str  # one of METHODS
    sites: tuple[str, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """The engine's report: one :class:`LeafPlan` per leaf, the objective count, the sites."""

    leaves: tuple[LeafPlan, ...]
    num_objectives: int
    num_sites: int

    @property
    def fell_back(self) -> list[str]:
        """Paths of the leaves whose block comes from their explicit K rows."""
        return [leaf.path for leaf in self.leaves if leaf.method == "fallback"]

    def methods(self) -> dict[str, str]:
        """``{path: method}``."""
        return {leaf.path: leaf.method for leaf in self.leaves}

    def __str__(self) -> str:
        lines = [f"Gramian engine: K = {self.num_objectives}, {self.num_sites} sites"]
        for leaf in self.leaves:
            where = "; ".join(leaf.sites) if leaf.sites else "-"
            lines.append(f"  {leaf.path}: {leaf.method} ({leaf.reason}) at {where}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Trace-time preparation: the jaxpr, its sites, a method per leaf.


@dataclasses.dataclass
class _Prepared:
    closed: Any
    analysis: Analysis
    methods: list[str]
    reasons: list[str]
    layouts: dict[int, Any]  # site index -> DenseLayout | GatherLayout (identity sites)
    combined: frozenset[int]  # rows leaves of a dense site: the update combines their rows
    dense_rows: dict[int, Any]  # site index -> DenseLayout: rows by layers.dense_rows
    active: frozenset[int]
    fallback: list[int]
    instance_wise: bool
    num_b: int
    num_t: int
    per_sample_loss_shape: tuple[int, ...]
    num_values: int  # 0: loss_fn returns the loss vector; else that many values (below the cut)
    aux_treedef: Any
    others: list[Any]
    others_treedef: Any


def _check_batch(others: list[Any], what: str) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in others}
    if not others:
        raise ValueError(
            f"{what}: instance_wise=True needs batched arguments (every array with a leading "
            "batch axis B); the loss function got none."
        )
    if None in sizes or len(sizes) != 1:
        shapes = [tuple(jnp.shape(x)) for x in others]
        raise ValueError(
            f"{what}: instance_wise=True needs every argument batched along axis 0 with the same "
            f"size B; got shapes {shapes}. Close over unbatched values in the loss function."
        )
    return int(sizes.pop())


def _prepare(
    loss_fn: Callable[..., Any],
    has_aux: bool,
    instance_wise: bool,
    identities: bool | str,
    params: PyTree,
    args: tuple,
    kwargs: dict,
    what: str,
    num_objectives: int | None = None,
) -> _Prepared:
    """Traces ``loss_fn`` and plans every leaf. With ``num_objectives`` (the engine below the
    cut, :mod:`mtl_jax.autogram.at_cut`), ``loss_fn(params, *args) -> (values, aux)`` returns
    a list of arrays whose cotangent rows the caller supplies (:func:`_pull`)."""
    _tree.check_not_variables(params, what)
    _tree.check_float_leaves(params, what)
    leaves, treedef = jax.tree.flatten(params)
    others, others_treedef = jax.tree.flatten((args, kwargs))
    num_b = _check_batch(others, what) if instance_wise else 1
    sample = [x[0] for x in others] if instance_wise else others
    box: dict[str, Any] = {}

    def flat_fn(leaf_list: list[Any], other_list: list[Any]) -> list[Any]:
        a, kw = jax.tree.unflatten(others_treedef, other_list)
        out = loss_fn(jax.tree.unflatten(treedef, leaf_list), *a, **kw)
        losses, aux = out if has_aux else (out, None)
        aux_leaves, box["aux"] = jax.tree.flatten(aux)
        box["losses"] = losses
        values = list(losses) if num_objectives is not None else [losses]
        return [*values, *aux_leaves]

    closed = jax.make_jaxpr(flat_fn)(leaves, sample)
    losses = box["losses"]
    if num_objectives is not None:
        num_values, num_t = len(losses), int(num_objectives)
    elif instance_wise:
        if jnp.ndim(losses) > 1:
            raise ValueError(
                f"{what}: with instance_wise=True the loss function is per sample and returns "
                f"a scalar (IWRM) or losses[T] (T tasks); got shape {jnp.shape(losses)}."
            )
        if not jnp.issubdtype(jnp.result_type(losses), jnp.floating):
            raise TypeError(f"{what}: the per-sample loss must be floating; got {losses.dtype}.")
    else:
        _tree.check_loss_vector(losses, f"{what}: loss_fn")
    if num_objectives is None:
        num_values, num_t = 0, int(jnp.size(losses))
    analysis = analyze(closed, len(leaves))
    methods, reasons, layouts, combined, dense_rows = [], [], {}, set(), {}
    for i in range(len(leaves)):
        sites = [s for s in analysis.sites if i in s.leaves]
        if i in analysis.fallback:
            methods.append("fallback")
            reasons.append(analysis.fallback[i])
        elif not sites:
            methods.append("unused")
            reasons.append("does not reach the losses: zero gradient")
        elif len(sites) > 1 or len(sites[0].leaves) > 1:
            methods.append("rows")
            reasons.append(f"used at {len(sites)} sites: their rows summed")
        else:
            layout = layers.identity_layout(sites[0])
            method, id_cost, rows_cost = layers.choose(layout, num_b, num_t, identities)
            methods.append(method)
            if layout is None or identities is False:
                reasons.append("site VJP rows")
            else:
                reasons.append(f"identity {id_cost:.2g} vs rows {rows_cost:.2g} flops")
            if method == "identity":
                layouts[sites[0].index] = layout
            elif isinstance(layout, layers.DenseLayout) and identities is not False:
                combined.add(i)  # chosen as cheaper, the update included (layers.choose)
                if not instance_wise and layers.plain_dense(sites[0], layout):
                    dense_rows[sites[0].index] = layout
    active = frozenset(
        s.index for s in analysis.sites if any(methods[i] in ("identity", "rows") for i in s.leaves)
    )
    return _Prepared(
        closed=closed,
        analysis=analysis,
        methods=methods,
        reasons=reasons,
        layouts=layouts,
        combined=frozenset(combined),
        dense_rows=dense_rows,
        active=active,
        fallback=[i for i, m in enumerate(methods) if m == "fallback"],
        instance_wise=instance_wise,
        num_b=num_b,
        num_t=num_t,
        per_sample_loss_shape=() if num_values else tuple(jnp.shape(losses)),
        num_values=num_values,
        aux_treedef=box["aux"],
        others=others,
        others_treedef=others_treedef,
    )


def _plan_of(prep: _Prepared, params: PyTree) -> EnginePlan:
    paths = [p for p, _ in _tree.leaves_with_paths(params)]
    sites: dict[int, list[str]] = {}
    for s in prep.analysis.sites:
        for i in s.leaves:
            sites.setdefault(i, []).append(s.describe())
    plans = tuple(
        LeafPlan(paths[i], prep.methods[i], tuple(sites.get(i, ())), prep.reasons[i])
        for i in range(len(paths))
    )
    return EnginePlan(plans, prep.num_b * prep.num_t, len(prep.analysis.sites))


# ---------------------------------------------------------------------------------------------
# The run: forward, K pullbacks, blocks.


@dataclasses.dataclass
class _Run:
    losses: jax.Array  # [B, T]
    aux: Any
    captured: dict[int, list[Any]]  # site -> activations [B, ...]
    deltas: dict[int, jax.Array]  # site -> [T, B, *out]
    fb_rows: dict[int, jax.Array]  # leaf -> [O, *leaf]


@dataclasses.dataclass
class _Forward:
    outputs: Any  # the loss vector [B, T], or the values [B, *value] (num_values)
    pullback: Callable[..., Any]
    aux: list[Any]  # aux leaves, [B, ...]
    captured: dict[int, list[Any]]


def _forward(prep: _Prepared, leaves: list[Any]) -> _Forward:
    """ONE forward with a zero perturbation on every active site's output (kept for the K
    pullbacks: :func:`_pull`)."""
    num_b, num_t, num_v = prep.num_b, prep.num_t, prep.num_values
    sites = {s.index: s for s in prep.analysis.sites}
    # The default mode is instance-wise with one "sample": the whole batch.
    batched_others = prep.others if prep.instance_wise else [x[None] for x in prep.others]
    # Fallback rows come from these pullbacks too, except per sample (a batched pullback sums
    # over the samples): then from _per_sample_fallback_rows.
    fb_index = [] if prep.instance_wise else prep.fallback

    def sample_fwd(eps: dict, other_sample: list, fb_vals: list) -> Any:
        vals = list(leaves)
        for i, v in zip(fb_index, fb_vals, strict=True):
            vals[i] = v
        outs, caps = evaluate(prep.closed, vals, other_sample, prep.active, eps)
        if num_v:
            return outs[:num_v], (outs[num_v:], caps)
        return jnp.reshape(outs[0], (num_t,)), (outs[1:], caps)

    batched = jax.vmap(sample_fwd, in_axes=(0, 0, None))
    eps0 = {
        i: jnp.zeros((num_b, *sites[i].out_aval.shape), sites[i].out_aval.dtype)
        for i in sorted(prep.active)
    }
    fb_in_vjp = [leaves[i] for i in fb_index]
    outputs, pullback, (aux, caps) = jax.vjp(
        lambda e, f: batched(e, batched_others, f), eps0, fb_in_vjp, has_aux=True
    )
    return _Forward(outputs, pullback, aux, caps)


def _pull(fwd: _Forward, rows: Any, task_map: str) -> tuple[dict, list]:
    """``(deltas {site: [T, B, *out]}, fallback rows)``: the pullback of every row of ``rows``
    (the outputs' cotangents with a leading objective axis)."""
    return map_pullback(fwd.pullback, rows, None, task_map)


def _run(prep: _Prepared, leaves: list[Any], task_map: str = "vmap") -> _Run:
    num_b, num_t = prep.num_b, prep.num_t
    fwd = _forward(prep, leaves)
    basis = jnp.eye(num_t, dtype=fwd.outputs.dtype)[:, None, :]
    basis = jnp.broadcast_to(basis, (num_t, num_b, num_t))  # row t: e_t for every sample
    deltas, d_fb = _pull(fwd, basis, task_map)  # [T, B, *out]
    aux = fwd.aux
    if prep.instance_wise:
        fb_rows = _per_sample_fallback_rows(prep, leaves, prep.others)
    else:
        fb_rows = dict(zip(prep.fallback, d_fb, strict=True))
        aux = [a[0] for a in aux]
    aux_tree = jax.tree.unflatten(prep.aux_treedef, aux)
    return _Run(fwd.outputs, aux_tree, fwd.captured, deltas, fb_rows)


def _per_sample_fallback_rows(prep: _Prepared, leaves: list[Any], others: list) -> dict:
    """Instance-wise fallback leaves: per-sample Jacobians ``[B T, *leaf]`` (a second forward)."""

    def sample_losses(fb_vals: list, other_sample: list) -> jax.Array:
        vals = list(leaves)
        for i, v in zip(prep.fallback, fb_vals, strict=True):
            vals[i] = v
        outs, _ = evaluate(prep.closed, vals, other_sample, frozenset(), {})
        return jnp.reshape(outs[0], (prep.num_t,))

    if not prep.fallback:
        return {}
    fb_vals = [leaves[i] for i in prep.fallback]
    jac = jax.vmap(jax.jacrev(sample_losses), in_axes=(None, 0))(fb_vals, others)
    return {i: jnp.reshape(r, (-1, *r.shape[2:])) for i, r in zip(prep.fallback, jac, strict=True)}


# ---------------------------------------------------------------------------------------------
# Blocks, groups, weights, update.

OWN = object()  # the weight key of a task-specific leaf: the plain sum of its task's loss


def _leaf_blocks(
    prep: _Prepared, run: _Run, leaves: list[Any]
) -> tuple[dict[int, jax.Array], dict[int, jax.Array]]:
    """``({leaf: G_leaf [O, O]}`` for every identity, rows and fallback leaf, ``{leaf: rows}``
    kept for the update: ``prep.combined`` and the fallback leaves)."""
    leaf_vals = dict(enumerate(leaves))
    sites = {s.index: s for s in prep.analysis.sites}
    blocks: dict[int, jax.Array] = {}
    summed_rows: dict[int, jax.Array] = {}
    for i in sorted(prep.active):
        site, acts, deltas = sites[i], run.captured[i], run.deltas[i]
        if i in prep.layouts:
            (leaf,) = site.leaves
            blocks[leaf] = layers.identity_gram(prep.layouts[i], acts, deltas)
            continue
        if i in prep.dense_rows:
            (leaf,) = site.leaves
            summed_rows[leaf] = layers.dense_rows(prep.dense_rows[i], acts[0], deltas)
            continue
        wrt = [leaf for leaf in sorted(site.leaves) if prep.methods[leaf] == "rows"]
        for leaf, rows in layers.site_rows(site, leaf_vals, acts, deltas, wrt).items():
            summed_rows[leaf] = rows if leaf not in summed_rows else summed_rows[leaf] + rows
    for leaf, rows in [*summed_rows.items(), *run.fb_rows.items()]:
        blocks[leaf] = layers.rows_gram(rows)
    kept = {leaf: summed_rows[leaf] for leaf in prep.combined}
    return blocks, {**kept, **run.fb_rows}


def _labels(params: PyTree, task_specific: Any, granularity: Granularity) -> list[Any]:
    """Per leaf: its group name, or :data:`OWN` for a task-specific leaf."""
    groups = leaf_groups(params, granularity)
    if task_specific is None:
        return list(groups)
    from mtl_jax.sharing import task_specific_leaves

    specific = jax.tree.leaves(task_specific_leaves(task_specific, params))
    return [OWN if s else g for g, s in zip(groups, specific, strict=True)]


def _group_grams(
    blocks: dict[int, jax.Array], labels: list[Any], num_o: int, dtype: Any
) -> dict[str, jax.Array]:
    """``{group: G [O, O]}`` over the shared leaves (task-specific ones are not in G)."""
    grams: dict[str, jax.Array] = {}
    for leaf, label in enumerate(labels):
        if label is OWN:
            continue
        block = blocks.get(leaf, jnp.zeros((num_o, num_o), dtype))
        grams[label] = block if label not in grams else grams[label] + block
    return {g: 0.5 * (G + G.T) for g, G in grams.items()}


def _weigh(
    weighting: Weighting,
    grams: dict[str, jax.Array],
    state: PyTree,
    key: jax.Array,
    losses: jax.Array,
    grouped: bool,
) -> tuple[dict[str, jax.Array], PyTree]:
    """Weights per group through the aggregators' NaN guard; the state per group if grouped."""
    from mtl_jax.aggregation.gramspace import guarded_weigh

    weights, new_states = {}, {}
    keys = jax.random.split(key, len(grams))
    for (group, gram), sub in zip(grams.items(), keys, strict=True):
        inner = state[group] if grouped else state
        finite = jnp.all(jnp.isfinite(gram)) & jnp.all(jnp.isfinite(losses))
        w, new = guarded_weigh(weighting, gram, inner, sub, losses, finite)
        weights[group] = jnp.where(finite & jnp.all(jnp.isfinite(w)), w, jnp.nan)
        new_states[group] = new
    return weights, (new_states if grouped else new_states[GLOBAL])


def _update(
    prep: _Prepared,
    run: _Run,
    leaves: list[Any],
    labels: list[Any],
    weights: dict[Any, jax.Array],
    kept: dict[int, jax.Array],
) -> list[Any]:
    """``sum_o w_o g_o`` per leaf with its group's weights (task-specific: all ones): the
    site's weighted VJP, or the combination of the ``kept`` rows."""
    leaf_vals = dict(enumerate(leaves))
    sites = {s.index: s for s in prep.analysis.sites}
    shape = (prep.num_b, prep.num_t)
    grads: list[Any] = [None] * len(leaves)
    for i in sorted(prep.active):
        site, acts, deltas = sites[i], run.captured[i], run.deltas[i]
        live = [
            leaf
            for leaf in sorted(site.leaves)
            if prep.methods[leaf] in ("identity", "rows") and leaf not in kept
        ]
        by_label: dict[Any, list[int]] = {}
        for leaf in live:
            by_label.setdefault(labels[leaf], []).append(leaf)
        for label, wrt in by_label.items():
            w = jnp.reshape(weights[label], shape)
            cot = layers.combined_cotangent(deltas, w)
            for leaf, g in layers.site_update(site, leaf_vals, acts, cot, wrt).items():
                grads[leaf] = g if grads[leaf] is None else grads[leaf] + g
    for leaf, rows in kept.items():
        grads[leaf] = combine(weights[labels[leaf]].astype(rows.dtype), rows)
    return [
        jnp.zeros_like(x) if g is None else g.astype(x.dtype)
        for g, x in zip(grads, leaves, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# Public entry points.


def _resolve(gramian: Any) -> tuple[GramianWeighting, Weighting]:
    if not isinstance(gramian, GramianWeighting):
        raise TypeError(
            "gramian= takes a mtl.autogram.GramianWeighting (e.g. GramianWeighting('upgrad')); "
            f"got {type(gramian).__name__}."
        )
    if gramian.identities not in (True, False, "always"):
        raise ValueError(
            f"GramianWeighting.identities must be True, False or 'always'; got "
            f"{gramian.identities!r}."
        )
    return gramian, as_weighting(gramian.weighting, "GramianWeighting.weighting")


def _check_loss_fn(loss_fn: Any, what: str) -> None:
    if not callable(loss_fn):
        raise TypeError(
            f"{what} takes a loss function (params, *args) -> losses[K] (per sample with "
            f"instance_wise=True); got {type(loss_fn).__name__}."
        )


def _losses_out(prep: _Prepared, run: _Run) -> jax.Array:
    if prep.instance_wise:
        return jnp.reshape(run.losses, (prep.num_b, *prep.per_sample_loss_shape))
    return run.losses[0]


def _init_state(
    weighting: Weighting, params: PyTree, labels: list[Any], grouped: bool, num: int
) -> PyTree:
    if not grouped:
        return weighting.init(num)
    return {g: weighting.init(num) for g in dict.fromkeys(x for x in labels if x is not OWN)}


def _state_or_init(
    weighting: Weighting, params: PyTree, labels: list[Any], grouped: bool, num: int, state: PyTree
) -> PyTree:
    if state is not None:
        return state
    state = _init_state(weighting, params, labels, grouped, num)
    if jax.tree.leaves(state):
        raise ValueError(
            "This weighting keeps state across steps: pass weighting_state=... "
            "(fn.init_weighting_state(params, K) at the start, then aux['weighting_state'])."
        )
    return state


def _weighted_step(
    prep: _Prepared,
    run: _Run,
    leaves: list[Any],
    labels: list[Any],
    weighting: Weighting,
    grouped: bool,
    weighting_state: PyTree,
    key: jax.Array | None,
    what: str,
) -> tuple[dict[str, Any], list[Any]]:
    """Steps 3-5 of the module docstring: ``(aux without the loss function's, grads)``."""
    num_o = prep.num_b * prep.num_t
    blocks, kept = _leaf_blocks(prep, run, leaves)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    grams = _group_grams(blocks, labels, num_o, layers.compute_dtype(dtype))
    if not grams:
        raise ValueError(
            f"{what}: every parameter leaf is task-specific; there is no shared leaf to "
            "weigh (drop task_specific, or use the loss's ordinary gradient)."
        )
    flat_losses = jnp.reshape(run.losses, (-1,))
    step_key = jax.random.key(0) if key is None else key
    weights, new_state = _weigh(weighting, grams, weighting_state, step_key, flat_losses, grouped)
    weights_by_label = {**weights, OWN: jnp.ones((num_o,), flat_losses.dtype)}
    grads = _update(prep, run, leaves, labels, weights_by_label, kept)
    out_aux: dict[str, Any] = {
        "weights": weights if grouped else weights[GLOBAL],
        "gram": grams if grouped else grams[GLOBAL],
        "weighting_state": new_state,
    }
    return out_aux, grads


def engine_value_and_grads(
    loss_fn: Callable[..., Any],
    gramian: GramianWeighting,
    task_specific: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    has_aux: bool = False,
    task_map: str = "vmap",
) -> Callable[..., Any]:
    """Losses, the Gram-space weights and the update, without the Jacobian (module docstring).

    ``fn(params, *args, weighting_state=None, key=None, **kwargs) -> ((losses, aux), grads)``:
    ``grads`` is an ordinary gradient tree, ``sum_k w_k dL_k/dtheta`` on the shared leaves
    (per group with a ``granularity``) and the own-task gradient on ``task_specific`` leaves
    (which are not in G, as with :func:`mtl_jax.shared_rows`); ``aux`` holds ``weights``
    (``[K]``, or ``{group: [K]}``), ``gram`` (``[K, K]`` or ``{group: ...}``),
    ``weighting_state`` and, with ``has_aux``, the loss function's own ``aux``. ``losses``:
    ``[K]``, or ``[B]`` / ``[B, T]`` instance-wise. A stateful weighting needs
    ``weighting_state=fn.init_weighting_state(params, K)`` at the start, then
    ``aux["weighting_state"]``. ``fn.plan(params, *args)`` returns the :class:`EnginePlan`
    (which leaves use an identity, rows or fell back). The K pullbacks differentiate the
    perturbations only, so no weight gradient is formed K times, with or without ``jit``;
    ``task_map`` maps them as in :func:`mtl_jax.value_and_grads` (``"vmap"``, ``"unroll"``,
    ``"scan"``: the same numbers, another schedule).
    """
    _check_loss_fn(loss_fn, "engine_value_and_grads")
    check_task_map(task_map, None)
    gramian, weighting = _resolve(gramian)
    grouped = gramian.granularity != GLOBAL
    what = "value_and_grads(gramian=...)"

    def prepare(params: PyTree, args: tuple, kwargs: dict) -> _Prepared:
        return _prepare(
            loss_fn, has_aux, gramian.instance_wise, gramian.identities, params, args, kwargs, what
        )

    def fn(
        params: PyTree,
        *args: Any,
        weighting_state: PyTree = None,
        key: jax.Array | None = None,
        **kwargs: Any,
    ) -> Any:
        prep = prepare(params, args, kwargs)
        leaves = jax.tree.leaves(params)
        labels = _labels(params, task_specific, gramian.granularity)
        num_o = prep.num_b * prep.num_t
        state = _state_or_init(weighting, params, labels, grouped, num_o, weighting_state)
        run = _run(prep, leaves, task_map)
        out_aux, grads = _weighted_step(
            prep, run, leaves, labels, weighting, grouped, state, key, what
        )
        if has_aux:
            out_aux["aux"] = run.aux
        losses = _losses_out(prep, run)
        return (losses, out_aux), jax.tree.unflatten(jax.tree.structure(params), grads)

    def plan(params: PyTree, *args: Any, **kwargs: Any) -> EnginePlan:
        return _plan_of(prepare(params, args, kwargs), params)

    def init_weighting_state(params: PyTree, num_objectives: int) -> PyTree:
        labels = _labels(params, task_specific, gramian.granularity)
        return _init_state(weighting, params, labels, grouped, int(num_objectives))

    fn.plan = plan  # type: ignore[attr-defined]
    fn.init_weighting_state = init_weighting_state  # type: ignore[attr-defined]
    fn.weighting = weighting  # type: ignore[attr-defined]
    return fn


def value_and_gramian(
    loss_fn: Callable[..., Any],
    *,
    granularity: Granularity = GLOBAL,
    instance_wise: bool = False,
    identities: bool | str = True,
    has_aux: bool = False,
    task_specific: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Callable[..., Any]:
    """``fn(params, *args) -> (losses, G)`` (``((losses, aux), G)`` with ``has_aux``): the Gram
    matrix of the shared leaves' Jacobian without forming it; ``G`` is ``[K, K]``, or
    ``{group: [K, K]}`` for another ``granularity``. For conflict statistics
    (``mtl.conflict.conflict_incidence(G)``) at hundreds of objectives."""
    _check_loss_fn(loss_fn, "value_and_gramian")

    def fn(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        prep = _prepare(
            loss_fn, has_aux, instance_wise, identities, params, args, kwargs, "value_and_gramian"
        )
        leaves = jax.tree.leaves(params)
        labels = _labels(params, task_specific, granularity)
        run = _run(prep, leaves)
        blocks, _ = _leaf_blocks(prep, run, leaves)
        dtype = layers.compute_dtype(jnp.result_type(*leaves))
        grams = _group_grams(blocks, labels, prep.num_b * prep.num_t, dtype)
        gram = grams[GLOBAL] if granularity == GLOBAL else grams
        losses = _losses_out(prep, run)
        return ((losses, run.aux), gram) if has_aux else (losses, gram)

    fn.plan = lambda params, *a, **kw: _plan_of(  # type: ignore[attr-defined]
        _prepare(loss_fn, has_aux, instance_wise, identities, params, a, kw, "value_and_gramian"),
        params,
    )
    return fn
