"""Multi-MNIST-style composites: two items overlaid on one canvas, one top-left, one bottom-right.

The construction of Sener & Koltun (2018) and Lin et al. (2019, Pareto MTL): an item of size
``S x S`` is drawn at the top-left corner of a ``C x C`` canvas and another at the bottom-right
corner, each moved towards the centre by an independent random shift of ``0 .. max_shift`` pixels
per axis; where they overlap the canvas keeps the brighter pixel (``max``). For MNIST,
``S = 28``, ``C = 36`` and ``max_shift = 4``. Task 1 (``"left"``) classifies the top-left item,
task 2 (``"right"``) the bottom-right one.

A :class:`PairPlan` fixes which items and which shifts every composite uses, from a seed alone,
so a composite can be drawn lazily, on demand, and identically in every run.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["PairPlan", "compose", "make_pair_plan"]


@dataclasses.dataclass(frozen=True)
class PairPlan:
    """Which items and shifts each of N composites uses.

    Attributes:
      left: ``int64[N]`` index of the top-left item in its pool.
      right: ``int64[N]`` index of the bottom-right item in its pool.
      left_shift: ``int64[N, 2]`` ``(dy, dx)`` shift of the top-left item (down, right).
      right_shift: ``int64[N, 2]`` ``(dy, dx)`` shift of the bottom-right item (up, left).
    """

    left: np.ndarray
    right: np.ndarray
    left_shift: np.ndarray
    right_shift: np.ndarray

    def __len__(self) -> int:
        return len(self.left)


def make_pair_plan(
    num: int, left_pool: int, right_pool: int, max_shift: int, seed: int
) -> PairPlan:
    """Draws ``num`` composites: items uniformly (with replacement) from the pools, and shifts.

    Args:
      num: number of composites.
      left_pool: number of items available for the top-left slot.
      right_pool: number of items available for the bottom-right slot.
      max_shift: largest shift in pixels along each axis (uniform in ``0 .. max_shift``).
      seed: the same seed gives the same plan.
    """
    if num < 0 or left_pool < 1 or right_pool < 1 or max_shift < 0:
        raise ValueError(
            f"make_pair_plan needs num >= 0, non-empty pools and max_shift >= 0; got num={num}, "
            f"left_pool={left_pool}, right_pool={right_pool}, max_shift={max_shift}."
        )
    rng = np.random.default_rng(seed)
    return PairPlan(
        left=rng.integers(0, left_pool, size=num),
        right=rng.integers(0, right_pool, size=num),
        left_shift=rng.integers(0, max_shift + 1, size=(num, 2)),
        right_shift=rng.integers(0, max_shift + 1, size=(num, 2)),
    )


def compose(
    left: np.ndarray,
    right: np.ndarray,
    left_shift: np.ndarray,
    right_shift: np.ndarray,
    canvas_size: int,
) -> np.ndarray:
    """Overlays ``left`` near the top-left and ``right`` near the bottom-right corner.

    Args:
      left: ``[S, S, C]`` item (any dtype; ``max`` combines the overlap).
      right: ``[S, S, C]`` item of the same shape and dtype.
      left_shift: ``(dy, dx)``: the left item's top-left corner is at ``(dy, dx)``.
      right_shift: ``(dy, dx)``: the right item's bottom-right corner is ``(dy, dx)`` pixels
        above and left of the canvas's bottom-right corner.
      canvas_size: ``C``; must satisfy ``S + shift <= C`` for both items.

    Returns:
      ``[C, C, channels]`` canvas of ``left``'s dtype, zero where neither item is drawn.
    """
    if left.shape != right.shape or left.ndim != 3 or left.shape[0] != left.shape[1]:
        raise ValueError(
            f"compose needs two square [S, S, C] items of equal shape; got {left.shape} and "
            f"{right.shape}."
        )
    size = left.shape[0]
    ly, lx = (int(v) for v in left_shift)
    ry, rx = (int(canvas_size - size - v) for v in right_shift)
    if min(ly, lx, ry, rx) < 0 or max(ly, lx) + size > canvas_size:
        raise ValueError(
            f"Items of size {size} shifted by {tuple(left_shift)} / {tuple(right_shift)} do not "
            f"fit a {canvas_size}x{canvas_size} canvas."
        )
    canvas = np.zeros((canvas_size, canvas_size, left.shape[2]), dtype=left.dtype)
    canvas[ly : ly + size, lx : lx + size] = left
    region = canvas[ry : ry + size, rx : rx + size]
    np.maximum(region, right, out=region)
    return canvas
