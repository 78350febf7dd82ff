"""Where a loss vector's tasks separate: the cut behind the loss-vector path of
:func:`mtl_jax.value_and_grads` (issue 25).

A loss-vector function ``losses[K] = loss_fn(params, ...)`` is traced once (``jax.make_jaxpr``,
``jit`` calls inlined) and every value ``v`` of the program gets an **influence label**, read
backwards from the output (``losses`` has ``Axis(0, (0, ..., K-1))``):

* ``Task(t)``: ``v`` influences ``loss_t`` only;
* ``Axis(a, tasks)``: slice ``j`` of ``v`` along axis ``a`` influences ``loss_{tasks[j]}`` only
  (``None``: no loss), e.g. the activations of K stacked heads under one ``vmap``;
* ``MIXED``: ``v`` may influence several losses (the trunk);
* ``None``: ``v`` influences no loss.

The labels come from per-primitive rules (elementwise ops, ``dot_general``, broadcasts,
reductions, transposes, reshapes, slices, ``gather``, ``concatenate`` / ``stack``, and the
inside of ``custom_jvp`` / ``custom_vjp`` / ``remat`` calls); any other primitive gives its
inputs the union of its outputs' tasks, which is sound (a superset of the true influence) and
only ever moves the cut later. Parameters labelled ``MIXED`` are the **trunk**; the **cut** is
the set of trunk values (or trunk leaves) consumed by an equation whose output is separable (an
**entry**). Then, exactly:

1. one forward of the trunk (``jax.vjp``) up to the cut values;
2. one forward of the rest and ONE backward of the all-ones cotangent: every task-specific
   leaf's gradient, and at each entry's output the cotangent whose task-``k`` part is
   ``d loss_k / d out`` (only task k's part of ``out`` reaches ``loss_k``);
3. at each entry, ``d loss_k / d cut`` for every k: a ``Task(t)`` entry's ordinary VJP is row
   t; an ``Axis`` entry of an elementwise / ``dot_general`` / broadcast / reduction / transpose /
   reshape primitive runs its VJP on task k's slice under one ``vmap`` over the tasks (as
   :class:`mtl_jax.TrunkAndHeads` does for ``d loss_k / d z``: cost of one backward of that
   equation, no ``[K, K, ...]``); any other ``Axis`` entry pulls back the K masked cotangents
   (K times that one equation's VJP: exact, the old cost for that equation only);
4. K pullbacks of the trunk alone from ``d loss_k / d cut``: the shared leaves' rows.

Shared leaves that are separable (a head leaf with ``task_specific=None``, a shared layer
inside each task stream that the analysis places after the cut) get their rows from the
all-ones gradient, task k's part in row k. Departures: custom derivative rules
(``custom_jvp`` / ``custom_vjp``) are assumed to respect their primal's data flow (a rule that
sends task j's cotangent to task k's inputs would be mislabelled); control flow (``scan``,
``while``, ``cond``) is opaque (its inputs take the union of its outputs' tasks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from mtl_jax._jaxpr import call_jaxpr

__all__ = [
    "MIXED",
    "Axis",
    "Cut",
    "Separated",
    "Task",
    "describe_cut",
    "find_cut",
    "loss_vector_grads",
    "separate_at",
]


# ---------------------------------------------------------------------------------------------
# Labels.


@dataclasses.dataclass(frozen=True)
class Task:
    """The whole value influences ``loss_task`` only."""

    task: int


@dataclasses.dataclass(frozen=True)
class Axis:
    """Slice ``j`` along ``axis`` influences ``loss_{tasks[j]}`` only (``None``: no loss)."""

    axis: int
    tasks: tuple[int | None, ...]


MIXED = "mixed"  # may influence several losses
Label = Task | Axis | str | None


def _task_set(label: Label) -> set[int]:
    if isinstance(label, Task):
        return {label.task}
    if isinstance(label, Axis):
        return {t for t in label.tasks if t is not None}
    return set()


def _whole(tasks: Sequence[int | None]) -> Label:
    """The label of a value that reaches every slice of an output labelled ``tasks``."""
    found = {t for t in tasks if t is not None}
    if not found:
        return None
    return Task(found.pop()) if len(found) == 1 else MIXED


def _join(a: Label, b: Label) -> Label:
    """The label of a value with two consumers (sound: the union of their influences)."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if a == MIXED or b == MIXED:
        return MIXED
    if isinstance(a, Axis) and isinstance(b, Axis) and a.axis == b.axis:
        merged = []
        for s, t in zip(a.tasks, b.tasks, strict=True):
            if s is not None and t is not None and s != t:
                return MIXED
            merged.append(s if s is not None else t)
        return Axis(a.axis, tuple(merged))
    tasks = _task_set(a) | _task_set(b)
    return Task(tasks.pop()) if len(tasks) == 1 else MIXED


