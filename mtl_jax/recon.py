"""Recon: reducing conflicting gradients from the root (Shi et al., ICLR 2023;
docs/design/METHODS.md section 1).

The shared layers whose task gradients conflict most often get one copy per task:
:func:`search_tracker` counts per layer (a module: kernel and bias together) the (step, pair) events
with ``cos(g_i, g_j) < S`` during a search run (Alg. 1, lines 1-8); :func:`layer_scores` and
:func:`select_layers` pick the top K (or a parameter budget), :func:`random_layers` (RSL) and
:func:`random_parameters` (RSP) are the controls; :func:`branch` gives K per-task copies of the
chosen layers *and of every BatchNorm's running statistics*, plus the sharing spec for
:func:`mtl_jax.per_task` and ``mtl.value_and_grads(mtl.PerTaskLosses(...))``;
:func:`histogram_percent`, :func:`fraction_below`, :func:`reduction_percent` and
:func:`parameter_increase` give the paper's Table 6. Scores are counts over the whole search
run, not rates, as in the paper and the official code. The steps, a runnable example, Flax NNX
and the BatchNorm rules: ``docs/recipes/recon.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import _tree
from mtl_jax.conflict import RECON_BINS, ConflictState, ConflictTracker
from mtl_jax.gramian import GLOBAL, by_module
from mtl_jax.sharing import (
    COLLECTIONS,
    COPIED,
    _state_flags,
    copy_per_task,
    layer_key,
    layer_spec,
    state_spec_per_task,
)

PyTree = Any

__all__ = [
    "branch",
    "branched_layers",
    "fraction_below",
    "histogram_percent",
    "layer_scores",
    "layer_sizes",
    "parameter_increase",
    "random_layers",
    "random_parameters",
    "reduction_percent",
    "search_tracker",
    "select_layers",
]


# --------------------------------------------------------------------------------------------
# 1-2. Scores and selection


def search_tracker(
    num_tasks: int,
    severity: float,
    *,
    threshold: float = 0.0,
    edges: Sequence[float] = RECON_BINS,
) -> ConflictTracker:
    """The conflict tracker of Recon's search run: per-module groups, S-conflict counts.

    ``ConflictTracker(num_tasks, granularity=mtl.gramian.by_module, severity=severity)``: the group of a
    leaf is its module (Linen ``Conv_0/kernel`` and ``Conv_0/bias`` -> ``Conv_0``; a BatchNorm's
    ``scale`` and ``bias`` form one layer; NNX ``conv/kernel/value`` -> ``conv``), and a (step,
    pair) event counts when ``cos < severity`` (strict), Alg. 1 line 6.

    Feed it the *shared* parameters only (heads are not candidates): ``tracker.init(encoder)``
    or ``tracker.init(mtl.sharing.shared_view(params, task_specific))``.

    Args:
      num_tasks: K.
      severity: Recon's S in (-1, 0] (paper: -0.1 on Multi-Fashion+MNIST, -0.02 on NYUv2).
      threshold: the tracker's incidence threshold (0: cos < 0 is a conflict).
      edges: histogram bins (default: Recon's Table 6 bins).

    Example::

      tracker = search_tracker(2, severity=-0.1)
      cstate = tracker.init(variables["params"])
      cstate = tracker.update(cstate, jac)          # jac: leaves [K, ...], inside the jitted step
      scores = layer_scores(tracker, cstate)        # {"Conv_0": 12, "BatchNorm_0": 30, ...}
    """
    return ConflictTracker(
        num_tasks=num_tasks,
        granularity=by_module,
        severity=severity,
        threshold=threshold,
        edges=tuple(edges),
    )


def layer_scores(tracker: ConflictTracker, state: ConflictState) -> dict[str, int]:
    """Recon's S-conflict score per layer: the number of (step, pair) events with ``cos < S``.

    Summed over every step of the search run and all C(K, 2) task pairs -- the count, not a rate
    (docs/design/METHODS.md section 1, step 2). Host-side ints in the order of the parameters.

    Example::

      layer_scores(tracker, cstate)   # {"Conv_0": 3, "BatchNorm_0": 17, "Dense_0": 0}

    Raises:
      ValueError: if the tracker does not group by layer (it would only have ``"global"``).
    """
    scores = {g: int(v) for g, v in state.severe.items() if g != GLOBAL}
    if not scores:
        raise ValueError(
            "The tracker state has no per-layer groups; build it with mtl.recon.search_tracker "
            "(granularity=mtl.gramian.by_module)."
        )
    return scores


def layer_sizes(params: PyTree, collections: Sequence[str] = COLLECTIONS) -> dict[str, int]:
    """Number of parameters per layer (names as :func:`mtl_jax.sharing.layer_key` gives them).

    Pass the parameters only (``variables["params"]`` or ``nnx.state(model, nnx.Param)``), not
    the BatchNorm statistics, which are not trainable parameters.

    Example::

      layer_sizes(variables["params"])   # {"Conv_0": 80, "BatchNorm_0": 16, "Dense_0": 130}
    """
    sizes: dict[str, int] = {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in flat:
        name = layer_key(_tree.path_str(path), collections)
        sizes[name] = sizes.get(name, 0) + int(np.prod(np.shape(leaf), dtype=np.int64))
    return sizes


def _ranking(scores: Mapping[str, int]) -> list[str]:
    """Layers by descending score; ties keep the order of ``scores`` (the parameters' order)."""
    order = {name: i for i, name in enumerate(scores)}
    return sorted(scores, key=lambda name: (-scores[name], order[name]))


def select_layers(
    scores: Mapping[str, int],
    k: int | None = None,
    *,
    budget: int | None = None,
    sizes: Mapping[str, int] | None = None,
) -> list[str]:
    """The layers to branch: the top ``k`` by S-conflict score, or the top within a budget.

    Alg. 1 line 9: sort the layers by descending score and take the top K (ties: the order of
    ``scores``, i.e. the parameters' order). With ``budget`` (a number of parameters; needs
    ``sizes`` from :func:`layer_sizes`) it walks that ranking and takes every layer that still
    fits, skipping one that would exceed the budget (a large convolution) and going on to the
    next (so a small budget picks the highest-ranked small layers, often BatchNorm), until
    ``k`` layers are chosen when ``k`` is given too. A departure: the paper fixes K only; the
    budget is this library's way to hold the model's growth to a number of parameters.

    Args:
      scores: ``{layer: score}`` from :func:`layer_scores`.
      k: the number of layers (the paper's K, e.g. 25 on Multi-Fashion+MNIST).
      budget: the most parameters the chosen layers may hold together (before copying).
      sizes: ``{layer: parameter count}``, required with ``budget``.

    Returns:
      Layer names, highest score first.

    Example::

      select_layers({"a": 5, "b": 9, "c": 1}, k=2)                                 # ["b", "a"]
      select_layers(scores, budget=10_000, sizes=layer_sizes(variables["params"]))
    """
    if k is None and budget is None:
        raise ValueError("select_layers needs k (a number of layers), budget, or both.")
    if k is not None and not 0 <= k <= len(scores):
        raise ValueError(f"k must be in [0, {len(scores)}] (the number of layers); got {k}.")
    ranked = _ranking(scores)
    if budget is None:
        return ranked[:k]
    if sizes is None:
        raise ValueError("select_layers(budget=...) needs sizes=layer_sizes(params).")
    missing = [name for name in ranked if name not in sizes]
    if missing:
        raise ValueError(f"sizes has no entry for the layers {missing}.")
    chosen, total = [], 0
    for name in ranked:
        if k is not None and len(chosen) == k:
            break
        if total + sizes[name] <= budget:
            chosen.append(name)
            total += sizes[name]
    return chosen


def random_layers(layers: Sequence[str], k: int, seed: int = 0) -> list[str]:
    """RSL, Recon's control at equal K (Table 6): ``k`` layers drawn uniformly without replacement.

    Args:
      layers: the candidate layers (e.g. ``list(scores)``).
      k: how many (the K of the Recon selection it is compared with).
      seed: NumPy seed.

    Example::

      random_layers(list(scores), k=len(recon_layers), seed=1)
    """
    if not 0 <= k <= len(layers):
        raise ValueError(f"k must be in [0, {len(layers)}] (the number of layers); got {k}.")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(layers), size=k, replace=False)
    return [layers[i] for i in sorted(picked.tolist())]


def random_parameters(sizes: Mapping[str, int], num_params: int, seed: int = 0) -> list[str]:
    """RSP, Recon's control at equal parameter count (Table 6): random layers up to ``num_params``.

    The paper only says "the same parameter count, random". Copies are per layer here (a branched
    layer is a module), so the rule is: draw a random order of all layers; walk it, taking every
    layer whose size still fits in the remaining budget ``num_params - taken``; stop when the
    budget is exhausted. The result holds at most ``num_params`` parameters and misses the target
    by less than the smallest layer left out (BatchNorm layers are small, so it is usually
    exact or close).

    Args:
      sizes: ``{layer: parameter count}`` from :func:`layer_sizes`.
      num_params: the target, e.g. ``sum(sizes[l] for l in recon_layers)``.
      seed: NumPy seed.

    Returns:
      The chosen layers in the order of ``sizes``.

    Example::

      target = sum(sizes[name] for name in recon_layers)
      rsp = random_parameters(sizes, target, seed=1)
    """
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0; got {num_params}.")
    names = list(sizes)
    rng = np.random.default_rng(seed)
    left, chosen = int(num_params), set()
    for i in rng.permutation(len(names)).tolist():
        if sizes[names[i]] <= left:
            chosen.add(names[i])
            left -= sizes[names[i]]
        if left == 0:
            break
    return [name for name in names if name in chosen]


# --------------------------------------------------------------------------------------------
# 3. Branching


def branch(
    variables: PyTree,
    layers: Sequence[str],
    num_tasks: int,
    *,
    init: str = "copy",
    fresh_variables: Sequence[PyTree] | None = None,
    collections: Sequence[str] = COLLECTIONS,
) -> tuple[PyTree, PyTree]:
    """Per-task copies of the chosen layers (Alg. 1 line 10) and the sharing spec.

    Every parameter leaf of a chosen layer gets a leading task axis ``[K, *shape]`` and is
    :data:`~mtl_jax.COPIED` in the spec; the other parameters stay as they are and are
    :data:`~mtl_jax.SHARED`. *Every* state leaf (running statistics: Linen's non-``params``
    collections such as ``batch_stats``, NNX ``nnx.BatchStat`` ``mean``/``var``) is copied per
    task too, whether its layer is chosen or not. The semantics: a normalisation layer inside
    the task streams keeps per-task running statistics; its scale and bias stay shared unless
    the layer itself is branched. Each stream trains with its own batch statistics, so it is
    evaluated with its own running statistics. Layers before the first branched layer get K
    identical rows (the same computation in every stream, bit for bit).

    Give the spec to :func:`mtl_jax.per_task` (``has_state=True``): the layers before the first
    branched layer run once in training (in evaluation the streams start at the first
    normalisation layer, whose running statistics are per task), every later shared layer runs
    once per task stream. ``spec["params"]`` (Linen) is the ``task_specific`` argument of
    :func:`mtl_jax.value_and_grads` and :func:`mtl_jax.shared_rows`.

    Args:
      variables: the un-branched variables: Linen ``{"params": ..., "batch_stats": ...}``, a
        params dict, or an NNX state (``nnx.split(model)[1]``).
      layers: layer names (from :func:`select_layers`; :func:`mtl_jax.sharing.layer_key` names,
        with or without the collection).
      num_tasks: K.
      init: ``"copy"``: every copy starts from the shared layer's value (the paper).
        ``"fresh"``: copy t takes the layer's leaves from ``fresh_variables[t]`` (the official
        code deep-copies the layer and re-runs its initialiser; BatchNorm's init is constant).
      fresh_variables: with ``init="fresh"``, K variable trees with the structure and shapes of
        ``variables``, e.g. ``[model.init(jax.random.key(100 + t), x) for t in range(K)]``
        (NNX: ``nnx.split(Model(rngs=nnx.Rngs(100 + t)))[1]``).
      collections: top-level keys that are Flax collections (dropped from layer names).

    Returns:
      ``(branched_variables, spec)``, both with the structure of ``variables``. With
      ``init="fresh"`` the chosen layers come from ``fresh_variables``; the other state leaves
      are copies of ``variables``' own.

    Raises:
      ValueError: for unknown layers (listing the layers there are), a bad ``init``, or
        ``fresh_variables`` of the wrong number, structure or shapes.

    Example::

      variables = model.init(jax.random.key(0), x)
      branched, spec = branch(variables, ["Conv_1", "BatchNorm_1"], num_tasks=2)
      branched["batch_stats"]["BatchNorm_1"]["mean"].shape   # (2, C)
      branched["batch_stats"]["BatchNorm_0"]["mean"].shape   # (2, C): per-task statistics
      branched["params"]["BatchNorm_0"]["scale"].shape       # (C,): shared
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}.")
    chosen = layer_spec(variables, layers, collections)
    spec = state_spec_per_task(variables, chosen) if _has_state(variables) else chosen
    if init == "copy":
        if fresh_variables is not None:
            raise ValueError("fresh_variables is used with init='fresh' only.")
        return copy_per_task(variables, spec, num_tasks), spec
    if init != "fresh":
        raise ValueError(
            f"init must be 'copy' (the paper) or 'fresh' (official code); got {init!r}."
        )
    if fresh_variables is None or len(fresh_variables) != num_tasks:
        got = None if fresh_variables is None else len(fresh_variables)
        raise ValueError(
            f"init='fresh' needs fresh_variables: {num_tasks} variable trees (one per task, e.g. "
            f"the model initialised with {num_tasks} other keys); got {got}."
        )
    leaves, treedef = jax.tree.flatten(variables)
    fresh_leaves = []
    for t, tree in enumerate(fresh_variables):
        flat, td = jax.tree.flatten(tree)
        shapes = [np.shape(x) for x in flat]
        if td != treedef or shapes != [np.shape(x) for x in leaves]:
            raise ValueError(
                f"fresh_variables[{t}] does not have the structure and shapes of variables; "
                "initialise the same model with another key."
            )
        fresh_leaves.append(flat)
    copied = copy_per_task(variables, spec, num_tasks)  # the state leaves of unchosen layers
    pairs = zip(jax.tree.leaves(chosen), jax.tree.leaves(copied), strict=True)
    out = [
        jnp.stack([jnp.asarray(f[i]) for f in fresh_leaves]) if m is COPIED else x
        for i, (m, x) in enumerate(pairs)
    ]
    return treedef.unflatten(out), spec


def _has_state(variables: PyTree) -> bool:
    """Linen variables (a mapping with ``params``) or an NNX state: the trees whose state leaves
    :func:`mtl_jax.sharing.state_spec_per_task` can tell; a bare params dict has none."""
    from flax import nnx

    is_var = lambda x: isinstance(x, nnx.Variable)
    return (isinstance(variables, dict) and "params" in variables) or any(
        is_var(v) for v in jax.tree.leaves(variables, is_leaf=is_var)
    )


# --------------------------------------------------------------------------------------------
# 5. Reports


def histogram_percent(counts: Any) -> np.ndarray:
    """A cosine histogram (counts per bin, e.g. ``ConflictState.histogram["global"]``) in % of
    all (step, pair) events, as in Recon's Table 6. All zeros when there are no events."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return 100.0 * counts / total if total > 0 else np.zeros_like(counts)


def fraction_below(counts: Any, threshold: float, edges: Sequence[float] = RECON_BINS) -> float:
    """The share (in [0, 1], not %) of (step, pair) events with ``cos < threshold``, read off a
    histogram (e.g. ``ConflictState.histogram["global"]``); 0 when there are no events.

    Bin b holds ``edges[b + 1] <= cos < edges[b]``, so the events below ``threshold`` are the
    bins with ``edges[b] <= threshold``; ``threshold`` must be one of the edges (Recon's severity
    thresholds: -0.01 Multi-Fashion+MNIST, -0.02 CityScapes, -0.04 NYUv2 with 0.02-wide bins).
    Table 6 reports ``100 x`` this (joint training: 12.56%).
    """
    desc = [float(e) for e in edges]
    if not any(np.isclose(threshold, e) for e in desc[1:-1]):
        raise ValueError(
            f"threshold {threshold} is not an inner bin edge of {tuple(desc)}; the histogram can "
            "only tell the mass below an edge."
        )
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (len(desc) - 1,):
        raise ValueError(f"counts has shape {counts.shape} for {len(desc) - 1} bins.")
    below = [b for b in range(len(desc) - 1) if desc[b] <= threshold + 1e-12]
    total = counts.sum()
    return float(counts[below].sum() / total) if total > 0 else 0.0


def reduction_percent(before: float, after: float) -> float:
    """Recon's "reduction %": the relative drop versus joint training of the share of pairs
    below the severity threshold, ``100 (before - after) / before`` (the shares as fractions or
    as %, both the same way).

    Table 6: joint 12.56% -> Joint + Recon 3.79% gives 69.8%. Negative when conflicts increase
    (RSL: -52.9%).
    """
    if before <= 0:
        raise ValueError(f"The joint-training share must be > 0 to compare with; got {before}.")
    return 100.0 * (before - after) / before


def parameter_increase(params: PyTree, branched_params: PyTree) -> dict[str, float]:
    """Model size before and after branching: ``{"before", "after", "absolute", "percent"}``.

    Counts every leaf of the trees given (pass the parameters, not the BatchNorm statistics).
    Each branched layer adds ``(K - 1) x`` its size. The paper reports +1.42% on
    Multi-Fashion+MNIST (ResNet18, 25 layers, 20 of them BatchNorm).
    """

    def count(tree: PyTree) -> int:
        return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))

    before, after = count(params), count(branched_params)
    if before == 0:
        raise ValueError("params has no parameters.")
    return {
        "before": before,
        "after": after,
        "absolute": after - before,
        "percent": 100.0 * (after - before) / before,
    }


def branched_layers(spec: PyTree, collections: Sequence[str] = COLLECTIONS) -> list[str]:
    """The layers whose parameters a spec copies per task (in the parameters' order).

    State leaves (running statistics, copied for every layer by :func:`branch`) do not make a
    layer branched: Linen's non-``params`` collections and NNX ``nnx.BatchStat`` leaves of a
    spec from :func:`branch` are skipped."""
    flat = jax.tree_util.tree_flatten_with_path(spec)[0]
    flags = _state_flags(spec, whole_tree_is_state=False)
    names = [
        layer_key(_tree.path_str(p), collections)
        for (p, m), is_state in zip(flat, flags, strict=True)
        if not is_state and (m is COPIED or m == "copied")
    ]
    return list(dict.fromkeys(names))
