"""The jaxpr walk: where each parameter meets the activations, and a perturbed re-run.

The engine never asks the model how it is built: it traces the loss function once
(``jax.make_jaxpr``) and classifies every equation by what flows into it:

* **view**: a structural op on one parameter alone (``reshape``, ``transpose``,
  ``convert_element_type``, ``broadcast_in_dim``, ...): the value is still "that parameter";
* **site**: an op that combines parameter views with activations (``dot_general`` of a Dense
  layer, ``conv_general_dilated``, the ``gather`` of an embedding, LayerNorm/BatchNorm's ``mul``
  and ``add``): the output's cotangent ``delta`` and the activation inputs give this parameter's
  gradient rows (``layers.py``);
* **param_op**: a computation on parameters alone that is not a view (``exp(log_scale)``,
  ``W / |W|``, an L2 penalty): the parameter **falls back** to exact per-leaf rows;
* **opaque**: control flow (``scan``, ``while``, ``cond``), custom-derivative calls or
  multi-output primitives that take a parameter: the parameter falls back too;
* **inline**: ``jit``/``closed_call``/``checkpoint`` with a parameter among its inputs is
  walked into (its inner equations are classified the same way);
* **plain**: no parameter in its inputs (activations only).

:func:`analyze` does this once, statically, and :func:`evaluate` re-runs the jaxpr with a
perturbation ``eps`` added to every active site's output (``d losses / d eps = delta``) and the
site's activation inputs captured (TorchJD's forward hooks and backward hooks, in one trace).
Limits: the classification is by data flow, so a parameter used inside a ``scan`` (Flax
``nn.scan``), a ``while_loop`` or a ``custom_vjp`` function falls back (exact, K rows of that
leaf); the engine reports which (``engine.EnginePlan``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax.extend import core as jcore

__all__ = [
    "Analysis",
    "Derived",
    "Site",
    "analyze",
    "apply_chain",
    "bind_eqn",
    "evaluate",
    "is_literal",
]

#: Structural ops that keep "this is parameter i" (one operand, no activation).
VIEW_PRIMS = frozenset(
    {
        "convert_element_type",
        "reshape",
        "broadcast_in_dim",
        "transpose",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
        "reduce_precision",
    }
)
#: Views that are bijections of the parameter's entries (a Gram matrix over the view's entries
#: is the Gram matrix over the parameter's): what the dense identity needs.
BIJECTIVE_PRIMS = VIEW_PRIMS - {"broadcast_in_dim"}
#: Call-like primitives walked into when a parameter flows in (same semantics inlined).
INLINE_PRIMS = frozenset(
    {"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2"}
)


@dataclasses.dataclass(frozen=True)
class Derived:
    """What a jaxpr value is made of: parameter leaves, and the view ops from the one leaf
    (``chain``; ``None`` when it is not a pure view of one leaf)."""

    leaves: frozenset[int]
    chain: tuple[Any, ...] | None


@dataclasses.dataclass(frozen=True)
class Site:
    """An equation where parameter views meet activations.

    ``leaf_inputs``: ``(operand position, leaf index, view chain)`` per parameter operand;
    ``act_positions``: the operand positions of the activations (captured at run time);
    ``out_aval``: the output's abstract value (per sample in instance-wise mode).
    """

    index: int
    eqn: Any
    leaf_inputs: tuple[tuple[int, int, tuple[Any, ...]], ...]
    act_positions: tuple[int, ...]
    out_aval: Any

    @property
    def leaves(self) -> frozenset[int]:
        return frozenset(leaf for _, leaf, _ in self.leaf_inputs)

    def describe(self) -> str:
        """``'dot_general f32[64,16] x param -> f32[64,8]'``-style text for the report."""
        shapes = []
        leaf_pos = {pos for pos, _, _ in self.leaf_inputs}
        for pos, v in enumerate(self.eqn.invars):
            shapes.append("param" if pos in leaf_pos else str(v.aval.str_short()))
        return f"{self.eqn.primitive.name} {' x '.join(shapes)} -> {self.out_aval.str_short()}"


@dataclasses.dataclass
class Analysis:
    """The static result of :func:`analyze`: sites in walk order and the leaves that fall back
    (``{leaf index: reason}``)."""

    sites: list[Site] = dataclasses.field(default_factory=list)
    fallback: dict[int, str] = dataclasses.field(default_factory=dict)

    def mark(self, leaves: frozenset[int] | set[int], reason: str) -> None:
        for leaf in leaves:
            self.fallback.setdefault(leaf, reason)


def _sub_jaxpr(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """``(jaxpr, consts)`` of a call-like equation, or ``None``."""
    for name in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(name)
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, sub.consts
        if isinstance(sub, jcore.Jaxpr):
            return sub, ()
    return None


def is_literal(v: Any) -> bool:
    return isinstance(v, jcore.Literal)


def classify(eqn: Any, statuses: Sequence[Derived | None]) -> str:
    """``"plain" | "view" | "param_op" | "site" | "opaque" | "inline"`` (module docstring)."""
    derived = [s for s in statuses if s is not None]
    if not derived:
        return "plain"
    name = eqn.primitive.name
    if name in INLINE_PRIMS and _sub_jaxpr(eqn) is not None:
        return "inline"
    has_act = any(
        s is None and not is_literal(v) for v, s in zip(eqn.invars, statuses, strict=True)
    )
    if not has_act:
        if (
            name in VIEW_PRIMS
            and len(eqn.invars) == 1
            and derived[0].chain is not None
            and len(derived[0].leaves) == 1
        ):
            return "view"
        return "param_op"
    out_ok = len(eqn.outvars) == 1 and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.inexact)
    if eqn.primitive.multiple_results or not out_ok or _sub_jaxpr(eqn) is not None:
        return "opaque"
    if any(s.chain is None or len(s.leaves) != 1 for s in derived):
        return "opaque"
    if eqn.params and any(
        isinstance(p, jcore.ClosedJaxpr | jcore.Jaxpr) for p in eqn.params.values()
    ):
        return "opaque"
    return "site"


def _site_of(eqn: Any, statuses: Sequence[Derived | None], index: int) -> Site:
    leaf_inputs, acts = [], []
    for pos, (v, s) in enumerate(zip(eqn.invars, statuses, strict=True)):
        if s is not None:
            (leaf,) = s.leaves
            leaf_inputs.append((pos, leaf, s.chain))
        elif not is_literal(v):
            acts.append(pos)
    return Site(index, eqn, tuple(leaf_inputs), tuple(acts), eqn.outvars[0].aval)


def _walk_static(jaxpr: Any, in_status: Sequence[Derived | None], out: Analysis) -> list:
    """Statuses of ``jaxpr``'s outputs; sites and fallbacks recorded in ``out``."""
    env: dict[Any, Derived | None] = dict(zip(jaxpr.invars, in_status, strict=True))
    read = lambda v: None if is_literal(v) else env.get(v)
    for eqn in jaxpr.eqns:
        statuses = [read(v) for v in eqn.invars]
        kind = classify(eqn, statuses)
        derived = [s for s in statuses if s is not None]
        leaves = frozenset().union(*(s.leaves for s in derived)) if derived else frozenset()
        if kind == "plain":
            outs: list[Derived | None] = [None] * len(eqn.outvars)
        elif kind == "inline":
            sub, _ = _sub_jaxpr(eqn)
            outs = _walk_static(sub, statuses, out)
        elif kind == "view":
            outs = [Derived(derived[0].leaves, (*derived[0].chain, eqn))]
        elif kind == "param_op":
            out.mark(leaves, f"computed on before use ({eqn.primitive.name})")
            outs = [Derived(leaves, None)] * len(eqn.outvars)
        elif kind == "opaque":
            out.mark(leaves, f"enters {eqn.primitive.name} with activations (no per-layer rule)")
            outs = [None] * len(eqn.outvars)
        else:
            out.sites.append(_site_of(eqn, statuses, len(out.sites)))
            outs = [None]
        for v, s in zip(eqn.outvars, outs, strict=True):
            env[v] = s
    return [read(v) for v in jaxpr.outvars]


