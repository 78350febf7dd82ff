"""ExcessMTL (He, Zhou, Zhao & Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024).

Tasks are weighted by their excess risk, from an AdaGrad-style diagonal curvature (eqs. 6-7:
``S_i <- S_i + g_i^2``, ``e_i = g_i^T diag(sqrt(S_i + 1e-7))^-1 g_i``) normalised by the
baseline ``e_0``, with an exponentiated-gradient step on the simplex (eq. 9); the update is
``sum_i lambda_i g_i``. Not a Gram-space method: ``S`` is as large as the Jacobian. Schedule as
the official code, LibMTL and TorchJD (uniform weights during ``warmup_steps``, which average
into ``e_0``); weights on the simplex as the paper and TorchJD (the official code sums them to
K); ``robust_step_size`` 1e-2 (official). Departure: a task whose baseline is 0 gets
``e / e_0 = 0``. Details: ``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ExcessMTLState", "excess_mtl_step", "excess_risks"]

CURVATURE_EPS = 1e-7


class ExcessMTLState(NamedTuple):
    """State of ExcessMTL.

    Attributes:
      sq_sums: one array per Jacobian leaf, ``[K, *param.shape]``: accumulated squared gradients.
      weights: ``[K]`` task weights (on the simplex).
      baseline: ``[K]`` the excess risks at the start (``e_0``).
      warmup_sum: ``[K]`` sum of the excess risks during warm-up.
      step: number of calls so far.
    """

    sq_sums: list[jax.Array]
    weights: jax.Array
    baseline: jax.Array
    warmup_sum: jax.Array
    step: jax.Array


def excess_risks(
    leaves: Sequence[jax.Array], sq_sums: Sequence[jax.Array]
) -> tuple[jax.Array, list[jax.Array]]:
    """``(e[K], new_sq_sums)``: ``e_i = sum g_i^2 / sqrt(S_i + 1e-7)`` after ``S_i += g_i^2``."""
    total = 0.0
    new_sums = []
    for leaf, sq_sum in zip(leaves, sq_sums, strict=True):
        sq = jnp.square(leaf.astype(sq_sum.dtype))
        new = sq_sum + sq
        new_sums.append(new)
        contribution = sq / jnp.sqrt(new + CURVATURE_EPS)
        total = total + jnp.sum(jnp.reshape(contribution, (leaf.shape[0], -1)), axis=1)
    return total, new_sums


def excess_mtl_step(
    leaves: Sequence[jax.Array],
    state: ExcessMTLState,
    robust_step_size: float,
    warmup_steps: int,
) -> tuple[jax.Array, ExcessMTLState]:
    """One step: the weights ``lambda[K]`` to use now and the new state."""
    risks, sq_sums = excess_risks(leaves, state.sq_sums)
    risks = risks.astype(state.weights.dtype)
    step = state.step
    in_warmup = step < warmup_steps
    warmup_sum = jnp.where(in_warmup, state.warmup_sum + risks, state.warmup_sum)
    first = step == warmup_steps
    if warmup_steps > 0:
        baseline = jnp.where(first, warmup_sum / warmup_steps, state.baseline)
    else:
        baseline = jnp.where(first, risks, state.baseline)
    safe = jnp.where(baseline > 0, baseline, 1.0)
    ratio = jnp.where(baseline > 0, risks / safe, 0.0)
    if warmup_steps == 0:
        ratio = jnp.where(first, risks, ratio)  # the official first step uses the raw risks
    moved = jax.nn.softmax(jnp.log(state.weights) + robust_step_size * ratio)
    weights = jnp.where(in_warmup, state.weights, moved)
    return weights, ExcessMTLState(sq_sums, weights, baseline, warmup_sum, step + 1)
