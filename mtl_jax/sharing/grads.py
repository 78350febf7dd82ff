"""Task losses and the gradient tree of a per-task model: :func:`per_task_grads`.

``jax.value_and_grad`` of each task's own loss under ONE ``vmap`` over the tasks: the shared
prefix runs forward once and backward once per task (its K Jacobian rows), and each task stream
after the branch is differentiated with its own loss only, O(K x activation), where
differentiating the joint loss vector pulls every task's cotangent back through every stream
(``[K, K, batch, ...]``; ``benchmarks/grads_tree.py`` measures both). The tree has the format of
:func:`mtl_jax.value_and_grads`: Jacobian rows ``[K, *shape]`` for shared and masked leaves,
each copy's own gradient for copied leaves.

See ``docs/custom_loop.md``, section "Sharing specs".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax import _tree

from .dependence import _depends_on_stream
from .forward import _map_streams, _task_view
from .markers import COPIED
from .masks import _masked_entries
from .specs import task_specific_leaves
from .state import (
    StateReduction,
    _join_state,
    _reducer,
    _shared_paths,
    _split_state,
    _state_markers,
    _stream_dependent_error,
)
from .views import _task_axis_inputs

PyTree = Any

__all__: list[str] = []  # reached through mtl.value_and_grads(mtl.PerTaskLosses(...))


def _checked_loss(out: Any, has_state: bool) -> Any:
    """``out`` after checking that task t's loss is a float scalar (trace time)."""
    if has_state and not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "PerTaskLosses(has_state=True): task_loss_fn must return (loss_t, new_state_t); got "
            f"{type(out).__name__}."
        )
    _tree.check_scalar_loss(out[0] if has_state else out, "PerTaskLosses: task_loss_fn")
    return out


