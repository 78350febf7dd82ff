"""Precise BatchNorm: recompute running statistics after training, for any EMA-style statistic.

Running statistics lag the weights; *precise BN* (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021, section 3; detectron2's ``precise_bn``) replaces them after training by
population statistics of the final weights. :func:`recompute_statistics` does that for Flax
Linen, Flax NNX or any model whose train-mode forward updates ``r' = m r + (1 - m) b``, *without
knowing m*, from ``update_fn(state, batch) -> new_state`` alone; a per-task model's streams each
get their own statistics. Departures: the variance is the mean of the (biased) batch variances,
as detectron2; the train-mode forward must not depend on the running statistics (true of
BatchNorm, not of batch renormalisation) and ``update_fn`` must apply one momentum to every
batch. The algebra and an example: ``docs/recipes/recon.md``, "Precise BatchNorm statistics".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import _tree
from mtl_jax.sharing import PathFilter, path_filter

PyTree = Any

__all__ = ["recompute_statistics"]

#: Relative tolerance of the momentum checks (the momentum is measured in float32).
_MOMENTUM_TOL = 1e-5


def _leaf_path(path: Any) -> str:
    """A ``/``-joined key path without NNX's trailing ``/value``."""
    text = _tree.path_str(path)
    return text[: -len("/value")] if text.endswith("/value") else text


def _probe_scale(u0: jax.Array) -> jax.Array:
    """A power of two ``S >> |r'(0)|`` per element: ``m S`` dominates ``r'(S)``, so the
    difference ``r'(S) - r'(0)`` keeps m's precision, and dividing by S is exact."""
    return jnp.exp2(jnp.ceil(jnp.log2(1.0 + 1024.0 * jnp.abs(u0)))).astype(u0.dtype)


def _check_momentum(m: jax.Array, path: str) -> None:
    """``m`` must be in [0, 1): an EMA that updates. Skipped for traced values (under jit)."""
    if isinstance(m, jax.core.Tracer):
        return
    m = np.asarray(m, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError(
            f"recompute_statistics: the state leaf {path!r} is not finite after update_fn; "
            "cannot recover its momentum."
        )
    if np.any(np.abs(m - 1.0) <= _MOMENTUM_TOL):
        raise ValueError(
            f"recompute_statistics: update_fn does not update the state leaf {path!r} (r' = r, "
            "momentum 1). Give a train-mode forward (Linen: train=True / "
            "use_running_average=False with mutable=['batch_stats']; NNX: model.train()), or "
            "leave the leaf out with state_filter."
        )
    if np.any(m < -_MOMENTUM_TOL) or np.any(m > 1.0 + _MOMENTUM_TOL):
        raise ValueError(
            f"recompute_statistics: the state leaf {path!r} is not an exponential moving "
            f"average r' = m r + (1 - m) b with m in [0, 1): measured m in "
            f"[{m.min():.4g}, {m.max():.4g}]. Leave it out with state_filter."
        )


def recompute_statistics(
    update_fn: Callable[[PyTree, Any], PyTree],
    state: PyTree,
    batches: Iterable[Any],
    *,
    state_filter: PathFilter = None,
) -> PyTree:
    """Population running statistics of the current weights (precise BN), momentum-free.

    Args:
      update_fn: ``(state, batch) -> new_state``: ONE train-mode forward on ``batch`` returning
        the updated running statistics, with the structure of ``state``. E.g. Linen
        ``lambda s, x: model.apply({"params": p, "batch_stats": s}, x, train=True,
        mutable=["batch_stats"])[1]["batch_stats"]``; NNX ``nnx.merge(graphdef, params, s)``
        in train mode, returning ``nnx.state(model, nnx.BatchStat)``; or a
        :func:`mtl_jax.per_task` forward's new state (per-task statistics). May be jitted (it
        is called with the same shapes every time, so it compiles once).
      state: the running statistics to replace (e.g. ``variables["batch_stats"]``); only its
        structure, shapes and the values of unselected leaves are used.
      batches: an iterable of batches (anything ``update_fn`` takes), at least one. Each is
        passed once (twice more for the first), in order.
      state_filter: which leaves to recompute: ``None`` (every floating-point leaf), a regex
        searched in the leaf path (``/``-joined, NNX's ``/value`` dropped), or a predicate on
        it. The other leaves are passed to ``update_fn`` and returned as they are.

    Returns:
      ``state`` with every selected leaf the mean over the batches of the batch statistic
      ``b = r'(0) / (1 - m)``: per channel (and per task row) the mean of the batch means, or
      the mean of the batch variances. Leaves keep their dtype.

    Raises:
      ValueError: if no leaf is selected, ``batches`` is empty, ``update_fn`` changes the
        structure, or (on concrete values) a selected leaf is not updated (``m == 1``, e.g. an
        evaluation-mode forward) or is not an EMA (``m`` outside ``[0, 1)``).

    Example::

      update = jax.jit(lambda s, x: model.apply({"params": params, "batch_stats": s}, x,
                                                train=True, mutable=["batch_stats"])[1]["batch_stats"])
      stats = recompute_statistics(update, variables["batch_stats"], (x[i:i + 64] for i in ...))
    """
    pred = path_filter(state_filter)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths = [_leaf_path(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    selected = [
        bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact)) and pred(path)
        for path, x in zip(paths, leaves, strict=True)
    ]
    if not any(selected):
        raise ValueError(
            "recompute_statistics: state_filter selects no floating-point leaf; leaves: "
            f"[{_tree._listing(paths)}]."
        )

    def updated_at(values: list[Any], batch: Any) -> list[jax.Array]:
        """``update_fn`` with the selected leaves set to ``values``: their new values."""
        filled = [v if s else x for v, x, s in zip(values, leaves, selected, strict=True)]
        new_leaves, new_def = jax.tree.flatten(update_fn(treedef.unflatten(filled), batch))
        if new_def != treedef:
            raise ValueError(
                "recompute_statistics: update_fn(state, batch) must return the state's "
                f"structure; got {new_def}, expected {treedef}."
            )
        return [jnp.asarray(v, jnp.float32) for v in new_leaves]

    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("recompute_statistics: batches is empty; give at least one.") from None
    zeros = [jnp.zeros(np.shape(x), jnp.result_type(x)) for x in leaves]
    u0 = updated_at(zeros, first)  # r'(0) = (1 - m) b
    scales = [_probe_scale(u) for u in u0]
    probes = [s.astype(jnp.result_type(x)) for s, x in zip(scales, leaves, strict=True)]
    u_s = updated_at(probes, first)  # r'(S) = m S + (1 - m) b
    momentum = [(a - b) / s for a, b, s in zip(u_s, u0, scales, strict=True)]
    for m, path, s in zip(momentum, paths, selected, strict=True):
        if s:
            _check_momentum(m, path)
    keep = [1.0 - m for m in momentum]
    total = [u / k for u, k in zip(u0, keep, strict=True)]
    count = 1
    for batch in iterator:
        total = [t + u / k for t, u, k in zip(total, updated_at(zeros, batch), keep, strict=True)]
        count += 1
    out = [
        (t / count).astype(jnp.result_type(x)) if s else x
        for t, x, s in zip(total, leaves, selected, strict=True)
    ]
    return treedef.unflatten(out)
