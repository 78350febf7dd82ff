"""CoNAL reports: the learned tree as a PNG, the alpha trajectory, and a markdown section.

The library (:mod:`mtl_jax.conal`) does not depend on matplotlib; the drawing lives here.

* :func:`draw_architecture`: the trunk (shared blocks) on the top lane, one lane per branch (a
  task, or a CoNAL-Pro task group) starting where it leaves the trunk, task names at the end of
  their lane.
* :func:`plot_alpha_trajectory`: the softmax of every task's architecture logits over the search
  (the ``alpha_softmax`` metric of :func:`mtl_jax.conal.make_search`'s step, logged per step).
* :func:`architecture_section`: a markdown section (table per task, parameter counts, the text
  description, the image link) for ``report.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyBboxPatch

from mtl_jax import conal

__all__ = ["architecture_section", "as_architecture", "draw_architecture", "plot_alpha_trajectory"]

_TRUNK_COLOR = "#4c72b0"
_BRANCH_COLORS = ("#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def as_architecture(
    branch_points: conal.Architecture | Sequence[int],
    num_blocks: int,
    grouped: bool = False,
    group_labels: Sequence[int] | None = None,
) -> conal.Architecture:
    """An :class:`~mtl_jax.conal.Architecture` from itself or from per-task branch points."""
    if isinstance(branch_points, conal.Architecture):
        return branch_points
    labels = None if group_labels is None else tuple(group_labels)
    return conal.Architecture(tuple(branch_points), num_blocks, grouped, labels)


def _box(ax, x: float, y: float, text: str, color: str) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x - 0.38, y - 0.28),
            0.76,
            0.56,
            boxstyle="round,pad=0.02",
            facecolor=color,
            edgecolor="black",
            linewidth=0.8,
            alpha=0.9,
        )
    )
    ax.text(x, y, text, ha="center", va="center", fontsize=8, color="white")


def draw_architecture(
    branch_points: conal.Architecture | Sequence[int],
    block_names: Sequence[str],
    task_names: Sequence[str],
    path: str,
    *,
    grouped: bool = False,
    group_labels: Sequence[int] | None = None,
    title: str | None = None,
) -> str:
    """Draws the tree architecture to ``path`` (PNG) and returns ``path``.

    Args:
      branch_points: an :class:`~mtl_jax.conal.Architecture`, or per-task branch points
        (``0..B``, the number of shared blocks; ``B`` = fully shared).
      block_names: the B block names, input to output.
      task_names: the K task names.
      path: output file.
      grouped, group_labels: CoNAL-Pro task groups (ignored when an Architecture is given).
      title: optional figure title.
    """
    nb = len(block_names)
    arch = as_architecture(branch_points, nb, grouped, group_labels)
    if arch.num_blocks != nb or arch.num_tasks != len(task_names):
        raise ValueError(
            f"draw_architecture: {len(block_names)} block names and {len(task_names)} task names "
            f"for an architecture of {arch.num_blocks} blocks and {arch.num_tasks} tasks."
        )
    branches = arch.branches()
    lanes = 1 + len(branches)
    fig, ax = plt.subplots(figsize=(1.3 * (nb + 3), 0.75 * lanes + 1.0))
    ax.text(-0.9, 0, "input", ha="right", va="center", fontsize=9)
    ax.plot([-0.85, -0.4], [0, 0], color="black", linewidth=1)
    for b in range(arch.trunk_depth):
        _box(ax, b, 0, block_names[b], _TRUNK_COLOR)
        if b > 0:
            ax.plot([b - 0.62, b - 0.38], [0, 0], color="black", linewidth=1)
    trunk_tasks = [task_names[t] for t, p in enumerate(arch.branch_points) if p == nb]
    if trunk_tasks:
        ax.text(nb - 0.4, 0, "  " + ", ".join(trunk_tasks), ha="left", va="center", fontsize=9)
    for c, (p, tasks) in enumerate(branches):
        y = -(c + 1)
        color = _BRANCH_COLORS[c % len(_BRANCH_COLORS)]
        # the branch leaves the trunk after block p - 1 (at the input when p = 0)
        x0 = p - 0.5 if p > 0 else -0.6
        ax.plot([x0, x0, p - 0.38], [0, y, y], color="black", linewidth=1)
        for b in range(p, nb):
            _box(ax, b, y, block_names[b], color)
            if b > p:
                ax.plot([b - 0.62, b - 0.38], [y, y], color="black", linewidth=1)
        label = ", ".join(task_names[t] for t in tasks)
        ax.text(nb - 0.4, y, "  " + label, ha="left", va="center", fontsize=9)
    ax.set_xlim(-1.6, nb + 1.6)
    ax.set_ylim(-lanes + 0.4, 0.6)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_alpha_trajectory(
    alpha_softmax: Any, task_names: Sequence[str], path: str, steps: Sequence[int] | None = None
) -> str:
    """Plots ``alpha_softmax [T, K, P]`` (one panel per task, one curve per branch point)."""
    a = np.asarray(alpha_softmax)
    if a.ndim != 3 or a.shape[1] != len(task_names):
        raise ValueError(
            f"alpha_softmax must be [T, K, P] with K = {len(task_names)}; got {a.shape}."
        )
    x = np.arange(a.shape[0]) if steps is None else np.asarray(steps)
    k, p = a.shape[1], a.shape[2]
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 2.8), squeeze=False)
    for t, ax in enumerate(axes[0]):
        for q in range(p):
            ax.plot(x, a[:, t, q], label=f"p={q}" + (" (shared)" if q == p - 1 else ""))
        ax.set_title(task_names[t], fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("softmax(alpha)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def architecture_section(
    branch_points: conal.Architecture | Sequence[int],
    block_names: Sequence[str],
    task_names: Sequence[str],
    block_sizes: Sequence[int],
    *,
    alpha_softmax: Any = None,
    image: str | None = None,
    heading: str = "## Learned architecture",
    grouped: bool = False,
    group_labels: Sequence[int] | None = None,
) -> str:
    """A markdown section describing the learned architecture.

    Args:
      branch_points: an Architecture or per-task branch points.
      block_names, task_names: names for the table.
      block_sizes: parameters of one copy of each block
        (:func:`mtl_jax.conal.block_param_counts`).
      alpha_softmax: optional final ``[K, P]`` softmax, shown per task.
      image: optional relative path of the PNG from :func:`draw_architecture`.
      heading: the section heading.
    """
    arch = as_architecture(branch_points, len(block_names), grouped, group_labels)
    counts = conal.param_counts(block_sizes, arch)
    lines = [heading, ""]
    header = "| task | branch point | shared blocks | own / group blocks |"
    sep = "|---|---|---|---|"
    if alpha_softmax is not None:
        header += " softmax(alpha) |"
        sep += "---|"
    lines += [header, sep]
    weights = None if alpha_softmax is None else np.asarray(alpha_softmax)
    for t, p in enumerate(arch.branch_points):
        row = (
            f"| {task_names[t]} | {p} | {', '.join(block_names[:p]) or '-'} | "
            f"{', '.join(block_names[p:]) or '-'} |"
        )
        if weights is not None:
            row += " " + ", ".join(f"{v:.2f}" for v in weights[t]) + " |"
        lines.append(row)
    lines += [
        "",
        f"Encoder parameters: learned {counts['learned']:,}, all-shared {counts['all_shared']:,}, "
        f"all-private {counts['all_private']:,} "
        f"({counts['learned'] / counts['all_shared']:.2f}x the all-shared encoder).",
        "",
        "```",
        conal.architecture_text(arch, block_names, task_names),
        "```",
    ]
    if image:
        lines += ["", f"![architecture]({image})"]
    return "\n".join(lines) + "\n"
