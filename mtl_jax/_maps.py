"""How K backward passes are mapped: one batched pass, K passes in the program, K in a loop.

Shared by the Jacobian paths (:mod:`mtl_jax.gradients`) and the Gramian engine's cotangent
pullbacks (:mod:`mtl_jax.autogram.engine`); ``docs/gradients.md`` has the measured trade-offs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["TASK_MAPS", "check_task_map", "map_pullback"]

#: ``"vmap"``: one batched pass; ``"unroll"``: K passes in the traced program; ``"scan"``: K
#: passes in a loop.
TASK_MAPS = ("vmap", "unroll", "scan")


def check_task_map(task_map: str, chunk_size: int | None) -> None:
    if task_map not in TASK_MAPS:
        raise ValueError(f"Unknown task_map {task_map!r}; choose from {TASK_MAPS}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size}.")
    if chunk_size is not None and task_map != "vmap":
        raise ValueError("chunk_size applies to task_map='vmap' only.")


def map_pullback(
    pullback: Callable, cotangents: PyTree, chunk_size: int | None, task_map: str = "vmap"
) -> PyTree:
    """``pullback`` applied to every row of ``cotangents`` (leading axis K).

    ``"vmap"``: one batched backward pass (chunks of ``chunk_size`` rows under ``lax.map``);
    ``"unroll"``: K separate passes in the traced program; ``"scan"``: K passes in a loop.
    """
    num = jax.tree.leaves(cotangents)[0].shape[0]
    if task_map == "unroll":
        rows = [pullback(jax.tree.map(lambda c, k=k: c[k], cotangents)) for k in range(num)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
    if task_map == "scan":
        return jax.lax.map(pullback, cotangents)
    if chunk_size is None or chunk_size >= num:
        return jax.vmap(pullback)(cotangents)
    return jax.lax.map(pullback, cotangents, batch_size=chunk_size)
