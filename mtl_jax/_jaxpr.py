"""Small helpers for reading traced programs (jaxprs), shared by the analyses that walk them
(:mod:`mtl_jax.cut`, :mod:`mtl_jax.sharing.dependence`)."""

from __future__ import annotations

from typing import Any

__all__ = ["call_jaxpr"]

#: The parameter names under which a call-like equation (jit, remat, custom_jvp/vjp, core
#: calls) holds its body.
_BODY_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def call_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
    """``(jaxpr, consts)`` of a call-like equation whose body's inputs and outputs are the
    equation's own, or ``None``. ``consts`` are a closed body's constants (``None`` for each
    constant variable of an open one)."""
    for name in _BODY_PARAMS:
        sub = eqn.params.get(name)
        inner = getattr(sub, "jaxpr", sub)
        if (
            hasattr(inner, "eqns")
            and len(inner.invars) == len(eqn.invars)
            and len(inner.outvars) == len(eqn.outvars)
        ):
            return inner, list(getattr(sub, "consts", [None] * len(inner.constvars)))
    return None
