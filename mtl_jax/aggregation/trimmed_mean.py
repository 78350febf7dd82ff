"""TrimmedMean (Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018, Definition 2), on the parameter Jacobian.

Not a Gram-space method: every coordinate of the update is the mean of that coordinate over the K
task gradients after its ``trim_number`` largest and ``trim_number`` smallest values are removed
(the paper's ``beta``-trimmed mean with ``beta = trim_number / K``):
``d_j = mean(sort_k(g_kj)[b : K - b])``. Hyper-parameter and check as TorchJD's
``TrimmedMean(trim_number)``: K must be at least ``2 trim_number + 1``. Departure: ``trim_number``
defaults to 1 (TorchJD has no default; 0 is the plain mean). Stateless (``optax.EmptyState``, no
logged weights: the weights differ per coordinate); non-finite input gives an all-NaN update.
See ``docs/methods.md``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax import _tree

from ._checks import leaves_finite, map_unmasked, validate_jacobian

__all__ = ["check_trim_tasks", "trimmed_mean", "trimmed_mean_leaf"]

PyTree = Any
Transform = optax.GradientTransformationExtraArgs


def check_trim_tasks(num_tasks: int, trim_number: int) -> None:
    """TorchJD's check: ``K >= 2 trim_number + 1`` (one value left per coordinate)."""
    if num_tasks < 2 * trim_number + 1:
        raise ValueError(
            f"trimmed_mean with trim_number={trim_number} needs at least 2 * trim_number + 1 = "
            f"{2 * trim_number + 1} tasks; got K={num_tasks}. Lower trim_number."
        )


def trimmed_mean_leaf(leaf: jax.Array, trim_number: int) -> jax.Array:
    """``leaf: [K, ...] -> [...]``: per coordinate, the mean of the K values without the
    ``trim_number`` largest and smallest."""
    k = leaf.shape[0]
    kept = jnp.sort(leaf, axis=0)[trim_number : k - trim_number]
    return jnp.mean(kept, axis=0)


def trimmed_mean(trim_number: int = 1, *, num_tasks: int | None = None) -> Transform:
    """TrimmedMean (Yin et al. 2018): the coordinate-wise mean after removing the
    ``trim_number`` largest and smallest values of every coordinate over the tasks.

    Not a Gram-space method (it sorts each coordinate over the K rows). Needs
    ``K >= 2 trim_number + 1``; ``trim_number = 0`` is the mean.
    """
    if int(trim_number) != trim_number or trim_number < 0:
        raise ValueError(f"trimmed_mean's trim_number must be an integer >= 0; got {trim_number}.")
    trim = int(trim_number)
    if num_tasks is not None:
        check_trim_tasks(int(num_tasks), trim)

    def init(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(jac, state, params=None, *, task_losses=None, **extra_args):
        del extra_args
        k = validate_jacobian(jac, params, task_losses, num_tasks, "trimmed_mean")
        check_trim_tasks(k, trim)
        leaves = [leaf for _, leaf in _tree.leaves_with_paths(jac)]
        finite = leaves_finite(leaves, task_losses)

        def one(i: int, leaf: jax.Array) -> jax.Array:
            return jnp.where(finite, trimmed_mean_leaf(leaf, trim), jnp.nan)

        return map_unmasked(jac, one), state

    return optax.GradientTransformationExtraArgs(init, update)