def analyze(closed: Any, num_leaves: int, num_losses_out: int = 1) -> Analysis:
    """Sites and fallbacks of ``closed`` (a ClosedJaxpr whose first ``num_leaves`` inputs are
    the parameter leaves and whose first ``num_losses_out`` outputs are the losses)."""
    jaxpr = closed.jaxpr
    status = [Derived(frozenset({i}), ()) for i in range(num_leaves)]
    status += [None] * (len(jaxpr.invars) - num_leaves)
    analysis = Analysis()
    outs = _walk_static(jaxpr, status, analysis)
    for s in outs[:num_losses_out]:
        if s is not None:
            analysis.mark(s.leaves, "reaches the losses without meeting an activation")
    return analysis


def bind_eqn(eqn: Any, invals: Sequence[Any]) -> Any:
    """``eqn``'s primitive applied to ``invals`` (as ``jax.core.eval_jaxpr`` does)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older jax: (subfuns, params)
        subfuns, params = params
        return eqn.primitive.bind(*subfuns, *invals, **params)
    return eqn.primitive.bind(*invals, **params)


def apply_chain(chain: Sequence[Any], value: Any) -> Any:
    """A parameter leaf through its view ops."""
    for eqn in chain:
        value = bind_eqn(eqn, [value])
    return value


def _walk_eval(
    jaxpr: Any,
    consts: Sequence[Any],
    in_vals: Sequence[Any],
    in_status: Sequence[Derived | None],
    counter: list[int],
    active: frozenset[int],
    eps: dict[int, Any],
    captured: dict[int, list[Any]],
) -> tuple[list[Any], list[Derived | None]]:
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, in_vals, strict=True))
    st: dict[Any, Derived | None] = dict(zip(jaxpr.invars, in_status, strict=True))
    read = lambda v: v.val if is_literal(v) else env[v]
    read_st = lambda v: None if is_literal(v) else st.get(v)
    for eqn in jaxpr.eqns:
        statuses = [read_st(v) for v in eqn.invars]
        kind = classify(eqn, statuses)
        invals = [read(v) for v in eqn.invars]
        derived = [s for s in statuses if s is not None]
        if kind == "inline":
            sub, sub_consts = _sub_jaxpr(eqn)
            outs, out_st = _walk_eval(
                sub, sub_consts, invals, statuses, counter, active, eps, captured
            )
        else:
            ans = bind_eqn(eqn, invals)
            outs = list(ans) if eqn.primitive.multiple_results else [ans]
            if kind == "site":
                index = counter[0]
                counter[0] += 1
                if index in active:
                    outs = [outs[0] + eps[index]]
                    captured[index] = [
                        invals[p]
                        for p, s in enumerate(statuses)
                        if s is None and not is_literal(eqn.invars[p])
                    ]
                out_st = [None]
            elif kind == "view":
                out_st = [Derived(derived[0].leaves, (*derived[0].chain, eqn))]
            elif kind == "param_op":
                leaves = frozenset().union(*(s.leaves for s in derived))
                out_st = [Derived(leaves, None)] * len(eqn.outvars)
            else:
                out_st = [None] * len(eqn.outvars)
        for v, val, s in zip(eqn.outvars, outs, out_st, strict=True):
            env[v] = val
            st[v] = s
    return [read(v) for v in jaxpr.outvars], [read_st(v) for v in jaxpr.outvars]


def evaluate(
    closed: Any,
    leaves: Sequence[Any],
    others: Sequence[Any],
    active: frozenset[int],
    eps: dict[int, Any],
) -> tuple[list[Any], dict[int, list[Any]]]:
    """Runs ``closed`` on ``leaves + others`` with ``eps[i]`` added to active site i's output.

    Returns the outputs and ``{site: [activation inputs]}`` for the active sites.
    """
    jaxpr = closed.jaxpr
    status = [Derived(frozenset({i}), ()) for i in range(len(leaves))]
    status += [None] * len(others)
    captured: dict[int, list[Any]] = {}
    outs, _ = _walk_eval(
        jaxpr, closed.consts, [*leaves, *others], status, [0], active, eps, captured
    )
    return outs, captured
