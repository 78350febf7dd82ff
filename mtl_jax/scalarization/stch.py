"""Smooth Tchebycheff scalarisation, STCH (Lin, Zhang, Liu & Zhang, ICML 2024).

``loss = mu log sum_k exp(lambda_k (L_k - z_k) / mu)``, a smooth upper bound of
``max_k lambda_k (L_k - z_k)``. With ``nadir_steps > 0``, the official multi-task recipe
(Xi-L/STCH ``STCH_MTL``, LibMTL ``STCH``): a ``sum_k log L_k`` warm-up, a nadir averaged from the
losses, then STCH on ``log(L / nadir)``. Departure: the warm-up is counted in calls, not epochs.
See ``docs/methods.md`` ("Loss-only methods").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .base import (
    Scalarizer,
    check_losses,
    check_num_tasks,
    float_dtype,
    keep_if_finite,
    no_post_step,
)

__all__ = ["STCHState", "stch"]


class STCHState(NamedTuple):
    """State of :func:`stch`'s warm-up: calls so far and the running sum of the losses."""

    step: jax.Array
    nadir_sum: jax.Array


def stch(
    mu: float = 1.0,
    pref_vector: Sequence[float] | None = None,
    reference: Sequence[float] | None = None,
    warmup_steps: int = 0,
    nadir_steps: int = 0,
) -> Scalarizer:
    """Smooth Tchebycheff scalarisation (Lin, Zhang, Liu & Zhang, ICML 2024).

    ``loss = mu log sum_k exp(lambda_k (L_k - z_k) / mu)``, a smooth upper bound of
    ``max_k lambda_k (L_k - z_k)`` that tightens as ``mu -> 0``; ``lambda`` = ``pref_vector``
    (default ``1/K``), ``z`` = ``reference`` (the ideal point, default 0). Weights: ``lambda_k
    softmax(lambda (L - z) / mu)_k``.

    With ``nadir_steps > 0`` it follows the official multi-task recipe (Xi-L/STCH ``STCH_MTL``,
    LibMTL ``STCH``, counted in calls instead of epochs): for ``warmup_steps`` calls and then
    ``nadir_steps`` more the loss is ``sum_k log L_k``, and the losses of the last ``nadir_steps``
    calls are averaged into the nadir ``n``; afterwards ``loss = K mu log sum_k exp(log(L_k / n_k)
    / mu)`` (LibMTL's defaults: mu = 1, 4 warm-up epochs, 1 nadir epoch).
    """
    if not mu > 0:
        raise ValueError(f"STCH's mu must be > 0; got {mu}.")
    for name, value in (("warmup_steps", warmup_steps), ("nadir_steps", nadir_steps)):
        if int(value) != value or value < 0:
            raise ValueError(f"STCH's {name} must be an integer >= 0; got {value}.")
    pref = None if pref_vector is None else np.asarray(pref_vector, dtype=float)
    ref = None if reference is None else np.asarray(reference, dtype=float)
    official = nadir_steps > 0
    start = int(warmup_steps)
    stop = start + int(nadir_steps)

    def init(num_tasks: int) -> STCHState:
        k = check_num_tasks(num_tasks, "stch")
        for name, vec in (("pref_vector", pref), ("reference", ref)):
            if vec is not None and vec.shape != (k,):
                raise ValueError(f"stch {name} has shape {vec.shape}; expected ({k},).")
        return STCHState(jnp.zeros((), jnp.int32), jnp.zeros((k,), float_dtype()))

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = check_losses(losses, state.nadir_sum.shape[0], "stch")
        num = losses.shape[0]
        dtype = losses.dtype
        values = jax.lax.stop_gradient(losses)
        if not official:
            lam = jnp.full(num, 1.0 / num, dtype) if pref is None else jnp.asarray(pref, dtype)
            y = lam * (losses - (0.0 if ref is None else jnp.asarray(ref, dtype)))
            loss = mu * jax.nn.logsumexp(y / mu)
            weights = lam * jax.nn.softmax(jax.lax.stop_gradient(y) / mu)
            return loss, weights, STCHState(state.step + 1, state.nadir_sum)
        in_warmup = state.step < stop
        collect = (state.step >= start) & in_warmup
        nadir_sum = jnp.where(collect, state.nadir_sum + values, state.nadir_sum)
        nadir = state.nadir_sum.astype(dtype) / max(stop - start, 1)
        safe_nadir = jnp.where(nadir > 0, nadir, 1.0)
        logs = jnp.log(losses / safe_nadir + 1e-20)
        stch_loss = num * mu * jax.nn.logsumexp(logs / mu)
        warm_loss = jnp.sum(jnp.log(losses + 1e-20))
        loss = jnp.where(in_warmup, warm_loss, stch_loss)
        stch_weights = (
            num * jax.nn.softmax(jax.lax.stop_gradient(logs) / mu) / (values + 1e-20 * safe_nadir)
        )
        weights = jnp.where(in_warmup, 1.0 / (values + 1e-20), stch_weights)
        new = STCHState(state.step + 1, nadir_sum.astype(state.nadir_sum.dtype))
        return loss, weights, keep_if_finite(values, new, state)

    return Scalarizer(init, scalarize, no_post_step)
