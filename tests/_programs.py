"""What a traced or compiled program holds, read without parsing XLA's printed text.

Issue 22: checks such as ``"f32[3,3,16,16]" in compiled.as_text()`` depend on how XLA prints
HLO. These helpers read the same facts from JAX's own data structures instead:

- ``traced_shapes``: every value of the program's jaxpr (arguments and every equation's outputs,
  recursing into the sub-jaxprs of ``pjit``, ``custom_vjp_call``, ``scan``, ``cond``, ...). This is
  the program *before* XLA, so a shape absent here is absent from the compiled program too.
- ``temp_bytes``: the compiled program's scratch memory (``memory_analysis().temp_size_in_bytes``),
  for the buffers that only XLA removes (dead rows of a pullback the jaxpr still computes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.extend import core as jcore


def _sub_jaxprs(value) -> Iterator[jcore.Jaxpr]:
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, jcore.ClosedJaxpr):
            yield item.jaxpr
        elif isinstance(item, jcore.Jaxpr):
            yield item


def _jaxpr_avals(jaxpr: jcore.Jaxpr) -> Iterator[object]:
    for var in jaxpr.invars:
        yield var.aval
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            for sub in _sub_jaxprs(param):
                yield from _jaxpr_avals(sub)


def traced_shapes(fn: Callable, *args, **kwargs) -> list[tuple[int, ...]]:
    """The shape of every array value in ``jax.make_jaxpr(fn)(*args, **kwargs)``, sub-jaxprs
    included (arguments, intermediates, outputs; constants are reported by ``traced_consts``)."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return [tuple(a.shape) for a in _jaxpr_avals(closed.jaxpr) if hasattr(a, "shape")]


def _live_eqns(jaxpr: jcore.Jaxpr) -> Iterator[object]:
    """The equations an output depends on (dead code dropped, as XLA drops it: e.g. the primal
    output of a ``jax.vjp`` taken only for its pullback), and every equation inside their
    sub-jaxprs."""
    needed = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in needed for v in eqn.outvars):
            live.append(eqn)
            needed.update(v for v in eqn.invars if isinstance(v, jcore.Var))
    for eqn in reversed(live):
        yield eqn
        for param in eqn.params.values():
            for sub in _sub_jaxprs(param):
                yield from _all_eqns(sub)


def _all_eqns(jaxpr: jcore.Jaxpr) -> Iterator[object]:
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in _sub_jaxprs(param):
                yield from _all_eqns(sub)


def count_products(fn: Callable, lhs: tuple[int, ...], rhs: tuple[int, ...], *args) -> int:
    """How many live ``dot_general`` equations of ``jax.make_jaxpr(fn)(*args)`` (dead code
    dropped; sub-jaxprs of live equations included) multiply an operand whose shape is ``lhs``
    with one shaped ``rhs`` (leading axes of size 1, as a ``vmap`` over one sample adds, are
    ignored): e.g. how often a layer's forward ``x @ W`` runs."""

    def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
        while len(shape) > len(lhs) and shape[0] == 1:
            shape = shape[1:]
        return shape

    closed = jax.make_jaxpr(fn)(*args)
    return sum(
        1
        for eqn in _live_eqns(closed.jaxpr)
        if eqn.primitive.name == "dot_general"
        and squeezed(tuple(eqn.invars[0].aval.shape)) == lhs
        and tuple(eqn.invars[1].aval.shape) == rhs
    )


def traced_consts(fn: Callable, *args, **kwargs) -> list[np.ndarray]:
    """The constants the traced program closes over (what ``jit`` embeds in the program)."""
    return [np.asarray(c) for c in jax.make_jaxpr(fn)(*args, **kwargs).consts]


def largest_traced_size(fn: Callable, *args, **kwargs) -> int:
    """The element count of the largest array value in the traced program of ``fn``."""
    return max(int(np.prod(shape)) for shape in traced_shapes(fn, *args, **kwargs))


def has_task_by_task_value(shapes: list[tuple[int, ...]], num_tasks: int) -> bool:
    """Whether any value is ``[K, K, ...]`` with at least one more axis (a task-by-task Jacobian
    or activation cotangent; the ``[K, K]`` Gram matrix itself is allowed)."""
    return any(len(s) >= 3 and s[:2] == (num_tasks, num_tasks) for s in shapes)


def temp_bytes(fn: Callable, *args) -> int:
    """Scratch bytes of the compiled program: XLA's buffer assignment, not its printed text."""
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)
