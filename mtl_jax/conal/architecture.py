"""A discrete CoNAL architecture: discretise the search, count parameters, describe it.

:func:`discretise` takes the argmax branch point of every task (ties toward sharing by default;
the official code's ``argmax`` takes the earliest). :class:`Architecture` is the tree: a trunk of
``max(branch_points)`` blocks and one branch per task (CoNAL) or per task group (CoNAL-Pro,
``grouped=True``). :func:`param_counts` gives the encoder sizes of the learned, all-shared and
all-private models, :func:`architecture_text` a readable description. See
``docs/recipes/conal.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .blocks import PyTree

__all__ = [
    "Architecture",
    "architecture_text",
    "block_param_counts",
    "discretise",
    "param_counts",
]


def discretise(alpha: Any, candidates: Any = None, *, tie_break: str = "shared") -> tuple[int, ...]:
    """The branch point ``argmax_p alpha[k, p]`` of every task (0-based: number of shared blocks).

    Args:
      alpha: ``[K, P]`` logits (or softmax weights: same argmax).
      candidates: optional ``bool[K, P]``; only candidates are considered.
      tie_break: among exactly tied maxima, ``"shared"`` takes the deepest branch point (more
        sharing, fewer parameters; our default) and ``"private"`` the earliest (``np.argmax``,
        what the official code's ``argmax`` does).

    Returns:
      A tuple of K Python ints in ``0..P-1``.
    """
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"alpha must be [K, P]; got shape {a.shape}.")
    if candidates is not None:
        a = np.where(np.asarray(candidates, bool), a, -np.inf)
    if not np.all(np.isfinite(a.max(axis=1))):
        raise ValueError("discretise: a task has no finite candidate logit (NaN alpha?).")
    if tie_break == "private":
        return tuple(int(i) for i in np.argmax(a, axis=1))
    if tie_break == "shared":
        return tuple(int(a.shape[1] - 1 - i) for i in np.argmax(a[:, ::-1], axis=1))
    raise ValueError(f"tie_break must be 'shared' or 'private'; got {tie_break!r}.")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A discrete tree architecture: the trunk plus one branch per task or per task group.

    Attributes:
      branch_points: per task, ``0..num_blocks`` (number of shared trunk blocks before its
        branch; ``num_blocks`` = fully shared).
      num_blocks: B.
      grouped: ``False`` (CoNAL): every task with ``p < B`` has its own copies of blocks
        ``p..B-1``. ``True`` (CoNAL-Pro): tasks with the same branch point (and the same
        ``group_labels`` entry) share one partially-specific copy of those blocks.
      group_labels: optional per-task labels splitting the tasks of one branch point into
        several groups (``grouped=True`` only); ``None``: one group per branch point.
    """

    branch_points: tuple[int, ...]
    num_blocks: int
    grouped: bool = False
    group_labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        bps = tuple(int(p) for p in self.branch_points)
        object.__setattr__(self, "branch_points", bps)
        if not bps:
            raise ValueError("Architecture needs at least one task.")
        bad = [p for p in bps if not 0 <= p <= self.num_blocks]
        if bad:
            raise ValueError(
                f"Branch points must lie in 0..{self.num_blocks} (num_blocks); got {list(bps)}."
            )
        if self.group_labels is not None:
            labels = tuple(int(g) for g in self.group_labels)
            object.__setattr__(self, "group_labels", labels)
            if len(labels) != len(bps):
                raise ValueError(
                    f"group_labels has {len(labels)} entries for {len(bps)} tasks (one per task)."
                )

    @property
    def num_tasks(self) -> int:
        return len(self.branch_points)

    @property
    def trunk_depth(self) -> int:
        """Number of trunk blocks that are computed: ``max(branch_points)``."""
        return max(self.branch_points)

    def branches(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """``(branch point, tasks)`` of every non-trunk branch, ordered by branch point, then task."""
        bps = self.branch_points
        if self.grouped:
            labels = self.group_labels or (0,) * len(bps)
            keys = sorted({(p, g) for p, g in zip(bps, labels, strict=True) if p < self.num_blocks})
            return tuple(
                (p, tuple(t for t in range(len(bps)) if (bps[t], labels[t]) == (p, g)))
                for p, g in keys
            )
        order = sorted((p, t) for t, p in enumerate(bps) if p < self.num_blocks)
        return tuple((p, (t,)) for p, t in order)

    def active(self, block: int) -> list[int]:
        """Indices (into :meth:`branches`) of the branches that have a copy of ``block``."""
        return [c for c, (p, _) in enumerate(self.branches()) if p <= block]


def _size(tree: PyTree) -> int:
    return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))


def block_param_counts(supernet_params: dict[str, Any]) -> list[int]:
    """Parameters of one copy of every block (from the supernet's shared blocks)."""
    return [_size(p) for p in supernet_params["shared"]]


def param_counts(block_sizes: Sequence[int], arch: Architecture) -> dict[str, int]:
    """Encoder parameter counts: the learned architecture, all-shared, all-private (heads excluded).

    ``learned = sum_{b < trunk_depth} n_b + sum_branches sum_{b >= p} n_b``.
    """
    if len(block_sizes) != arch.num_blocks:
        raise ValueError(f"{len(block_sizes)} block sizes for {arch.num_blocks} blocks.")
    n = [int(v) for v in block_sizes]
    trunk = sum(n[: arch.trunk_depth])
    copies = sum(sum(n[p:]) for p, _ in arch.branches())
    return {
        "learned": trunk + copies,
        "all_shared": sum(n),
        "all_private": arch.num_tasks * sum(n),
    }


def architecture_text(
    arch: Architecture,
    block_names: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
) -> str:
    """A readable description: per task, its shared and its own (or group's) blocks."""
    names = list(block_names or [f"block{b}" for b in range(arch.num_blocks)])
    tasks = list(task_names or [f"task{t}" for t in range(arch.num_tasks)])
    if len(names) != arch.num_blocks or len(tasks) != arch.num_tasks:
        raise ValueError(
            f"architecture_text: {len(names)} block names for {arch.num_blocks} blocks, "
            f"{len(tasks)} task names for {arch.num_tasks} tasks."
        )
    width = max(len(t) for t in tasks)
    lines = []
    for t, p in enumerate(arch.branch_points):
        shared = ", ".join(names[:p]) or "-"
        own = ", ".join(names[p:]) or "-"
        group = next((ts for q, ts in arch.branches() if q == p and t in ts), (t,))
        kind = "group " + "+".join(tasks[u] for u in group) if len(group) > 1 else "own"
        lines.append(f"{tasks[t]:<{width}}  branch point {p}: shared [{shared}] | {kind} [{own}]")
    return "\n".join(lines)
