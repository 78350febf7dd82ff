"""MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, Algorithm 1), an aggregator.

A tracked Jacobian ``Y`` corrects the bias of stochastic MGDA: with ``h_k = L_k g_k / (|g_k| +
1e-8)`` (LibMTL's normalisation), ``Y <- Y - beta_t (Y - H)`` (eq. 7), then the weights take one
gradient step on ``1/2 |Y^T lambda|^2 + rho/2 |lambda|^2``,
``lambda <- P(lambda - gamma_t (Y Y^T + rho I) lambda)`` (eq. 8), and ``d = Y^T lambda`` (eq. 9),
with ``beta_t = beta / t^beta_sigma``, ``gamma_t = gamma / t^gamma_sigma`` (step ``t`` from 1),
``Y = 0`` and ``lambda = 1/K`` at the start. Defaults (0.5, 0.5, 0.1, 0.5, 0) and the normalised
rows as LibMTL's ``weighting/MoCo.py`` (from the authors' code). ``P`` is LibMTL's softmax by
default (``weight_map="softmax"``); ``"simplex"`` is the paper's Euclidean projection onto the
simplex. One batch per step, as LibMTL (the paper's analysis uses an independent batch for Y).
Not a Gram-space method: the state keeps ``Y`` (as large as the Jacobian) and ``lambda``, so it
needs ``num_tasks``; the update reads ``task_losses``. The state is an
:class:`~mtl_jax.aggregation.gramspace.AggregatorState`: the logged weights are ``lambda`` (they
multiply the rows of ``Y``), the Gram matrix the current Jacobian's. Non-finite input gives an
all-NaN update and keeps the state. See ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.gramian import GLOBAL, group_gramians

from .tracked_rows import decayed_rate, scale_rows, tracked_rows_transform, zero_rows

__all__ = ["WEIGHT_MAPS", "MoCoState", "moco", "moco_step", "project_to_simplex"]

PyTree = Any
Transform = optax.GradientTransformationExtraArgs
EPS = 1e-8  # LibMTL's constant in g / (|g| + eps)
WEIGHT_MAPS = ("softmax", "simplex")


class MoCoState(NamedTuple):
    """State of MoCo.

    Attributes:
      y: one array per Jacobian leaf, ``[K, *param.shape]``: the tracked Jacobian ``Y``.
      lambd: ``[K]`` the weights of the rows of ``Y``.
      step: number of steps so far.
    """

    y: list[jax.Array]
    lambd: jax.Array
    step: jax.Array


def project_to_simplex(v: jax.Array) -> jax.Array:
    """The Euclidean projection of ``v[K]`` onto the probability simplex (sort-based;
    Held, Wolfe & Crowder 1974): ``max(v - tau, 0)`` with the threshold ``tau`` from the sorted
    entries."""
    k = v.shape[0]
    u = jnp.sort(v)[::-1]
    cumulative = jnp.cumsum(u) - 1.0
    index = jnp.arange(1, k + 1, dtype=v.dtype)
    support = u - cumulative / index > 0
    rho = jnp.max(jnp.where(support, jnp.arange(k), 0))
    tau = cumulative[rho] / (rho + 1).astype(v.dtype)
    return jnp.maximum(v - tau, 0.0)


def moco_step(
    leaves: Sequence[jax.Array],
    losses: jax.Array,
    norms: jax.Array,
    state: MoCoState,
    hyper: tuple[float, float, float, float, float],
    weight_map: str,
) -> MoCoState:
    """One MoCo step (Algorithm 1): the new ``Y``, ``lambda`` and step; ``d = Y^T lambda``.

    ``norms[K]``: the current task gradients' norms; ``hyper``: ``(beta, beta_sigma, gamma,
    gamma_sigma, rho)``.
    """
    beta, beta_sigma, gamma, gamma_sigma, rho = hyper
    dtype = state.lambd.dtype
    step = state.step + 1
    beta_t = decayed_rate(beta, beta_sigma, step, dtype)
    gamma_t = decayed_rate(gamma, gamma_sigma, step, dtype)
    scale = losses.astype(dtype) / (norms.astype(dtype) + EPS)  # h_k = L_k g_k / (|g_k| + eps)
    y = []
    for leaf, old in zip(leaves, state.y, strict=True):
        h = scale_rows(leaf, scale, old.dtype)
        y.append(old - beta_t * (old - h))
    yy = group_gramians(y, GLOBAL)[GLOBAL]
    k = yy.shape[0]
    moved = state.lambd - gamma_t * ((yy + rho * jnp.eye(k, dtype=dtype)) @ state.lambd)
    lambd = jax.nn.softmax(moved) if weight_map == "softmax" else project_to_simplex(moved)
    return MoCoState(y, lambd.astype(dtype), step)


def moco(
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
    weight_map: str = "softmax",
    *,
    num_tasks: int | None = None,
) -> Transform:
    """MoCo (Fernando et al. 2023): a tracked Jacobian ``Y`` and weights ``lambda`` from one
    regularised min-norm gradient step per update; ``d = Y^T lambda`` (see the module
    docstring). Needs ``num_tasks`` and ``task_losses``.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"moco's beta must be in [0, 1]; got {beta}.")
    if gamma < 0 or rho < 0 or beta_sigma < 0 or gamma_sigma < 0:
        raise ValueError(
            "moco's gamma, rho, beta_sigma and gamma_sigma must be >= 0; got "
            f"gamma={gamma}, rho={rho}, beta_sigma={beta_sigma}, gamma_sigma={gamma_sigma}."
        )
    if weight_map not in WEIGHT_MAPS:
        raise ValueError(f"Unknown moco weight_map {weight_map!r}; choose from {WEIGHT_MAPS}.")
    hyper = (beta, beta_sigma, gamma, gamma_sigma, rho)

    def init_inner(params: PyTree, k: int) -> MoCoState:
        rows = zero_rows(params, k)
        dtype = rows[0].dtype if rows else jnp.zeros(()).dtype
        return MoCoState(rows, jnp.full((k,), 1.0 / k, dtype), jnp.zeros((), jnp.int32))

    def step(leaves, losses, gram, inner):
        norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
        new_inner = moco_step(leaves, losses, norms, inner, hyper, weight_map)
        return new_inner.lambd, new_inner.y, new_inner

    return tracked_rows_transform(
        "moco",
        "a tracked Jacobian and its weights",
        num_tasks,
        init_inner,
        lambda inner: inner.y,
        step,
        reads_losses=True,
    )
