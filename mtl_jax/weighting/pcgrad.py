"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020), in Gram space.

Algorithm 1 of the paper: for every task i, start from ``g_i' = g_i`` and visit the *other*
tasks j in a random order; whenever ``g_i' . g_j < 0`` replace ``g_i'`` by
``g_i' - (g_i' . g_j / |g_j|^2) g_j`` (projection against the *original* g_j). The update is
``sum_i g_i'`` (Algorithm 1; many ports use the mean, Recon's code the mean times K).

Every ``g_i'`` stays a linear combination ``c_i^T J`` of the task gradients, and
``g_i' . g_j = c_i^T G[:, j]``, so the whole algorithm runs on the K x K Gram matrix: the weights
are ``w = sum_i c_i`` (the same reduction TorchJD's ``PCGradWeighting`` uses). The K projection
sequences are independent and run under one ``vmap``; each is a ``fori_loop`` of K - 1 steps.

Departures from the official code (tianheyu927/PCGrad): the official loop also visits j = i
(a no-op unless rounding makes ``g_i' . g_i < 0``); Algorithm 1 and this code skip it. A task
with a zero gradient is never projected against (the official code divides by zero there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, stateless_random

__all__ = ["pcgrad_weighting", "pcgrad_weights", "visiting_orders"]


@functools.partial(jax.jit, static_argnames=("num_tasks", "shuffle"))
def visiting_orders(num_tasks: int, key: jax.Array, shuffle: bool = True) -> jax.Array:
    """``[K, K-1]`` int array: row i lists the tasks j != i in the order task i visits them.

    With ``shuffle``, every row is an independent random permutation drawn from ``key`` (a fresh
    order per task, as in Algorithm 1); otherwise the index order.
    """
    base = jnp.arange(num_tasks - 1)
    others = jnp.where(
        base[None, :] < jnp.arange(num_tasks)[:, None], base[None, :], base[None, :] + 1
    )
    if not shuffle or num_tasks <= 2:
        return others
    keys = jax.random.split(key, num_tasks)
    return jax.vmap(jax.random.permutation)(keys, others)


@jax.jit
def pcgrad_weights(gram: jax.Array, orders: jax.Array) -> jax.Array:
    """PCGrad's weights ``w[K]`` (``d = sum_k w_k g_k``) from ``G[K, K]`` and visiting orders."""
    num_tasks = gram.shape[0]
    if num_tasks == 1:
        return jnp.ones(1, gram.dtype)
    sq_norms = jnp.diagonal(gram)

    def project(i: jax.Array, order: jax.Array) -> jax.Array:
        def step(t: int, coef: jax.Array) -> jax.Array:
            j = order[t]
            dot = coef @ gram[:, j]
            conflict = (dot < 0) & (sq_norms[j] > 0)
            shift = jnp.where(conflict, dot / jnp.where(conflict, sq_norms[j], 1.0), 0.0)
            return coef.at[j].add(-shift)

        start = jax.nn.one_hot(i, num_tasks, dtype=gram.dtype)
        return jax.lax.fori_loop(0, num_tasks - 1, step, start)

    coefs = jax.vmap(project)(jnp.arange(num_tasks), orders)
    return jnp.sum(coefs, axis=0)


def pcgrad_weighting(shuffle: bool = True) -> Weighting:
    """PCGrad as a :class:`~mtl_jax.weighting.base.Weighting` (random orders drawn from ``key``)."""

    def fn(gram: jax.Array, key: jax.Array) -> jax.Array:
        return pcgrad_weights(gram, visiting_orders(gram.shape[0], key, shuffle))

    return stateless_random(fn)
