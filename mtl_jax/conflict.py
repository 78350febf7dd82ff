"""Conflict metrics from Gram matrices: cosines, incidence p%, Recon histograms and S-scores.

Two tasks conflict when ``cos(g_i, g_j) < 0`` (docs/design/METHODS.md section 0). Everything
here is computed from ``G = J J^T`` (global or per group, :mod:`mtl_jax.gramian`), so it costs
O(K^2) on top of the Gram matrices an aggregator computes anyway, and is pure and jit-able:
:func:`pairwise_cosines` (pairs ``i < j``), :func:`conflict_incidence` (p%, the sparse-training
paper's N_gc / C(T, 2)), :func:`cosine_histogram` (Recon's Table 6 bins),
:func:`magnitude_similarity` (Yu et al.) and :class:`ConflictTracker`, a pytree-state tracker of
per-group S-conflict counts (Recon), incidence over time and per-pair cosines. With K = 1 there
are no pairs: the cosine vector is empty and the incidence is 0. The metrics and how to read
them: ``docs/conflict.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.gramian import GLOBAL, Granularity, cosine_matrix, group_gramians, group_names

PyTree = Any

__all__ = [
    "RECON_BINS",
    "ConflictState",
    "ConflictTracker",
    "conflict_incidence",
    "cosine_histogram",
    "magnitude_similarity",
    "mean_pairwise_cosine",
    "pair_bin_one_hot",
    "pair_indices",
    "pairwise_cosines",
]

#: Recon's cosine bin edges (descending) on Multi-Fashion+MNIST (Table 6). Bin b holds
#: ``edges[b + 1] <= cos < edges[b]``, the first bin also ``cos = 1``.
RECON_BINS: tuple[float, ...] = (1.0, 0.0, -0.01, -0.02, -0.03, -1.0)


def pair_indices(num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the pairs ``i < j`` (static NumPy arrays)."""
    return np.triu_indices(num_tasks, k=1)


def pairwise_cosines(gram: jax.Array) -> jax.Array:
    """``cos(g_i, g_j)`` for the pairs ``i < j``, as a vector ``[K (K - 1) / 2]``."""
    rows, cols = pair_indices(gram.shape[0])
    return cosine_matrix(gram)[rows, cols]


def conflict_incidence(gram: jax.Array, threshold: float = 0.0) -> jax.Array:
    """p% = 100 x (number of pairs i < j with ``cos < threshold``) / C(K, 2); 0 when K = 1."""
    cos = pairwise_cosines(gram)
    if cos.shape[0] == 0:
        return jnp.zeros((), gram.dtype)
    return 100.0 * jnp.mean((cos < threshold).astype(gram.dtype))


def mean_pairwise_cosine(gram: jax.Array) -> jax.Array:
    """The mean cosine over the pairs i < j; 0 when K = 1."""
    cos = pairwise_cosines(gram)
    return jnp.mean(cos) if cos.shape[0] else jnp.zeros((), gram.dtype)


def cosine_histogram(cos: jax.Array, edges: Sequence[float] = RECON_BINS) -> jax.Array:
    """Counts of ``cos`` values per bin; ``edges`` descending from 1 to -1.

    Bin b holds ``edges[b + 1] <= x < edges[b]``; the top bin also holds ``x = edges[0]``, so
    every value in ``[edges[-1], edges[0]]`` is counted exactly once.
    """
    return jnp.sum(pair_bin_one_hot(cos, edges), axis=0, dtype=jnp.int32)


def pair_bin_one_hot(cos: jax.Array, edges: Sequence[float] = RECON_BINS) -> jax.Array:
    """``int32[len(cos), nbins]``: row p is the one-hot bin of ``cos[p]`` (bins of
    :func:`cosine_histogram`, first bin = highest cosines)."""
    desc = np.asarray(edges, dtype=np.float64)
    if desc.ndim != 1 or desc.shape[0] < 2 or np.any(np.diff(desc) >= 0):
        raise ValueError(
            f"Histogram edges must be strictly descending, with >= 2 values; got {edges}."
        )
    asc = jnp.asarray(desc[::-1], dtype=cos.dtype)  # ascending
    nbins = desc.shape[0] - 1
    # ascending bin index a holds asc[a] <= x < asc[a+1]; the last also holds x == asc[-1]
    a = jnp.clip(jnp.searchsorted(asc, cos, side="right") - 1, 0, nbins - 1)
    return jax.nn.one_hot(nbins - 1 - a, nbins, dtype=jnp.int32)