def _separable_task(label: Label) -> int | None:
    """``t`` when ``label`` reaches one task only (``Task(t)`` or an ``Axis`` of one task)."""
    tasks = _task_set(label)
    return next(iter(tasks)) if len(tasks) == 1 else None


# ---------------------------------------------------------------------------------------------
# The program as a flat graph of equations (jit calls inlined).


@dataclasses.dataclass
class _Op:
    eqn: Any  # the jaxpr equation: primitive and params
    ins: list[int | Literal]
    outs: list[int]


@dataclasses.dataclass
class _Graph:
    avals: list[Any] = dataclasses.field(default_factory=list)
    ops: list[_Op] = dataclasses.field(default_factory=list)
    consts: dict[int, Any] = dataclasses.field(default_factory=dict)

    def new(self, aval: Any) -> int:
        self.avals.append(aval)
        return len(self.avals) - 1

    def aval(self, atom: int | Literal) -> Any:
        return atom.aval if isinstance(atom, Literal) else self.avals[atom]


_INLINED = ("pjit", "jit", "closed_call", "core_call")


def _flatten(
    graph: _Graph, jaxpr: Any, ins: Sequence[int | Literal], consts: Sequence[Any] = ()
) -> list[int | Literal]:
    """Appends ``jaxpr``'s equations to ``graph`` (inputs ``ins``); returns its outputs."""
    env: dict[Any, int | Literal] = dict(zip(jaxpr.invars, ins, strict=True))
    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = graph.new(var.aval)
        graph.consts[env[var]] = value
    read = lambda v: v if isinstance(v, Literal) else env[v]
    for eqn in jaxpr.eqns:
        ins_e = [read(v) for v in eqn.invars]
        sub = eqn.params.get("jaxpr") if eqn.primitive.name in _INLINED else None
        if sub is not None and hasattr(sub, "consts"):
            outs = _flatten(graph, sub.jaxpr, ins_e, sub.consts)
        else:
            outs = [graph.new(v.aval) for v in eqn.outvars]
            graph.ops.append(_Op(eqn, ins_e, outs))
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


_CALLS = ("custom_jvp_call", "custom_vjp_call", "remat2", "checkpoint", *_INLINED)


def _sub_jaxpr(eqn: Any) -> Any:
    """``(jaxpr, consts)`` of a call-like equation (:data:`_CALLS`) whose inputs and outputs
    are its own."""
    return call_jaxpr(eqn) if eqn.primitive.name in _CALLS else None


# ---------------------------------------------------------------------------------------------
# Backward label rules.

