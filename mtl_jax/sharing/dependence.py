"""Which outputs of a traced program depend on the task stream: a forward data-flow pass.

Used on an error path only: when ``vmap`` cannot return a shared state leaf unbatched
(``out_axes=None``), :func:`_depends_on_stream` traces one task stream once
(``jax.make_jaxpr``, no computation) and follows the data flow from the stream's own inputs, to
name the leaves at fault. Call-like equations (jit, remat, custom_jvp/vjp) are followed inside;
any other equation with a dependent input makes all its outputs dependent (conservative), except
the pooling collectives over the task axis (``psum``, ``pmax``, ``pmin``, ``all_gather``), whose
result is the same in every stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend.core import Literal

from mtl_jax._jaxpr import call_jaxpr

__all__: list[str] = []


# Collectives over the task axis whose result is the same in every stream.
_POOLING_COLLECTIVES = ("psum", "pmax", "pmin", "all_gather")


def _dependent_outputs(jaxpr: Any, dependent_in: Sequence[bool], axis_name: Any) -> list[bool]:
    """Forward dependence: which outputs of ``jaxpr`` depend on the inputs marked ``True``.

    Call-like equations are followed inside; any other equation with a dependent input makes
    all its outputs dependent (conservative), except pooling collectives over ``axis_name``.
    """
    dep = {v for v, d in zip(jaxpr.invars, dependent_in, strict=True) if d}
    is_var = lambda v: not isinstance(v, Literal)
    for eqn in jaxpr.eqns:
        ins = [is_var(v) and v in dep for v in eqn.invars]
        if not any(ins):
            continue
        axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
        axes = axes if isinstance(axes, tuple | list) else (axes,)
        if eqn.primitive.name in _POOLING_COLLECTIVES and axis_name in axes:
            continue
        sub = call_jaxpr(eqn)
        outs = _dependent_outputs(sub[0], ins, axis_name) if sub is not None else None
        dep.update(v for i, v in enumerate(eqn.outvars) if outs is None or outs[i])
    return [is_var(v) and v in dep for v in jaxpr.outvars]


def _depends_on_stream(
    fn: Callable[[Any], list[Any]], row: Any, axis_name: Any, num_tasks: int
) -> list[bool]:
    """For each output of ``fn(row)`` (a list of arrays): does it depend on ``row``, the task
    stream's own inputs (one row of the copied leaves, masks, copied state, task index)?

    Traces ``fn`` once (``jax.make_jaxpr``) and follows the data flow; no computation."""
    env = {"axis_env": [(axis_name, num_tasks)]} if axis_name is not None else {}
    closed = jax.make_jaxpr(fn, **env)(row)
    return _dependent_outputs(closed.jaxpr, [True] * len(closed.jaxpr.invars), axis_name)
