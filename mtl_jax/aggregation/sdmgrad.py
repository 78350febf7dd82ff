"""SDMGrad (Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
Stochastic Algorithms", NeurIPS 2023, Algorithm 1), a cross-batch aggregator.

The direction-oriented problem ``min_d max_w <J^T w, d> - |d|^2 / 2`` with ``d`` kept near the
mean gradient ``g0 = J^T 1/K`` (weight ``lamda``) has the dual
``min_{w in simplex} 1/2 |J^T w + lamda g0|^2``. SDMGrad runs projected SGD on ``w``
(eq. 6) with the unbiased stochastic gradient ``C w + lamda C 1/K`` of that objective, where
``C = J_a J_b^T`` is the cross-batch matrix of two independent batches (the double sampling),
and then updates with ``d = J^T (w + lamda/K) / (1 + lamda)`` (eq. 7, rescaled by
``1/(1 + lamda)`` as the official code). Here, as in LibMTL's ``weighting/SDMGrad.py`` (from the
authors' code): ``C`` is divided by ``s^2 + 1e-8``, ``s`` the mean of ``sqrt(max(C_kk, 0))``
(so the step size is scale-free); ``niter`` steps of SGD with momentum (PyTorch's rule: the
buffer starts at the first gradient, restarted at every update), each followed by the Euclidean
projection onto the simplex; ``w`` starts at ``1/K`` and is warm-started from the previous
update (the state). Defaults ``lamda = 0.3``, ``niter = 20``, ``lr = 5``, ``momentum = 0.5``
as LibMTL.

Departures: the update combines the rows given to ``update`` (with
:func:`~mtl_jax.aggregation.value_and_paired_grads`: the whole batch, the mean of the two halves
whose cross matrix gave ``w``), where Algorithm 1 and LibMTL draw a third independent batch
``zeta`` for ``d`` (three forward/backward passes); a loop that wants that passes a third
batch's rows as the rows and two others as ``paired_rows``. Weights are solved in the rows'
dtype (LibMTL projects in float64). The logged weights are the effective ones,
``(w + lamda/K) / (1 + lamda)``. Non-finite input gives an all-NaN update and keeps ``w``.
See ``docs/methods.md`` and ``docs/recipes/cross_batch.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._checks import float_dtype
from .cross_batch import cross_batch_transform, simplex_projection

__all__ = ["SDMGradState", "sdmgrad", "sdmgrad_weights"]

Transform = optax.GradientTransformationExtraArgs
EPS = 1e-8  # LibMTL's constant in C / (s^2 + eps)


class SDMGradState(NamedTuple):
    """State of SDMGrad.

    Attributes:
      w: ``[K]`` the simplex weights of the last update (the inner loop's warm start).
    """

    w: jax.Array


def sdmgrad_weights(
    cross: jax.Array, w: jax.Array, lamda: float, niter: int, lr: float, momentum: float
) -> jax.Array:
    """The inner loop: ``niter`` projected SGD-with-momentum steps on ``w [K]`` (warm start)
    for ``1/2 |J^T w + lamda g0|^2`` with the normalised cross matrix ``cross [K, K]``."""
    dtype = w.dtype
    cross = cross.astype(dtype)
    scale = jnp.mean(jnp.sqrt(jnp.clip(jnp.diagonal(cross), 0.0)))
    c = cross / (scale**2 + EPS)
    c_g0 = jnp.mean(c, axis=1)  # C 1/K

    def step(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        w, buf = carry
        grad = c @ w + lamda * c_g0
        buf = jnp.where(i == 0, grad, momentum * buf + grad)
        return simplex_projection(w - lr * buf), buf

    w, _ = jax.lax.fori_loop(0, niter, step, (w, jnp.zeros_like(w)))
    return w


def sdmgrad(
    lamda: float = 0.3,
    niter: int = 20,
    lr: float = 5.0,
    momentum: float = 0.5,
    *,
    num_tasks: int | None = None,
) -> Transform:
    """SDMGrad (Xiao et al. 2023): simplex weights from a projected-SGD inner loop on the
    cross-batch matrix of ``paired_rows``, ``d = J^T (w + lamda/K) / (1 + lamda)`` (see the module
    docstring). Needs ``num_tasks`` and ``paired_rows=`` in ``update``.
    """
    if lamda < 0:
        raise ValueError(f"sdmgrad's lamda must be >= 0; got {lamda}.")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"sdmgrad's niter must be an int >= 0; got {niter!r}.")
    if lr < 0 or not 0.0 <= momentum < 1.0:
        raise ValueError(f"sdmgrad's lr must be >= 0 and momentum in [0, 1); got {lr}, {momentum}.")

    def init_inner(k: int) -> SDMGradState:
        return SDMGradState(jnp.full((k,), 1.0 / k, float_dtype()))

    def weigh(cross: jax.Array, inner: SDMGradState) -> tuple[jax.Array, Any]:
        k = inner.w.shape[0]
        w = sdmgrad_weights(cross, inner.w, lamda, niter, lr, momentum)
        effective = (w + lamda / k) / (1.0 + lamda)
        return effective, SDMGradState(w.astype(inner.w.dtype))

    return cross_batch_transform("sdmgrad", num_tasks, init_inner, weigh)
