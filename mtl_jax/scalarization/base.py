"""The loss-only interface, :class:`Scalarizer`, and the helpers its methods share.

A loss-only method combines the K task losses into one scalar before one ordinary backward pass:
``init(num_tasks) -> state``; ``scalarize(losses, state, *, grad_norms=None) -> (loss, weights,
new_state)`` with ``losses: f32[K]`` and ``d loss / d theta = sum_k weights[k] d L_k / d theta``
(``new_state`` from the loss values only); ``post_step(state, new_losses) -> state`` after the
optimizer step (FAMO only; a no-op for the others). All three are pure and jit-able; non-finite
losses give a NaN loss and leave the state unchanged. The train step and the story of the
learnable weights: ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "PyTree",
    "ScalarizeFn",
    "Scalarizer",
    "check_losses",
    "check_num_tasks",
    "float_dtype",
    "from_value",
    "keep_if_finite",
    "no_post_step",
    "preference",
    "safe_norm",
    "weighted_sum",
]

PyTree = Any
ScalarizeFn = Callable[..., tuple[jax.Array, jax.Array, PyTree]]


class Scalarizer(NamedTuple):
    """A loss-only method: ``init``, ``scalarize`` and ``post_step`` (see the module docstring)."""

    init: Callable[[int], PyTree]
    scalarize: ScalarizeFn
    post_step: Callable[[PyTree, jax.Array], PyTree]


def float_dtype() -> jnp.dtype:
    """float32, or float64 under ``jax_enable_x64``: the dtype of a fresh state."""
    return jnp.zeros(()).dtype


def no_post_step(state: PyTree, new_losses: jax.Array) -> PyTree:
    """The ``post_step`` of every method but FAMO: the state unchanged."""
    del new_losses
    return state


def check_num_tasks(num_tasks: Any, method: str) -> int:
    """``num_tasks`` as an int >= 1, or a ``ValueError`` naming ``method``."""
    if num_tasks is None or int(num_tasks) != num_tasks or num_tasks < 1:
        raise ValueError(f"{method}: init needs the number of tasks K >= 1; got {num_tasks!r}.")
    return int(num_tasks)


def check_losses(losses: Any, num_tasks: int | None, method: str) -> jax.Array:
    """``losses`` as a vector ``[K]`` (``K = num_tasks`` when given), or a ``ValueError``."""
    shape = jnp.shape(losses)
    if len(shape) != 1:
        raise ValueError(f"{method}: losses must be a vector f32[K]; got shape {shape}.")
    if num_tasks is not None and shape[0] != num_tasks:
        raise ValueError(
            f"{method}: losses has {shape[0]} entries but the state was made for K={num_tasks}."
        )
    return jnp.asarray(losses)


def keep_if_finite(losses: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where every entry of ``losses: [K]`` is finite, else ``old`` (leaf by leaf)."""
    finite = jnp.all(jnp.isfinite(losses))
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def weighted_sum(losses: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_k w_k L_k`` with ``w: [K]`` a constant of the backward pass."""
    return jnp.sum(jax.lax.stop_gradient(weights).astype(losses.dtype) * losses)


def preference(pref_vector: Sequence[float] | None, k: int, dtype: Any, method: str) -> jax.Array:
    """The preference vector ``[K]`` of a preference-based method: ``pref_vector`` (checked:
    length K, non-negative, not all zero) or the uniform ``1/K``."""
    if pref_vector is None:
        return jnp.full(k, 1.0 / k, dtype)
    pref = np.asarray(pref_vector, dtype=float)
    if pref.shape != (k,):
        raise ValueError(f"{method}: pref_vector has shape {pref.shape}; expected ({k},).")
    if np.any(pref < 0) or not np.any(pref > 0):
        raise ValueError(
            f"{method}: pref_vector must be non-negative and not all zero; got {pref.tolist()}."
        )
    return jnp.asarray(pref, dtype)


def safe_norm(x: jax.Array) -> jax.Array:
    """``|x|`` with gradient 0 at ``x = 0`` (``jnp.linalg.norm``'s is NaN there)."""
    sq = jnp.sum(x * x)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def from_value(
    method: str, value: Callable[[jax.Array], jax.Array], check_k: Callable[[int], None]
) -> Scalarizer:
    """A stateless scalarisation ``loss = value(L)`` whose weights are ``d value / d L``
    (``jax.grad``, exact); ``check_k(K)`` checks the method's per-task settings at ``init``."""

    def init(num_tasks: int) -> optax.EmptyState:
        check_k(check_num_tasks(num_tasks, method))
        return optax.EmptyState()

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, None, method)
        weights = jax.grad(value)(jax.lax.stop_gradient(losses))
        return value(losses), weights, state

    return Scalarizer(init, scalarize, no_post_step)
