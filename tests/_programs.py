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
