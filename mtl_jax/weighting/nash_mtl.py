"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning
as a Bargaining Game", ICML 2022).

The update ``d = J^T alpha`` is the Nash bargaining solution of the tasks over the ball of update
directions: it maximises ``sum_i log(g_i . d)``, and the paper shows that its weights solve

    G alpha = 1 / alpha,    alpha > 0,                                                     (*)

i.e. every task gets ``g_i . d = 1 / alpha_i``. Then ``|d|^2 = alpha^T G alpha = K``. The official
code (AvivNavon/nash-mtl) solves (*) by up to ``optim_niter = 20`` sequential convex
approximations with cvxpy/ECOS on the host; here (*) is solved exactly, inside jit, as the
stationarity condition of the strictly convex ``1/2 alpha^T G alpha - sum_i log alpha_i`` by damped
Newton (:mod:`mtl_jax.weighting._fair`): the same fixed point, to machine precision, typically in
2-20 Newton steps (bounded by 100). Because (*) is invariant to rescaling each task (``alpha_i -> alpha_i / c_i``
when ``g_i -> c_i g_i``), it is solved on the cosine matrix and mapped back: the update does not
depend on the scale of any task's gradient.

Then, as in the official code, the update is clipped to norm ``max_norm`` (``clip_grad_norm_`` on
the shared parameters after the weighted backward pass; here on ``d`` of each group, exactly the
same for ``granularity="global"``), and ``update_weights_every = n`` recomputes the weights only
every n-th step and reuses the previous ``alpha`` in between (clipping still uses the current G).

Departures from the official code: (*) is solved exactly instead of by 20 ECOS iterations with
its stopping tests; the solver is not warm-started from the previous weights (the solution is
unique, so this only changes the iteration count); tasks with a zero gradient get weight 0, and
degenerate problems without a solution (no common ascent direction) are regularised as described
in :mod:`mtl_jax.weighting._fair` instead of failing.
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