def magnitude_similarity(gram: jax.Array) -> jax.Array:
    """Gradient-magnitude similarity ``2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2)`` (Yu et al. 2020)."""
    sq = jnp.clip(jnp.diagonal(gram), 0.0)
    num = 2.0 * jnp.sqrt(sq[:, None] * sq[None, :])
    den = sq[:, None] + sq[None, :]
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)


class ConflictState(NamedTuple):
    """Accumulated conflict statistics; every field is ``{group: value}`` except ``steps``.

    Attributes:
      steps: number of updates.
      severe: Recon's S-conflict score: (step, pair) events with ``cos < severity``.
      conflicts: (step, pair) events with ``cos < threshold`` (for the mean incidence).
      histogram: cumulative counts per cosine bin, ``int32[len(edges) - 1]``.
      last_incidence: p% of the last step.
      last_mean_cos: mean pairwise cosine of the last step.
      pair_cos_sum: per pair ``i < j`` (order of :func:`pair_indices`), the sum over steps of
        ``cos(g_i, g_j)``, ``float[C(K, 2)]``; divided by ``steps`` it is the pair's mean cosine
        over training (:meth:`ConflictTracker.mean_pair_cosines`).
      pair_histogram: per pair, cumulative counts per cosine bin, ``int32[C(K, 2), nbins]``
        (row p sums to ``steps``); summed over pairs it is ``histogram``. With one task (no
        pairs) both per-pair fields are empty dicts (checkpointers refuse zero-size arrays).
        Kept for ``"global"`` only unless the tracker's ``pair_groups`` is ``"all"``.
    """

    steps: jax.Array
    severe: dict[str, jax.Array]
    conflicts: dict[str, jax.Array]
    histogram: dict[str, jax.Array]
    last_incidence: dict[str, jax.Array]
    last_mean_cos: dict[str, jax.Array]
    pair_cos_sum: dict[str, jax.Array]
    pair_histogram: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ConflictTracker:
    """Accumulates conflict statistics per parameter group (and for all parameters, ``"global"``).

    Example (Recon's search run)::

      tracker = mtl.ConflictTracker(num_tasks=2, granularity=mtl.gramian.by_module, severity=-0.1)
      cstate = tracker.init(params)
      ...  # inside the jitted step:
      cstate = tracker.update(cstate, jac)
      ...
      ranking = tracker.ranking(cstate)          # groups by descending S-conflict score

    Attributes:
      granularity: parameter groups (``"global"``, ``"leaf"`` or ``path -> group``). The global
        statistics are always tracked too, from the sum of the group Gram matrices.
      severity: Recon's S in (-1, 0]; a (step, pair) event counts when ``cos < S`` (strict).
      threshold: the conflict threshold of the incidence p% (0: the sparse-training paper).
      edges: histogram bin edges, descending (default: Recon's bins).
      num_tasks: K (the number of pairs is C(K, 2)).
      pair_groups: where the per-pair statistics (``pair_cos_sum``, ``pair_histogram``) are
        kept: ``"global"`` (default; C(K, 2) values, small logs) or ``"all"`` (every group too;
        C(K, 2) x groups, e.g. 780 pairs x 42 groups x 5 bins for 40 tasks on ResNet-18).
    """

    num_tasks: int
    granularity: Granularity = GLOBAL
    severity: float = 0.0
    threshold: float = 0.0
    edges: tuple[float, ...] = RECON_BINS
    pair_groups: str = "global"

    def __post_init__(self) -> None:
        if self.num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1; got {self.num_tasks}.")
        if self.pair_groups not in ("global", "all"):
            raise ValueError(
                f"pair_groups must be 'global' (per-pair statistics of the whole parameter set "
                f"only) or 'all' (also per group); got {self.pair_groups!r}."
            )
        if not -1.0 < self.severity <= 0.0:
            raise ValueError(f"Recon's severity S must be in (-1, 0]; got {self.severity}.")

    @property
    def num_pairs(self) -> int:
        return self.num_tasks * (self.num_tasks - 1) // 2

    def groups(self, params: PyTree) -> list[str]:
        names = group_names(params, self.granularity)
        return names if names == [GLOBAL] else [GLOBAL, *names]

    def init(self, params: PyTree) -> ConflictState:
        groups = self.groups(params)
        paired = (groups if self.pair_groups == "all" else [GLOBAL]) if self.num_pairs else []
        zeros = {g: jnp.zeros((), jnp.int32) for g in groups}
        nbins = len(self.edges) - 1
        dtype = jnp.zeros(()).dtype
        return ConflictState(
            steps=jnp.zeros((), jnp.int32),
            severe=dict(zeros),
            conflicts=dict(zeros),
            histogram={g: jnp.zeros((nbins,), jnp.int32) for g in groups},
            last_incidence={g: jnp.zeros((), dtype) for g in groups},
            last_mean_cos={g: jnp.zeros((), dtype) for g in groups},
            # no pairs (K = 1): empty dicts, since checkpointers refuse zero-size arrays
            pair_cos_sum={g: jnp.zeros((self.num_pairs,), dtype) for g in paired},
            pair_histogram={g: jnp.zeros((self.num_pairs, nbins), jnp.int32) for g in paired},
        )

    def grams(self, jac: PyTree) -> dict[str, jax.Array]:
        """``{"global": G, group: G_group, ...}`` for a task Jacobian."""
        grams = group_gramians(jac, self.granularity)
        if set(grams) == {GLOBAL}:
            return grams
        total = None
        for G in grams.values():
            total = G if total is None else total + G
        return {GLOBAL: total, **grams}

    def update(self, state: ConflictState, jac: PyTree) -> ConflictState:
        """Adds one step's statistics computed from the task Jacobian."""
        return self.update_from_grams(state, self.grams(jac))

    def update_from_grams(self, state: ConflictState, grams: dict[str, jax.Array]) -> ConflictState:
        """Adds one step's statistics from ``{group: G[K, K]}`` (keys as in :meth:`init`)."""
        missing = set(state.severe) - set(grams)
        if missing:
            raise ValueError(f"Gram matrices missing for tracked groups {sorted(missing)}.")
        severe, conflicts, hist, inc, mean_cos, pair_sum, pair_hist = ({} for _ in range(7))
        for group in state.severe:
            G = grams[group]
            if G.shape != (self.num_tasks, self.num_tasks):
                raise ValueError(
                    f"Gram matrix of group {group!r} has shape {G.shape}; the tracker expects "
                    f"K={self.num_tasks} tasks."
                )
            cos = pairwise_cosines(G)
            severe[group] = state.severe[group] + jnp.sum(cos < self.severity).astype(jnp.int32)
            conflicts[group] = state.conflicts[group] + jnp.sum(cos < self.threshold).astype(
                jnp.int32
            )
            hist[group] = state.histogram[group] + cosine_histogram(cos, self.edges)
            inc[group] = conflict_incidence(G, self.threshold).astype(
                state.last_incidence[group].dtype
            )
            mean_cos[group] = mean_pairwise_cosine(G).astype(state.last_mean_cos[group].dtype)
            if group in state.pair_cos_sum:
                pair_sum[group] = state.pair_cos_sum[group] + cos.astype(
                    state.pair_cos_sum[group].dtype
                )
                pair_hist[group] = state.pair_histogram[group] + pair_bin_one_hot(cos, self.edges)
        return ConflictState(
            state.steps + 1, severe, conflicts, hist, inc, mean_cos, pair_sum, pair_hist
        )

    def mean_incidence(self, state: ConflictState) -> dict[str, jax.Array]:
        """Mean p% over the tracked steps, per group (0 before any step or when K = 1)."""
        denom = state.steps * self.num_pairs
        return {
            g: jnp.where(denom > 0, 100.0 * c / jnp.maximum(denom, 1), 0.0)
            for g, c in state.conflicts.items()
        }

    def mean_pair_cosines(self, state: ConflictState) -> dict[str, jax.Array]:
        """Mean cosine over the tracked steps per pair ``i < j``: ``{group: [C(K, 2)]}`` (0 before
        any step; ``{}`` with one task)."""
        steps = jnp.maximum(state.steps, 1)
        return {g: s / steps.astype(s.dtype) for g, s in state.pair_cos_sum.items()}

    def s_scores(self, state: ConflictState) -> dict[str, int]:
        """Recon's S-conflict score per group (host-side ints), excluding ``"global"``."""
        scores = {g: int(v) for g, v in state.severe.items() if g != GLOBAL}
        return scores or {GLOBAL: int(state.severe[GLOBAL])}

    def ranking(self, state: ConflictState) -> list[tuple[str, int]]:
        """Groups sorted by descending S-conflict score (ties: the order of the parameters)."""
        scores = self.s_scores(state)
        order = {g: i for i, g in enumerate(scores)}
        return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))
