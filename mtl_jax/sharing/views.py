"""A task's view of the parameters: shared leaves, copied leaves' row t, ``theta * M_t``.

:func:`task_params` gives task t's view for the plain ``apply``
(``per_task(apply, spec, K)(params, x)[t] == apply(task_params(params, spec, t), x)``); the
private helpers give :func:`~mtl_jax.sharing.per_task` and
:func:`~mtl_jax.sharing.per_task_grads` what they map over the task axis. A masked value is a
select, not a product: exact zeros, and a gradient that is exactly zero outside ``M_t``.

See ``docs/custom_loop.md``, section "Sharing specs".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .markers import COPIED, Marker, Masked
from .masks import _mask_slots, _spec_at_call
from .specs import _expand, check_spec

PyTree = Any

__all__ = ["task_params"]


def _task_axis_inputs(
    spec: PyTree, masks: PyTree | None, params: PyTree, num_tasks: int, caller: str
) -> tuple[list[Marker], list[Any], Any, list[Any]]:
    """What :func:`per_task` and :func:`per_task_grads` map over the tasks: the checked spec's
    markers, the parameter leaves and treedef, and per leaf its task-axis input -- a copied
    leaf's ``[K, ...]`` rows, a masked leaf's boolean masks ``[K, ...]``, ``None`` for a shared
    leaf (broadcast to every task)."""
    spec_now = _spec_at_call(spec, masks, params, num_tasks, caller)
    check_spec(spec_now, params, num_tasks)
    markers = _expand(spec_now, params)
    leaves, treedef = jax.tree.flatten(params)
    batched = [
        x if m is COPIED else _mask_bool(m.mask) if isinstance(m, Masked) else None
        for m, x in zip(markers, leaves, strict=True)
    ]
    return markers, leaves, treedef, batched


def _mask_bool(mask: Any) -> jax.Array:
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _masked_value(theta: jax.Array, mask_t: jax.Array) -> jax.Array:
    """``theta * M_t`` as a select: exact zeros, and a gradient that is exactly zero outside M_t."""
    return jnp.where(mask_t, theta, jnp.zeros((), theta.dtype))


def task_params(params: PyTree, spec: PyTree, task: int, masks: PyTree | None = None) -> PyTree:
    """Task ``task``'s view of the parameters, usable with the plain ``apply``.

    Copied leaves give their row ``task``, masked leaves ``theta * M_task``, shared leaves
    themselves. ``per_task(apply, spec, K)(params, x)[t] == apply(task_params(params, spec, t), x)``.
    ``masks``: the masks of a spec with mask slots (see :func:`split_masks`).
    """
    if masks is not None or _mask_slots(spec):
        k = check_spec(spec, params)
        if k is None:
            k = int(np.shape(jax.tree.leaves(masks)[0])[0]) if jax.tree.leaves(masks) else 1
        spec = _spec_at_call(spec, masks, params, k, "task_params")
    check_spec(spec, params)
    markers = _expand(spec, params)
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for m, x in zip(markers, leaves, strict=True):
        if m is COPIED:
            out.append(x[task])
        elif isinstance(m, Masked):
            out.append(_masked_value(x, _mask_bool(m.mask)[task]))
        else:
            out.append(x)
    return treedef.unflatten(out)
