"""An exponential moving average of any weighting's output (the weight smoothing of CR-MOGM: Zhou,
Zhang, Jiang, Zhang & Kwok, "On the Convergence of Stochastic Multi-Objective Gradient Manipulation
and Beyond", NeurIPS 2022).

``lambda_t = alpha lambda_{t-1} + (1 - alpha) lambda_hat_t``, ``lambda_0 = 1/K``, with
``lambda_hat_t`` the wrapped weighting's weights (TorchJD's ``CRMOGMWeighting``): ``alpha = 0`` is
the wrapped method, ``alpha = 1`` freezes the weights at ``1/K``. Departure: ``alpha`` is fixed (the
paper lets it grow towards 1; the default 0.9 is the usual EMA convention, TorchJD's is 0.1). A step
whose wrapped weights are not finite leaves the average unchanged. Details: ``docs/methods.md``,
"Method notes".
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import Weighting, require_num_tasks

__all__ = ["EmaState", "ema_weighting"]

PyTree = Any


class EmaState(NamedTuple):
    """``average``: the smoothed weights; ``inner``: the wrapped weighting's state."""

    average: jax.Array
    inner: PyTree


def ema_weighting(weighting: Weighting, alpha: float = 0.9) -> Weighting:
    """Wraps ``weighting`` so that its weights are smoothed by an EMA (needs ``num_tasks``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ema_weights' alpha must be in [0, 1]; got {alpha}.")

    def init(num_tasks: int | None) -> EmaState:
        k = require_num_tasks(num_tasks, "ema_weights", "the moving average of the weights")
        return EmaState(jnp.full((k,), 1.0 / k, jnp.zeros(()).dtype), weighting.init(num_tasks))

    def weigh(gram: jax.Array, state: Any, key: jax.Array, losses: Any = None) -> Any:
        if state.average.shape != (gram.shape[0],):
            raise ValueError(
                f"ema_weights state holds {state.average.shape[0]} tasks but G is "
                f"{gram.shape[0]} x {gram.shape[0]}."
            )
        fresh, inner = weighting.weigh(gram, state.inner, key, losses)
        previous = state.average.astype(fresh.dtype)
        smoothed = alpha * previous + (1.0 - alpha) * fresh
        kept = jnp.where(jnp.all(jnp.isfinite(smoothed)), smoothed, previous)
        return smoothed, EmaState(kept.astype(state.average.dtype), inner)

    return Weighting(init=init, weigh=weigh)
