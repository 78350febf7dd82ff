"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning
as a Bargaining Game", ICML 2022).

The Nash bargaining solution ``d = J^T alpha`` with ``G alpha = 1 / alpha``, ``alpha > 0``
(``|d|^2 = K``), solved on the cosine matrix (the update ignores each task's gradient scale),
then clipped to ``max_norm``; ``update_weights_every = n`` reuses the weights between
recomputations, as the official code. Departures from the official code (AvivNavon/nash-mtl, up
to 20 cvxpy/ECOS convex approximations on the host): the fixed point is solved exactly inside
jit by damped Newton (:mod:`mtl_jax.weighting._fair`), not warm-started (the solution is unique);
zero-gradient tasks get weight 0 and problems without a solution are regularised instead of
failing; the clip applies to each group's ``d`` (the same for ``granularity="global"``). Details:
``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.weighting._fair import alpha_fair_weights
from mtl_jax.weighting.base import EmptyState, Weighting, require_num_tasks

__all__ = ["NashState", "nash_mtl_weighting", "nash_mtl_weights", "nash_solution"]


class NashState(NamedTuple):
    """State of Nash-MTL with ``update_weights_every > 1``: step counter and the last solution."""

    step: jax.Array
    alpha: jax.Array


def nash_solution(gram: jax.Array) -> jax.Array:
    """The unclipped Nash bargaining weights ``alpha[K]`` solving ``G alpha = 1 / alpha``.

    Tasks whose gradient norm is below ``eps`` times the largest one get ``alpha_i = 0``.
    """
    return alpha_fair_weights(gram, 1.0)


def _clip(alpha: jax.Array, gram: jax.Array, max_norm: float) -> jax.Array:
    """Scales ``alpha`` so that ``|J^T alpha| <= max_norm`` (no-op for ``max_norm <= 0``)."""
    if max_norm <= 0:
        return alpha
    norm = jnp.sqrt(jnp.clip(alpha @ gram @ alpha, 0.0))
    return jnp.where(norm > max_norm, alpha * (max_norm / jnp.where(norm > 0, norm, 1.0)), alpha)


def nash_mtl_weights(gram: jax.Array, max_norm: float = 1.0) -> jax.Array:
    """Nash-MTL's weights for one step: the bargaining solution, clipped to ``max_norm``."""
    return _clip(nash_solution(gram), gram, max_norm)


def nash_mtl_weighting(max_norm: float = 1.0, update_weights_every: int = 1) -> Weighting:
    """Nash-MTL as a :class:`~mtl_jax.weighting.base.Weighting`.

    Stateless for ``update_weights_every == 1``; otherwise the state holds the step counter and
    the last solution (``num_tasks`` needed at init).
    """
    if max_norm < 0:
        raise ValueError(f"Nash-MTL's max_norm must be >= 0 (0 disables clipping); got {max_norm}.")
    if int(update_weights_every) != update_weights_every or update_weights_every < 1:
        raise ValueError(
            f"Nash-MTL's update_weights_every must be a positive integer; got {update_weights_every}."
        )
    every = int(update_weights_every)

    def init(num_tasks: int | None) -> Any:
        if every == 1:
            return EmptyState()
        k = require_num_tasks(num_tasks, "nash_mtl", "the weights reused between updates")
        return NashState(jnp.zeros((), jnp.int32), jnp.zeros((k,), jnp.zeros(()).dtype))

    def weigh(gram: jax.Array, state: Any, key: jax.Array, losses: Any = None) -> Any:
        del key, losses
        if every == 1:
            return nash_mtl_weights(gram, max_norm), state
        if state.alpha.shape != (gram.shape[0],):
            raise ValueError(
                f"nash_mtl state holds {state.alpha.shape[0]} tasks but G is {gram.shape[0]} x "
                f"{gram.shape[0]}."
            )
        refresh = state.step % every == 0
        alpha = jax.lax.cond(refresh, nash_solution, lambda g: state.alpha.astype(g.dtype), gram)
        finite = jnp.all(jnp.isfinite(alpha))
        kept = jnp.where(finite, alpha, state.alpha.astype(alpha.dtype))
        new_state = NashState(state.step + 1, kept.astype(state.alpha.dtype))
        return _clip(alpha, gram, max_norm), new_state

    return Weighting(init=init, weigh=weigh)
