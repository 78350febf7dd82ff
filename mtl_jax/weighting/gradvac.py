"""GradVac (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR 2021), in Gram space.

Algorithm 1: each pair keeps an EMA target ``phi_hat_ij`` (rate ``beta``) of its cosine; every
``g_i'`` visits the other tasks in a random order and, when ``cos(g_i', g_j) < phi_hat_ij``, adds
the multiple of ``g_j`` that reaches the target. Every ``g_i'`` stays a combination of the
original gradients, so the method runs on G (as TorchJD's ``GradVacWeighting``); with
``phi_hat = 0`` the first step is PCGrad. ``granularity`` is the paper's grouping (whole model,
per layer with :func:`mtl_jax.gramian.by_module`, per matrix with ``"leaf"``). Departures: the EMA
is updated at every visit (paper, TorchJD; LibMTL only when the correction fires); no ``1e-8``
in denominators: degenerate pairs get no correction. Details: ``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, diag_scale, require_num_tasks
from mtl_jax.weighting.pcgrad import visiting_orders

__all__ = ["GradVacState", "gradvac_step", "gradvac_weighting"]


class GradVacState(NamedTuple):
    """``targets[i, j]``: the EMA target ``phi_hat_ij`` of ``cos(g_i', g_j)``."""

    targets: jax.Array


@jax.jit
def gradvac_step(
    gram: jax.Array, targets: jax.Array, orders: jax.Array, beta: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One GradVac step: ``(w[K], new_targets[K, K])`` from ``G``, the targets and the orders."""
    num = gram.shape[0]
    if num == 1:
        return jnp.ones(1, gram.dtype), targets
    G = gram / diag_scale(gram)
    sq_norms = jnp.clip(jnp.diagonal(G), 0.0)
    norms = jnp.sqrt(sq_norms)
    targets = targets.astype(G.dtype)

    def vaccinate(i: jax.Array, order: jax.Array) -> tuple[jax.Array, jax.Array]:
        def visit(t: int, carry):
            coef, dots, row = carry  # dots = coef^T G (g_i' . g_k for every k)
            j = order[t]
            norm_i = jnp.sqrt(jnp.clip(coef @ dots, 0.0))
            defined = (norm_i > 0) & (norms[j] > 0)
            denom = jnp.where(defined, norm_i * norms[j], 1.0)
            phi = jnp.where(defined, jnp.clip(dots[j] / denom, -1.0, 1.0), 0.0)
            phi_hat = row[j]
            root_hat = jnp.sqrt(jnp.clip(1.0 - phi_hat * phi_hat, 0.0))
            fire = defined & (phi < phi_hat) & (root_hat > 0)
            root = jnp.sqrt(jnp.clip(1.0 - phi * phi, 0.0))
            shift = norm_i * (phi_hat * root - phi * root_hat)
            shift = jnp.where(fire, shift / jnp.where(fire, norms[j] * root_hat, 1.0), 0.0)
            coef = coef.at[j].add(shift)
            dots = dots + shift * G[j]
            row = row.at[j].set((1.0 - beta) * phi_hat + beta * phi)
            return coef, dots, row

        start = jax.nn.one_hot(i, num, dtype=G.dtype)
        coef, _, row = jax.lax.fori_loop(0, num - 1, visit, (start, G[i], targets[i]))
        return coef, row

    coefs, new_targets = jax.vmap(vaccinate)(jnp.arange(num), orders)
    return jnp.sum(coefs, axis=0), new_targets


def gradvac_weighting(beta: float = 0.5, shuffle: bool = True) -> Weighting:
    """GradVac as a :class:`~mtl_jax.weighting.base.Weighting` (needs ``num_tasks`` at init).

    ``beta`` is the EMA rate of the targets (0.5 is LibMTL's and TorchJD's default); visiting
    orders are drawn from ``key`` (``shuffle=False``: index order).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"GradVac's beta must be in [0, 1]; got {beta}.")

    def init(num_tasks: int | None) -> GradVacState:
        k = require_num_tasks(num_tasks, "gradvac", "the EMA targets of the pairwise cosines")
        return GradVacState(jnp.zeros((k, k), jnp.zeros(()).dtype))

    def weigh(gram: jax.Array, state: Any, key: jax.Array, losses: Any = None) -> Any:
        del losses
        num = gram.shape[0]
        if state.targets.shape != (num, num):
            raise ValueError(
                f"gradvac state holds targets for {state.targets.shape[0]} tasks but G is "
                f"{num} x {num}."
            )
        orders = visiting_orders(num, key, shuffle)
        w, targets = gradvac_step(gram, state.targets, orders, beta)
        finite = jnp.all(jnp.isfinite(gram))
        targets = jnp.where(finite, targets, state.targets).astype(state.targets.dtype)
        return w, GradVacState(targets)

    return Weighting(init=init, weigh=weigh)