_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag
    integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow
    real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan
    tanh xor""".split()
)
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax "
    "argmin".split()
)
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())


def _elementwise_rule(in_shapes, out_shape, label: Axis) -> list[Label]:
    out = []
    for shape in in_shapes:
        same = len(shape) == len(out_shape) and shape[label.axis] == out_shape[label.axis]
        out.append(label if same else _whole(label.tasks))
    return out


def _keep_axis(kept: Sequence[int], label: Axis) -> Axis:
    return Axis(kept[label.axis], label.tasks)


def _dot_general_rule(eqn, in_shapes, label: Axis) -> list[Label]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_free = [i for i in range(len(in_shapes[0])) if i not in (*lc, *lb)]
    rhs_free = [i for i in range(len(in_shapes[1])) if i not in (*rc, *rb)]
    a, nb, whole = label.axis, len(lb), _whole(label.tasks)
    if a < nb:
        return [Axis(lb[a], label.tasks), Axis(rb[a], label.tasks)]
    if a < nb + len(lhs_free):
        return [Axis(lhs_free[a - nb], label.tasks), whole]
    return [whole, Axis(rhs_free[a - nb - len(lhs_free)], label.tasks)]


def _reshape_axis(in_shape, out_shape, axis: int) -> int | None:
    """The input axis that output ``axis`` of a reshape is, unchanged, or ``None``."""
    before = math.prod(out_shape[:axis])
    for i, size in enumerate(in_shape):
        if size == out_shape[axis] and math.prod(in_shape[:i]) == before:
            return i
    return None


def _selected(size: int, start: int, stop: int, stride: int, tasks) -> tuple:
    """Input-axis labels of a slice ``start:stop:stride`` whose output slices have ``tasks``."""
    out: list[int | None] = [None] * size
    for j, i in enumerate(range(start, stop, stride)):
        out[i] = tasks[j]
    return tuple(out)


def _slice_rule(eqn, in_shape, out_shape, label: Label) -> Label:
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(in_shape)
    full = [
        start[i] == 0 and limit[i] == in_shape[i] and strides[i] == 1 for i in range(len(in_shape))
    ]
    if isinstance(label, Task):  # z[t]: one axis sliced, the rest whole
        partial = [i for i, f in enumerate(full) if not f]
        if len(partial) != 1:
            return label
        p = partial[0]
        tasks = (label.task,) * out_shape[p]
        return Axis(p, _selected(in_shape[p], start[p], limit[p], strides[p], tasks))
    a = label.axis
    return Axis(a, _selected(in_shape[a], start[a], limit[a], strides[a], label.tasks))


def _gather_rule(eqn, in_shapes, out_shape, label: Axis) -> list[Label]:
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    whole, a = _whole(label.tasks), label.axis
    if a in dn.offset_dims:
        offset_axes = [
            i
            for i in range(len(in_shapes[0]))
            if i not in dn.collapsed_slice_dims and i not in dn.operand_batching_dims
        ]
        axis = offset_axes[dn.offset_dims.index(a)]
        ok = sizes[axis] == in_shapes[0][axis] and axis not in dn.start_index_map
        return [Axis(axis, label.tasks) if ok else whole, whole]
    batch_positions = [i for i in range(len(out_shape)) if i not in dn.offset_dims]
    index_axis = batch_positions.index(a)
    if index_axis in dn.start_indices_batching_dims:
        j = dn.start_indices_batching_dims.index(index_axis)
        return [Axis(dn.operand_batching_dims[j], label.tasks), Axis(index_axis, label.tasks)]
    return [whole, Axis(index_axis, label.tasks)]


def _concatenate_rule(eqn, in_shapes, label: Axis) -> list[Label]:
    if eqn.params["dimension"] != label.axis:
        return [label] * len(in_shapes)
    out, offset = [], 0
    for shape in in_shapes:
        n = shape[label.axis]
        out.append(Axis(label.axis, label.tasks[offset : offset + n]))
        offset += n
    return out


def _stack_rule(eqn, n: int, label: Axis) -> list[Label]:
    axis = eqn.params["axis"]
    if axis == label.axis:
        return [None if t is None else Task(t) for t in label.tasks]
    return [Axis(label.axis - (label.axis > axis), label.tasks)] * n


def _input_labels(graph: _Graph, op: _Op, out_labels: list[Label]) -> list[Label]:
    """The influence label of each input of ``op``, given its outputs' labels (sound)."""
    eqn, name = op.eqn, op.eqn.primitive.name
    n = len(op.ins)
    sub = _sub_jaxpr(eqn)
    if sub is not None and any(lab is not None for lab in out_labels):
        return _call_input_labels(graph, op, sub, out_labels)
    label: Label = None
    for lab in out_labels:
        label = _join(label, lab)
    in_shapes = [tuple(graph.aval(x).shape) for x in op.ins]
    if name == "slice" and isinstance(label, Task | Axis):
        return [_slice_rule(eqn, in_shapes[0], tuple(graph.avals[op.outs[0]].shape), label)]
    if not isinstance(label, Axis):
        return [label] * n
    out_shape = tuple(graph.avals[op.outs[0]].shape)
    a, whole = label.axis, _whole(label.tasks)
    if name in _ELEMENTWISE:
        return _elementwise_rule(in_shapes, out_shape, label)
    if name == "broadcast_in_dim":
        dims = eqn.params["broadcast_dimensions"]
        rest = [whole] * (n - 1)
        if a in dims and in_shapes[0][dims.index(a)] == out_shape[a]:
            return [Axis(dims.index(a), label.tasks), *rest]
        return [whole, *rest]
    if name == "transpose":
        return [Axis(eqn.params["permutation"][a], label.tasks)]
    if name in _REDUCTIONS:
        axes = eqn.params["axes"]
        kept = [i for i in range(len(in_shapes[0])) if i not in axes]
        return [_keep_axis(kept, label)] + [whole] * (n - 1)
    if name in _CUMULATIVE:
        return [label if eqn.params["axis"] != a else whole]
    if name == "squeeze":
        dims = eqn.params["dimensions"]
        return [_keep_axis([i for i in range(len(in_shapes[0])) if i not in dims], label)]
    if name == "reshape" and eqn.params.get("dimensions") is None:
        axis = _reshape_axis(in_shapes[0], out_shape, a)
        return [whole if axis is None else Axis(axis, label.tasks)] + [whole] * (n - 1)
    if name == "dot_general":
        return _dot_general_rule(eqn, in_shapes, label)
    if name == "concatenate":
        return _concatenate_rule(eqn, in_shapes, label)
    if name == "stack":
        return _stack_rule(eqn, n, label)
    if name == "gather":
        return _gather_rule(eqn, in_shapes, out_shape, label)
    if name == "dynamic_slice":
        ok = eqn.params["slice_sizes"][a] == in_shapes[0][a]
        return [label if ok else whole] + [whole] * (n - 1)
    return [whole] * n


