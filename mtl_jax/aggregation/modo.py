"""MoDo (Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning:
Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 / JMLR 2024, Algorithm 1),
a cross-batch aggregator.

Multi-objective gradient with double sampling: the weights take one projected gradient step on
``1/2 |J^T lambda|^2 + rho/2 |lambda|^2`` with the unbiased stochastic gradient from two
independent batches, ``lambda <- P(lambda - gamma (J_a J_b^T lambda + rho lambda))``, and the
update is ``d = J^T lambda`` with the new weights. ``lambda`` starts at ``1/K`` and is the state.
``P`` is the Euclidean projection onto the simplex (the paper and LibMTL's
``weighting/MoDo.py``, from the authors' code); ``weight_map="softmax"`` is TorchJD's choice.
Defaults ``gamma = 1e-3``, ``rho = 0.1`` as LibMTL.

Departures: the update combines the rows given to ``update`` (with
:func:`~mtl_jax.aggregation.value_and_paired_grads`: the whole batch, the mean of the two halves
whose cross matrix moved ``lambda``), where the paper and LibMTL draw a third independent batch
``z3`` for ``d`` (three forward/backward passes; LibMTL then divides the heads' summed gradient
by 3); a loop that wants that passes a third batch's rows as the rows and two others as
``paired_rows``. The step size ``gamma`` is constant (the paper's analysis allows a schedule).
Not homogeneous: ``gamma`` multiplies the raw cross matrix, so the weights move faster for
larger gradients (as in the paper). Non-finite input gives an all-NaN update and keeps
``lambda``. See ``docs/methods.md`` and ``docs/recipes/cross_batch.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._checks import float_dtype
from .cross_batch import cross_batch_transform, simplex_projection

__all__ = ["MODO_WEIGHT_MAPS", "MoDoState", "modo", "modo_weights"]

Transform = optax.GradientTransformationExtraArgs
MODO_WEIGHT_MAPS = ("simplex", "softmax")


class MoDoState(NamedTuple):
    """State of MoDo.

    Attributes:
      lambd: ``[K]`` the weights of the last update.
    """

    lambd: jax.Array


def modo_weights(
    cross: jax.Array, lambd: jax.Array, gamma: float, rho: float, weight_map: str
) -> jax.Array:
    """One MoDo step on the weights: ``P(lambd - gamma (cross lambd + rho lambd))`` with the
    cross-batch matrix ``cross = J_a J_b^T [K, K]``."""
    moved = lambd - gamma * (cross.astype(lambd.dtype) @ lambd + rho * lambd)
    return simplex_projection(moved) if weight_map == "simplex" else jax.nn.softmax(moved)


def modo(
    gamma: float = 1e-3,
    rho: float = 0.1,
    weight_map: str = "simplex",
    *,
    num_tasks: int | None = None,
) -> Transform:
    """MoDo (Chen et al. 2023): one projected step of the weights on the cross-batch matrix of
    ``paired_rows`` per update, ``d = J^T lambda`` (see the module docstring). Needs
    ``num_tasks`` and ``paired_rows=`` in ``update``.
    """
    if gamma < 0 or rho < 0:
        raise ValueError(f"modo's gamma and rho must be >= 0; got gamma={gamma}, rho={rho}.")
    if weight_map not in MODO_WEIGHT_MAPS:
        raise ValueError(f"Unknown modo weight_map {weight_map!r}; choose from {MODO_WEIGHT_MAPS}.")

    def init_inner(k: int) -> MoDoState:
        return MoDoState(jnp.full((k,), 1.0 / k, float_dtype()))

    def weigh(cross: jax.Array, inner: MoDoState) -> tuple[jax.Array, Any]:
        lambd = modo_weights(cross, inner.lambd, gamma, rho, weight_map)
        return lambd, MoDoState(lambd.astype(inner.lambd.dtype))

    return cross_batch_transform("modo", num_tasks, init_inner, weigh)