def per_task_grads(
    task_loss_fn: Callable[..., Any],
    spec: PyTree,
    num_tasks: int,
    *,
    has_state: bool = False,
    state_spec: PyTree | None = None,
    state_reduction: StateReduction = None,
    axis_name: str | None = None,
    unroll: bool = False,
    task_specific: PyTree | None = None,
) -> Callable[..., Any]:
    """Task losses and the gradient tree of a per-task model, with no task-by-task term at all.

    ``task_loss_fn(view_t, t, *args, **kwargs)`` is task t's loss on its view of the parameters
    (the view of :func:`per_task`: shared leaves as they are, copied leaves' row t, masked leaves
    ``theta * M_t``); ``t`` is the task index (a traced int: index stacked heads or targets with
    it). The returned function runs ``jax.value_and_grad`` of it for every task under ONE
    ``jax.vmap`` over the tasks, with ``in_axes=None`` for shared leaves. The gradient is taken
    inside the ``vmap``, so

    * everything before the first task-specific leaf runs forward once (it does not depend on
      the task), its backward once per task: the K Jacobian rows of the shared prefix;
    * each task's stream after the branch is differentiated with its own loss only: O(K x
      activation) and O(K x leaf) everywhere. Differentiating the joint loss vector instead
      (a loss-vector :func:`mtl_jax.value_and_grads`) pulls every task's
      cotangent back through every task's stream: ``[K, K, batch, ...]`` activation
      cotangents after the branch (``benchmarks/grads_tree.py`` measures both).

    The gradient tree has the format of :func:`mtl_jax.value_and_grads` with ``task_specific=
    spec``: shared and masked leaves get their Jacobian rows ``[K, *shape]``, copied leaves
    ``[K, *shape]`` where copy t holds ``d loss_t / d copy_t``. Give it to
    ``optax.chain(mtl.shared_rows(aggregator, spec), optimizer)``.

    Mutable state (``has_state``): the function takes ``(params, state, *args)`` and
    ``task_loss_fn(view_t, state_t, t, *args)`` returns ``(loss_t, new_state_t)``; ``state_t``
    is task t's view of the state (copied leaves' row t, e.g. a branched BatchNorm's
    statistics) and the K new states are handled as in :func:`per_task` (copied leaves keep
    their K rows, shared ones must not depend on the task stream unless ``state_reduction``
    is given). The state is not differentiated.

    Args:
      task_loss_fn: ``(view_t, t, *args, **kwargs) -> loss_t`` (a scalar), or with
        ``has_state`` ``(view_t, state_t, t, *args, **kwargs) -> (loss_t, new_state_t)``.
      spec: the sharing spec of the parameters (or a prefix of it), as in :func:`per_task`.
      num_tasks: K.
      has_state: see above.
      state_spec: spec of the state (e.g. ``spec["batch_stats"]`` of
        :func:`mtl_jax.recon.branch` for a state ``variables["batch_stats"]``); by default
        matched by path with ``spec`` as in :func:`per_task`.
      state_reduction, axis_name: as in :func:`per_task`. With ``unroll`` the check that a
        shared state leaf does not depend on the task stream is a data-flow analysis of task
        0's traced program (one more trace; conservative inside loops and control flow).
      unroll: call ``task_loss_fn`` once per task with ``t`` a Python int (K traced copies of
        the loss instead of one ``vmap``), for tasks whose losses differ in structure
        (heterogeneous heads, picked by ``heads[names[t]]``). XLA's common-subexpression
        elimination merges the K identical shared-prefix forwards; compile time grows with K.
        Not with ``axis_name``.
      task_specific: more task-specific leaves that are not copies, e.g. one head per task
        (each used by one task's loss only), :data:`SHARED` in ``spec``: a bool pytree (or a
        spec, or a prefix) as in :func:`task_specific_leaves`. Their K rows are summed, so each
        gets its own task's gradient ``[*shape]``, the format of :func:`mtl_jax.value_and_grads`;
        give the same labels to :func:`mtl_jax.shared_rows`.

    Returns:
      ``fn(params, *args, **kwargs) -> (losses[K], grads)``, or with ``has_state``
      ``fn(params, state, *args, **kwargs) -> ((losses[K], new_state), grads)``. When ``spec``
      has :class:`Masked` leaves, the keyword ``masks`` is ``fn``'s own (the masks as arrays,
      see :func:`split_masks`; required for mask slots), not passed to ``task_loss_fn``.

    Example::

      branched, spec = mtl.recon.branch(variables, layers, K)   # Linen, with BatchNorm
      def task_loss(params, stats, t, x, ys):
          out, new = model.apply({"params": params, "batch_stats": stats}, x,
                                 mutable=["batch_stats"])
          return jnp.mean((out - ys[t]) ** 2), new["batch_stats"]
      fn = per_task_grads(task_loss, spec["params"], K, has_state=True,
                          state_spec=spec["batch_stats"])
      (losses, stats), grads = jax.jit(fn)(branched["params"], branched["batch_stats"], x, ys)
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}.")
    if unroll and axis_name is not None:
        raise ValueError('PerTaskLosses: axis_name needs the task vmap; use task_map="vmap".')
    _reducer(state_reduction)  # validate early
    takes_masks = bool(_masked_entries(spec))

    def fn(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        _tree.check_not_variables(params, "value_and_grads(PerTaskLosses)")
        _tree.check_float_leaves(params, "value_and_grads(PerTaskLosses)")
        masks = kwargs.pop("masks", None) if takes_masks else None
        markers, leaves, treedef, batched = _task_axis_inputs(
            spec, masks, params, num_tasks, "value_and_grads(PerTaskLosses)"
        )
        if has_state:
            if not args:
                raise ValueError(
                    "value_and_grads(PerTaskLosses(has_state=True)) is called as fn(params, state, ...)."
                )
            state, args = args[0], args[1:]
            s_markers = _state_markers(state, spec, state_spec)
            s_leaves, s_treedef = jax.tree.flatten(state)
            s_batched = [
                x if m is COPIED else None for m, x in zip(s_markers, s_leaves, strict=True)
            ]
        else:
            s_batched = None
        info: dict[str, Any] = {}

        def one(batched_t: list[Any], s_batched_t: list[Any] | None, t: Any) -> Any:
            def loss_of_view(own: list[Any], shared: list[Any]) -> Any:
                view = _task_view(markers, shared, batched_t, treedef, own)
                if not has_state:
                    return _checked_loss(task_loss_fn(view, t, *args, **kwargs), False)
                state_t = s_treedef.unflatten(
                    [
                        b if m is COPIED else x
                        for m, x, b in zip(s_markers, s_leaves, s_batched_t, strict=True)
                    ]
                )
                return _checked_loss(task_loss_fn(view, state_t, t, *args, **kwargs), True)

            own = [b if m is COPIED else None for m, b in zip(markers, batched_t, strict=True)]
            shared = [None if m is COPIED else x for m, x in zip(markers, leaves, strict=True)]
            value, (g_own, g_shared) = jax.value_and_grad(
                loss_of_view, argnums=(0, 1), has_aux=has_state
            )(own, shared)
            grads = [
                go if m is COPIED else gs
                for m, go, gs in zip(markers, g_own, g_shared, strict=True)
            ]
            if not has_state:
                return value, grads
            loss, new_state = value
            rows, shared_state, split = _split_state(new_state, spec, state_spec, state_reduction)
            info.update(split)
            return (loss, rows, shared_state), grads

        row = lambda xs, t: None if xs is None else [None if x is None else x[t] for x in xs]
        if unroll:
            results = [one(row(batched, t), row(s_batched, t), t) for t in range(num_tasks)]
            if has_state:
                shared_state = results[0][0][2]  # stream-independent: every task's is the same
                results = [((v[0], v[1]), g) for v, g in results]
                if shared_state:
                    dependent = _depends_on_stream(
                        lambda r: one(r[0], r[1], 0)[0][2],
                        (row(batched, 0), row(s_batched, 0)),
                        None,
                        num_tasks,
                    )
                    if any(dependent):
                        raise _stream_dependent_error(
                            "value_and_grads(PerTaskLosses)", _shared_paths(info, dependent)
                        )
            value, grads = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
            if has_state:
                value = (*value, shared_state)
        else:
            probe = None
            if has_state:
                probe = (
                    lambda r: one(r[0], r[1], r[2])[0][2],
                    (row(batched, 0), row(s_batched, 0), jnp.zeros((), jnp.int32)),
                )
            value, grads = _map_streams(
                one,
                (batched, s_batched, jnp.arange(num_tasks)),
                num_tasks,
                axis_name,
                ((0, 0, None), 0) if has_state else 0,
                "value_and_grads(PerTaskLosses)",
                info,
                probe,
            )
        if task_specific is not None:
            labels = jax.tree.leaves(task_specific_leaves(task_specific, params))
            grads = [
                jnp.sum(g, axis=0) if lab and m is not COPIED else g
                for g, lab, m in zip(grads, labels, markers, strict=True)
            ]
        grads = treedef.unflatten(grads)
        if not has_state:
            return value, grads
        losses, rows, shared_state = value
        return (losses, _join_state(rows, shared_state, info, state_reduction)), grads

    return fn