def _call_input_labels(graph: _Graph, op: _Op, sub, out_labels: list[Label]) -> list[Label]:
    """Labels of a call's inputs from inside its jaxpr (custom_jvp / custom_vjp / remat)."""
    jaxpr, consts = sub
    inner = _Graph()
    ins = [inner.new(v.aval) for v in jaxpr.invars]
    outs = _flatten(inner, jaxpr, ins, consts)
    labels = _labels(inner, outs, out_labels)
    return [labels.get(i) for i in ins]


def _labels(graph: _Graph, outs: Sequence[int | Literal], out_labels: Sequence[Label]) -> dict:
    """Every value's influence label, read backwards from the outputs' labels."""
    labels: dict[int, Label] = {}
    for atom, lab in zip(outs, out_labels, strict=True):
        if not isinstance(atom, Literal):
            labels[atom] = _join(labels.get(atom), lab)
    for op in reversed(graph.ops):
        out_labels_op = [labels.get(o) for o in op.outs]
        if all(lab is None for lab in out_labels_op):
            continue
        for atom, lab in zip(op.ins, _input_labels(graph, op, out_labels_op), strict=True):
            if not isinstance(atom, Literal):
                labels[atom] = _join(labels.get(atom), lab)
    return labels


# ---------------------------------------------------------------------------------------------
# The plan: trunk, cut, entries.


_SLICEABLE = _ELEMENTWISE | _REDUCTIONS | {"dot_general", "broadcast_in_dim", "transpose"}
_SLICEABLE |= {"squeeze", "reshape"}


@dataclasses.dataclass
class _Entry:
    op: _Op
    label: Label  # the join of its outputs' labels (separable)
    cut_ins: list[int]  # positions of its inputs that are cut values
    kind: str  # "task": one task; "sliced": vmap over task slices; "masked": K masked VJPs
    in_labels: list[Label]
    out_labels: list[Label]


@dataclasses.dataclass
class _Plan:
    graph: _Graph
    leaves: list[int]
    losses: int | Literal
    aux: list[int | Literal]
    labels: dict
    trunk_leaves: list[int]  # positions in ``leaves``
    trunk_ops: list[_Op]
    rest_ops: list[_Op]
    cut: list[int]
    crossing: list[int]  # other values the rest reads from the trunk side
    entries: list[_Entry]
    num_tasks: int


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _entry_kind(op: _Op, label: Label, in_labels: list[Label]) -> str:
    if _separable_task(label) is not None:
        return "task"
    if op.eqn.primitive.name not in _SLICEABLE or len(op.outs) != 1 or not isinstance(label, Axis):
        return "masked"
    axes = [lab for lab in in_labels if isinstance(lab, Axis)]
    if not axes or any(lab.tasks != label.tasks for lab in axes):
        return "masked"
    if op.eqn.primitive.name == "reshape" and not isinstance(in_labels[0], Axis):
        return "masked"
    return "sliced"


