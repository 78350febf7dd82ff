"""The forward of all K tasks at once: :func:`per_task`, one ``vmap`` over the task axis.

Shared leaves enter the ``vmap`` with ``in_axes=None``, copied leaves and masks with ``0``.
``vmap`` batches only what depends on batched values, so the layers before the first
task-specific leaf (the *shared prefix*) run once, unbatched, and the K task streams begin at
that leaf: Recon's semantics (Shi et al., ICLR 2023) for any model, without rewriting it
(``tests/test_sharing.py`` checks the jaxpr and the FLOP count). Mutable state follows the rules
of :mod:`mtl_jax.sharing.state`.

See ``docs/custom_loop.md``, section "Sharing specs".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from .dependence import _depends_on_stream
from .markers import COPIED, Masked
from .masks import _masked_entries
from .state import (
    StateReduction,
    _is_out_axes_error,
    _join_state,
    _reducer,
    _shared_paths,
    _split_state,
    _stream_dependent_error,
)
from .views import _masked_value, _task_axis_inputs

PyTree = Any

__all__ = ["per_task"]


def _task_view(
    markers: list[Any],
    shared: list[Any],
    batched_t: list[Any],
    treedef: Any,
    own: list[Any] | None = None,
) -> PyTree:
    """Task t's view of the parameters (one implementation for :func:`per_task` and
    ``value_and_grads(PerTaskLosses)``): shared leaves as they are, copied leaves' row t (or
    ``own``'s entry, when the copies are differentiated separately), masked ``theta * M_t``."""
    view = []
    for i, (m, x, b) in enumerate(zip(markers, shared, batched_t, strict=True)):
        if m is COPIED:
            view.append(b if own is None else own[i])
        elif isinstance(m, Masked):
            view.append(_masked_value(x, b))
        else:
            view.append(x)
    return treedef.unflatten(view)


def _map_streams(
    one: Callable[..., Any],
    inputs: tuple[Any, ...],
    num_tasks: int,
    axis_name: str | None,
    out_axes: Any,
    where: str,
    info: dict[str, Any],
    shared_state_of_row: tuple[Callable[[Any], Any], Any] | None,
) -> Any:
    """``jax.vmap(one)`` over the K task streams. With state (``shared_state_of_row`` given:
    a function of one stream's inputs returning its shared state, and task 0's inputs), a
    shared state leaf that ``vmap`` cannot return unbatched is the error naming the leaves."""
    mapped = jax.vmap(one, axis_size=num_tasks, axis_name=axis_name, out_axes=out_axes)
    if shared_state_of_row is None:
        return mapped(*inputs)
    try:
        return mapped(*inputs)
    except ValueError as err:
        if not _is_out_axes_error(err):
            raise
        fn, row = shared_state_of_row
        dependent = _depends_on_stream(fn, row, axis_name, num_tasks)
        raise _stream_dependent_error(where, _shared_paths(info, dependent)) from err


def per_task(
    apply_fn: Callable[..., Any],
    spec: PyTree,
    num_tasks: int,
    *,
    has_state: bool = False,
    state_spec: PyTree | None = None,
    state_reduction: StateReduction = None,
    axis_name: str | None = None,
) -> Callable[..., Any]:
    """The forward of all K tasks at once: ``vmap`` of ``apply_fn`` over the task axis.

    ``fn(params, *args, **kwargs)`` calls ``apply_fn(view_t, *args, **kwargs)`` for every task t
    under one ``jax.vmap`` (``axis_size=K``), where ``view_t`` takes shared leaves as they are
    (``in_axes=None``: not batched), copied leaves' row t (``in_axes=0``) and masked leaves as
    ``theta * M_t`` (the mask is batched, theta is not). ``args``/``kwargs`` (the input batch,
    flags such as ``train=True``) are the same for every task.

    Because ``vmap`` batches only values that depend on batched inputs, the layers before the
    first task-specific leaf run once and the task streams start there.

    Works with any pure apply: Flax Linen (``model.apply`` on variables), Flax NNX
    (``lambda state, x: nnx.merge(graphdef, state)(x)``), Equinox or plain JAX. ``fn`` is
    jit-able; ``spec`` is a constant of the trace, and so are the masks it holds. Give a spec
    with mask slots (:func:`split_masks`) and the masks at call time, ``fn(params, *args,
    masks=masks, **kwargs)``, to make them arguments of the program instead.

    Args:
      apply_fn: ``(params, *args, **kwargs) -> out`` or, with ``has_state``, ``-> (out, state)``
        (Linen's ``mutable=["batch_stats"]`` convention).
      spec: the sharing spec (or a prefix) for ``params``; see ``docs/custom_loop.md``.
      num_tasks: K.
      has_state: whether ``apply_fn`` returns ``(out, state)``; the state is then handled as
        described in :mod:`mtl_jax.sharing.state`: copied leaves keep their K rows, shared
        leaves come out of the ``vmap`` unbatched (``out_axes=None``), exactly.
      state_spec: spec of the returned state; by default each state leaf takes the marker of the
        spec leaf at the same path (a leading Flax collection ignored on both sides; or the
        unique spec leaf whose path ends with it on whole components), :data:`SHARED` when
        there is none.
      state_reduction: ``None`` (default): a shared state leaf computed inside the task streams
        (after the branch) is an error at trace time, naming the leaves; ``"mean"`` or a
        callable ``x[K, ...] -> x[...]`` reduces every shared state leaf over the task axis on
        purpose (today's averaging; ``"mean"`` is exact when the rows agree).
      axis_name: name of the task axis inside ``apply_fn`` (for collectives, e.g. a BatchNorm
        with ``axis_name`` pooling statistics over the task streams: its statistics are the same
        in every stream, so they stay shared without an error).

    Returns:
      ``fn(params, *args, **kwargs) -> outs`` (every leaf ``[K, ...]``), or ``(outs, state)``.
      When ``spec`` has :class:`Masked` leaves, the keyword ``masks`` is ``fn``'s own (the masks
      as arrays, see :func:`split_masks`; required for mask slots) and is not passed to
      ``apply_fn``.

    Raises:
      ValueError: (at trace time) if ``spec`` does not match ``params`` or K disagrees, the
        masks do not match the spec, or (``state_reduction=None``) a shared state leaf depends on
        the task stream, naming the leaves.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1; got {num_tasks}.")
    _reducer(state_reduction)  # validate early
    takes_masks = bool(_masked_entries(spec))

    def fn(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        masks = kwargs.pop("masks", None) if takes_masks else None
        markers, leaves, treedef, batched = _task_axis_inputs(
            spec, masks, params, num_tasks, "per_task"
        )
        info: dict[str, Any] = {}

        def one(batched_t: list[Any]) -> Any:
            out = apply_fn(_task_view(markers, leaves, batched_t, treedef), *args, **kwargs)
            if not has_state:
                return out
            if not (isinstance(out, tuple) and len(out) == 2):
                raise ValueError(
                    "per_task(..., has_state=True) needs apply_fn to return (out, state); got "
                    f"{type(out).__name__}."
                )
            rows, shared, split = _split_state(out[1], spec, state_spec, state_reduction)
            info.update(split)
            return out[0], rows, shared

        if not has_state:
            return _map_streams(one, (batched,), num_tasks, axis_name, 0, "per_task", info, None)
        row = jax.tree.map(lambda x: x[0], batched)
        outs, rows, shared = _map_streams(
            one,
            (batched,),
            num_tasks,
            axis_name,
            (0, 0, None),
            "per_task",
            info,
            (lambda b: one(b)[2], row),
        )
        return outs, _join_state(rows, shared, info, state_reduction)

    return fn
