"""The weighting interface: pure Gram-space solvers ``G[K, K] (+ state, key, losses) -> w[K]``.

A :class:`Weighting` is to an aggregator what an optax ``GradientTransformation`` is to an
optimizer: a pair of pure functions,

* ``init(num_tasks) -> state`` (``num_tasks`` may be ``None`` for weightings that keep no
  per-task state; those that do raise a clear error then), and
* ``weigh(gram, state, key, losses) -> (weights, state)`` with ``gram: [K, K]``, ``key``: a PRNG
  key (used by randomised methods), ``losses: [K]`` or ``None``.

``weigh`` must be jit-able, O(K^3) at most and independent of the number of parameters, and safe on
degenerate input: zero rows, rank deficiency, K = 1, scales from 1e-8 to 1e8 give finite weights.
:mod:`mtl_jax.aggregation` turns a weighting into an optax transform (global, per leaf or per group).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
WeighFn = Callable[[jax.Array, PyTree, jax.Array, jax.Array | None], tuple[jax.Array, PyTree]]


class EmptyState(NamedTuple):
    """The state of a weighting that keeps none."""


class Weighting(NamedTuple):
    """A Gram-space method: ``init(num_tasks) -> state``; ``weigh(G, state, key, losses)``."""

    init: Callable[[int | None], PyTree]
    weigh: WeighFn


def stateless(fn: Callable[[jax.Array], jax.Array]) -> Weighting:
    """Wraps a pure ``G[K, K] -> w[K]`` function as a :class:`Weighting`."""

    def weigh(gram: jax.Array, state: PyTree, key: jax.Array, losses: Any = None) -> Any:
        del key, losses
        return fn(gram), state

    return Weighting(init=lambda num_tasks: EmptyState(), weigh=weigh)


def stateless_random(fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Weighting:
    """Wraps a pure ``(G[K, K], key) -> w[K]`` function as a :class:`Weighting`."""

    def weigh(gram: jax.Array, state: PyTree, key: jax.Array, losses: Any = None) -> Any:
        del losses
        return fn(gram, key), state

    return Weighting(init=lambda num_tasks: EmptyState(), weigh=weigh)


def require_num_tasks(num_tasks: int | None, method: str, why: str) -> int:
    """For ``init`` of stateful weightings: a clear error when K is not known."""
    if num_tasks is None:
        raise ValueError(
            f"{method} keeps per-task state ({why}), so it needs the number of tasks at init: "
            f"pass num_tasks=K to the aggregator."
        )
    return int(num_tasks)


def diag_scale(gram: jax.Array) -> jax.Array:
    """``max_k G_kk`` (the largest squared task-gradient norm), 1 where all are zero."""
    scale = jnp.max(jnp.diagonal(gram))
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))