def _plan(closed: Any, num_leaves: int, has_aux: bool) -> _Plan:
    graph = _Graph()
    leaves = [graph.new(v.aval) for v in closed.jaxpr.invars[:num_leaves]]
    outs = _flatten(graph, closed.jaxpr, leaves, closed.consts)
    losses, aux = outs[0], outs[1:] if has_aux else []
    num_tasks = int(graph.aval(losses).shape[0])
    labels = _labels(graph, [losses], [Axis(0, tuple(range(num_tasks)))])
    trunk_leaves = [i for i, leaf in enumerate(leaves) if labels.get(leaf) == MIXED]
    # values that depend on a trunk leaf, forward
    trunk_dep = {leaves[i] for i in trunk_leaves}
    for op in graph.ops:
        if any(not isinstance(x, Literal) and x in trunk_dep for x in op.ins):
            trunk_dep.update(op.outs)
    in_trunk = []
    for op in graph.ops:
        joined: Label = None
        for o in op.outs:
            joined = _join(joined, labels.get(o))
        in_trunk.append(joined == MIXED and any(o in trunk_dep for o in op.outs))
    # the trunk side also computes the trunk-free values its equations read (inputs, constants)
    needed: set[int] = set()
    trunk_side = [False] * len(graph.ops)
    for idx in reversed(range(len(graph.ops))):
        op = graph.ops[idx]
        if in_trunk[idx] or (any(o in needed for o in op.outs) and not trunk_dep & set(op.outs)):
            trunk_side[idx] = True
            needed.update(x for x in op.ins if not isinstance(x, Literal))
    trunk_ops = [op for op, t in zip(graph.ops, trunk_side, strict=True) if t]
    rest_ops = [op for op, t in zip(graph.ops, trunk_side, strict=True) if not t]
    trunk_values = {o for op in trunk_ops for o in op.outs} | {leaves[i] for i in trunk_leaves}
    cut: list[int] = []
    crossing: list[int] = []
    entries: list[_Entry] = []

    def add_crossing(x: Any, differentiable: bool) -> None:
        """A trunk value read by the rest: differentiated (cut) once an entry reads it."""
        if isinstance(x, Literal) or x not in trunk_values or x in cut:
            return
        if differentiable and x in trunk_dep and _is_float(graph.avals[x]):
            cut.append(x)
        elif x not in crossing:
            crossing.append(x)

    for op in rest_ops:
        label: Label = None
        for o in op.outs:
            label = _join(label, labels.get(o))
        cut_ins = []
        for pos, x in enumerate(op.ins):
            add_crossing(x, label is not None)
            if not isinstance(x, Literal) and x in cut:
                cut_ins.append(pos)
        if cut_ins:
            out_labels = [labels.get(o) for o in op.outs]
            in_labels = _input_labels(graph, op, out_labels)
            kind = _entry_kind(op, label, in_labels)
            entries.append(_Entry(op, label, cut_ins, kind, in_labels, out_labels))
    add_crossing(losses, True)
    for x in aux:
        add_crossing(x, False)
    crossing = [x for x in crossing if x not in cut]
    return _Plan(
        graph,
        leaves,
        losses,
        list(aux),
        labels,
        trunk_leaves,
        trunk_ops,
        rest_ops,
        cut,
        crossing,
        entries,
        num_tasks,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation.


def _bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    params = eqn.primitive.get_bind_params(eqn.params)  # as jax.core.eval_jaxpr
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _read(env: dict, atom: int | Literal) -> Any:
    return atom.val if isinstance(atom, Literal) else env[atom]


def _run(ops: Sequence[_Op], env: dict, probes: dict | None = None) -> None:
    """Evaluates ``ops`` into ``env``; an entry's float outputs get ``+ probe`` (zeros whose
    cotangent is the entry output's)."""
    for op in ops:
        outs = _bind(op.eqn, [_read(env, x) for x in op.ins])
        if probes is not None and id(op) in probes:
            outs = [o if p is None else o + p for o, p in zip(outs, probes[id(op)], strict=True)]
        env.update(zip(op.outs, outs, strict=True))


def _row_mask(label: Label, k: Any, shape: tuple, dtype: Any) -> Any:
    """1 where ``label`` says the value reaches ``loss_k``, else 0 (broadcast to ``shape``)."""
    if isinstance(label, Task):
        return (k == label.task).astype(dtype)
    if isinstance(label, Axis):
        tasks = np.array([-1 if t is None else t for t in label.tasks])
        bshape = [1] * len(shape)
        bshape[label.axis] = len(tasks)
        return (jnp.asarray(tasks).reshape(bshape) == k).astype(dtype)
    return jnp.zeros((), dtype)


def _rows_of_gradient(grad: Any, label: Label, num_tasks: int) -> Any:
    """Rows ``[K, ...]`` of a separable value whose all-ones gradient is ``grad``."""
    return jax.vmap(lambda k: grad * _row_mask(label, k, grad.shape, grad.dtype))(
        jnp.arange(num_tasks)
    )


def _sliced_vjp(entry: _Entry, invals: list[Any], ct: Any) -> dict[int, Any]:
    """``d loss_{tasks[j]} / d cut`` for every slice j of an ``Axis`` entry: its VJP on task
    slice j, under one ``vmap`` over the slices (size-1 slices keep the primitive's shapes)."""
    label = entry.label
    eqn = entry.op.eqn
    batched = [isinstance(lab, Axis) for lab in entry.in_labels]
    in_axes = [lab.axis if isinstance(lab, Axis) else None for lab in entry.in_labels]
    params = dict(eqn.params)
    for key in ("shape", "new_sizes"):
        if key in params:
            sizes = list(params[key])
            sizes[label.axis] = 1
            params[key] = tuple(sizes)
    sliced = eqn.replace(params=params)

    def one(mapped: list[Any], ct_j: Any) -> list[Any]:
        full = [
            jnp.expand_dims(m, ax) if b else x
            for m, x, b, ax in zip(mapped, invals, batched, in_axes, strict=True)
        ]

        def at_cut(*cut_vals: Any) -> Any:
            args = list(full)
            for pos, v in zip(entry.cut_ins, cut_vals, strict=True):
                args[pos] = v
            return _bind(sliced, args)[0]

        _, pull = jax.vjp(at_cut, *[full[p] for p in entry.cut_ins])
        grads = pull(jnp.expand_dims(ct_j, label.axis))
        return [
            jnp.squeeze(g, in_axes[p]) if batched[p] else g
            for g, p in zip(grads, entry.cut_ins, strict=True)
        ]

    mapped = [x if b else None for x, b in zip(invals, batched, strict=True)]
    vm_axes = [ax if b else None for ax, b in zip(in_axes, batched, strict=True)]
    per_slice = jax.vmap(one, in_axes=(vm_axes, label.axis))(mapped, ct)
    out = {}
    for g, pos in zip(per_slice, entry.cut_ins, strict=True):
        if batched[pos]:  # a cut value with the task axis: slice j back in place
            ax, size = in_axes[pos], invals[pos].shape[in_axes[pos]]
            eye = jnp.eye(size, dtype=g.dtype).reshape(
                (size,) + (1,) * ax + (size,) + (1,) * (g.ndim - 1 - ax)
            )
            g = jnp.expand_dims(g, 1 + ax) * eye
        out[pos] = g
    return out


def _entry_rows(entry: _Entry, invals: list[Any], cts: list[Any], num_tasks: int) -> dict:
    """``{input position: rows [K, *shape]}``: ``d loss_k / d cut value`` through this entry."""
    op = entry.op

    def vjp_at(cotangents: list[Any]) -> list[Any]:
        def at_cut(*cut_vals: Any) -> list[Any]:
            args = list(invals)
            for pos, v in zip(entry.cut_ins, cut_vals, strict=True):
                args[pos] = v
            return [o for o, c in zip(_bind(op.eqn, args), cts, strict=True) if c is not None]

        _, pull = jax.vjp(at_cut, *[invals[p] for p in entry.cut_ins])
        return list(pull([c for c in cotangents if c is not None]))

    task = _separable_task(entry.label)
    if entry.kind == "task":
        grads = vjp_at(cts)
        rows = {}
        for g, pos in zip(grads, entry.cut_ins, strict=True):
            rows[pos] = jnp.zeros((num_tasks, *g.shape), g.dtype).at[task].set(g)
        return rows
    if entry.kind == "sliced":
        tasks = entry.label.tasks
        out = {}
        for pos, g in _sliced_vjp(entry, invals, cts[0]).items():
            if tasks == tuple(range(num_tasks)):
                out[pos] = g
            else:
                keep = [j for j, t in enumerate(tasks) if t is not None]
                idx = jnp.asarray([tasks[j] for j in keep])
                zeros = jnp.zeros((num_tasks, *g.shape[1:]), g.dtype)
                out[pos] = zeros.at[idx].add(g[jnp.asarray(keep)])
        return out

    def row(k: Any) -> list[Any]:  # masked: task k's part of every output's cotangent
        return vjp_at(
            [
                None if c is None else c * _row_mask(lab, k, c.shape, c.dtype)
                for c, lab in zip(cts, entry.out_labels, strict=True)
            ]
        )

    grads = jax.vmap(row)(jnp.arange(num_tasks))
    return dict(zip(entry.cut_ins, grads, strict=True))


# ---------------------------------------------------------------------------------------------
# The gradient function.


def loss_vector_grads(
    split_loss: Callable[..., Any],
    leaves: Sequence[Any],
    specific: Sequence[bool],
    has_aux: bool,
    map_rows: Callable[[Callable, Any], Any],
    check: Callable[[Any], None] = lambda losses: None,
) -> tuple[Any, list[Any], Any]:
    """``(losses, grads, aux)`` of ``split_loss(leaves) -> losses[K]`` (or ``(losses, aux)``):
    rows ``[K, *shape]`` for the leaves not marked ``specific``, the all-ones gradient for the
    others. ``map_rows(pullback, cotangents)`` maps the trunk's K pullbacks (``task_map``);
    ``check`` sees the losses' shape and dtype (a ``jax.ShapeDtypeStruct``) first."""
    leaves = list(leaves)
    closed, out_shape = jax.make_jaxpr(split_loss, return_shape=True)(leaves)
    check(out_shape[0] if has_aux else out_shape)
    plan = _plan(closed, len(leaves), has_aux)
    return _evaluate(plan, leaves, specific, has_aux, out_shape, map_rows)


@dataclasses.dataclass
class Separated:
    """A loss vector split at its cut, after the forward and the all-ones backward.

    ``losses``: ``[K]``; ``aux``: the loss function's aux (or ``None``); ``trunk_leaves``:
    positions of the leaves the K rows are needed for (labelled ``MIXED``); ``head_grads``:
    ``{position: gradient}`` of every other leaf from the ONE all-ones backward (a leaf of one
    task gets its task's gradient); ``head_labels``: their influence labels;
    ``cotangents``: ``[K, *cut value]`` per cut value, row k = ``d loss_k / d cut``;
    ``pull_trunk`` is the trunk's VJP at the forward's point (``None`` when the caller ran the
    trunk, :func:`separate_at`'s ``forward``)."""

    losses: Any
    aux: Any
    trunk_leaves: list[int]
    head_grads: dict[int, Any]
    head_labels: dict[int, Label]
    cotangents: list[Any]
    pull_trunk: Callable[[list[Any]], Any] | None
    num_tasks: int


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where ``split_loss(leaves)`` separates (:func:`find_cut`); ``trunk_leaves``: positions of
    the leaves before the cut, ``num_tasks``: K."""

    plan: _Plan
    out_shape: Any
    has_aux: bool

    @property
    def trunk_leaves(self) -> list[int]:
        return list(self.plan.trunk_leaves)

    @property
    def num_tasks(self) -> int:
        return self.plan.num_tasks


def find_cut(
    split_loss: Callable[..., Any],
    leaves: Sequence[Any],
    has_aux: bool,
    check: Callable[[Any], None] = lambda losses: None,
) -> Cut | None:
    """The analysis of the module docstring for ``split_loss(leaves) -> losses[K]``; ``None``
    when it finds no cut (nothing after the trunk is separable by task)."""
    closed, out_shape = jax.make_jaxpr(split_loss, return_shape=True)(list(leaves))
    check(out_shape[0] if has_aux else out_shape)
    plan = _plan(closed, len(leaves), has_aux)
    return Cut(plan, out_shape, has_aux) if plan.cut else None


#: ``forward(trunk, trunk_vals) -> (cut values, crossing values)``: the trunk's forward run the
#: caller's way (the Gramian engine's, which also keeps what its K pullbacks need).
TrunkForward = Callable[[Callable[[list[Any]], Any], list[Any]], tuple[list[Any], list[Any]]]


def separate_at(cut: Cut, leaves: Sequence[Any], forward: TrunkForward | None = None) -> Separated:
    """Steps 1-3 of the module docstring at a :class:`Cut` found for these leaves' shapes: the
    trunk by ``jax.vjp`` (``pull_trunk`` for the K pullbacks), or by the caller's ``forward``."""
    return _separate(cut.plan, list(leaves), cut.has_aux, cut.out_shape, forward)


def _separate(plan: _Plan, leaves, has_aux, out_shape, forward=None) -> Separated:
    graph, num = plan.graph, plan.num_tasks
    trunk_pos = plan.trunk_leaves
    head_pos = [i for i in range(len(leaves)) if i not in trunk_pos]
    const_env = dict(graph.consts)

    def trunk_and_crossing(trunk_vals: list[Any]) -> Any:
        env = dict(const_env)
        env.update((plan.leaves[i], v) for i, v in zip(trunk_pos, trunk_vals, strict=True))
        _run(plan.trunk_ops, env)
        return [env[c] for c in plan.cut], [env[c] for c in plan.crossing]

    trunk_vals = [leaves[i] for i in trunk_pos]
    if forward is not None:
        (cut_vals, crossing_vals), pull_trunk = forward(trunk_and_crossing, trunk_vals), None
    else:
        cut_vals, pull_trunk, crossing_vals = jax.vjp(trunk_and_crossing, trunk_vals, has_aux=True)
    entries = plan.entries
    probe_ops = {
        id(e.op): [
            jnp.zeros(graph.avals[o].shape, graph.avals[o].dtype)
            if _is_float(graph.avals[o])
            else None
            for o in e.op.outs
        ]
        for e in entries
    }

    def rest(head_vals: list[Any], probes: dict) -> Any:
        env = dict(const_env)
        env.update(zip(plan.cut, cut_vals, strict=True))
        env.update(zip(plan.crossing, crossing_vals, strict=True))
        env.update((plan.leaves[i], v) for i, v in zip(head_pos, head_vals, strict=True))
        for i in trunk_pos:  # a trunk leaf read by the rest but not differentiated there
            env.setdefault(plan.leaves[i], leaves[i])
        _run(plan.rest_ops, env, probes)
        entry_ins = [[_read(env, x) for x in e.op.ins] for e in entries]
        return _read(env, plan.losses), ([_read(env, x) for x in plan.aux], entry_ins)

    head_vals = [leaves[i] for i in head_pos]
    losses, pull_rest, (aux_vals, entry_ins) = jax.vjp(rest, head_vals, probe_ops, has_aux=True)
    head_grads, probe_cts = pull_rest(jnp.ones_like(losses))
    # d loss_k / d cut, row k
    cut_rows = {c: None for c in plan.cut}
    for e, invals in zip(entries, entry_ins, strict=True):
        cts = [
            probe_cts[id(e.op)][i] if probe_ops[id(e.op)][i] is not None else None
            for i in range(len(e.op.outs))
        ]
        for pos, rows in _entry_rows(e, invals, cts, num).items():
            key = e.op.ins[pos]
            cut_rows[key] = rows if cut_rows[key] is None else cut_rows[key] + rows
    if plan.losses in cut_rows:
        eye = jnp.eye(num, dtype=losses.dtype)
        cut_rows[plan.losses] = (
            eye if cut_rows[plan.losses] is None else cut_rows[plan.losses] + eye
        )
    cotangents = [
        jnp.zeros((num, *graph.avals[c].shape), graph.avals[c].dtype)
        if cut_rows[c] is None
        else cut_rows[c].astype(graph.avals[c].dtype)
        for c in plan.cut
    ]
    aux = jax.tree.unflatten(jax.tree.structure(out_shape[1]), aux_vals) if has_aux else None
    return Separated(
        losses=losses,
        aux=aux,
        trunk_leaves=list(trunk_pos),
        head_grads=dict(zip(head_pos, head_grads, strict=True)),
        head_labels={i: plan.labels.get(plan.leaves[i]) for i in head_pos},
        cotangents=cotangents,
        pull_trunk=None if pull_trunk is None else lambda cts: pull_trunk(cts)[0],
        num_tasks=num,
    )


def _evaluate(plan: _Plan, leaves, specific, has_aux, out_shape, map_rows):
    num = plan.num_tasks
    sep = _separate(plan, leaves, has_aux, out_shape)
    trunk_pos, cts = sep.trunk_leaves, sep.cotangents
    grads: list[Any] = [None] * len(leaves)
    shared_trunk = [j for j, i in enumerate(trunk_pos) if not specific[i]]
    specific_trunk = [j for j, i in enumerate(trunk_pos) if specific[i]]
    if shared_trunk and plan.cut:
        rows = map_rows(lambda c: [sep.pull_trunk(c)[j] for j in shared_trunk], cts)
        for j, r in zip(shared_trunk, rows, strict=True):
            grads[trunk_pos[j]] = r
    if specific_trunk and plan.cut:
        summed = sep.pull_trunk([jnp.sum(c, axis=0) for c in cts])
        for j in specific_trunk:
            grads[trunk_pos[j]] = summed[j]
    for i, g in sep.head_grads.items():
        grads[i] = g if specific[i] else _rows_of_gradient(g, sep.head_labels[i], num)
    for i, leaf in enumerate(leaves):
        if grads[i] is None:
            grads[i] = jnp.zeros_like(leaf) if specific[i] else jnp.zeros((num, *jnp.shape(leaf)))
    return sep.losses, grads, sep.aux


def describe_cut(split_loss: Callable[..., Any], leaves: Sequence[Any], has_aux: bool = False):
    """What the analysis found, for tests and docs: ``{"trunk_leaves": [leaf positions],
    "cut": [shapes], "entries": [(primitive, kind)], "num_tasks": K}``."""
    closed = jax.make_jaxpr(split_loss)(list(leaves))
    plan = _plan(closed, len(leaves), has_aux)
    return {
        "trunk_leaves": plan.trunk_leaves,
        "cut": [tuple(plan.graph.avals[c].shape) for c in plan.cut],
        "entries": [(e.op.eqn.primitive.name, e.kind) for e in plan.entries],
        "num_tasks": plan.num_tasks,
    }
