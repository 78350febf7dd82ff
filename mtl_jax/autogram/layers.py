"""Per-site pieces of the Gram matrix and of the update, from activations and cotangents.

Notation (per site, in the engine's layout): ``B`` samples (1 unless instance-wise), ``T``
objectives per sample, ``O = B T`` objectives in the order ``o = b T + t``; the site's
captured activation inputs ``acts`` (leaves ``[B, ...]``) and its output cotangents
``deltas: [T, B, *out]`` (row ``(t, b)``: ``d L_{b,t} / d out_b``; zero for other samples).

Two exact ways to get a leaf's ``[O, O]`` block:

* **identity** (a ``dot_general`` of an activation ``x`` with a bijective view of the leaf,
  i.e. a Dense layer or any ``x @ W``; Jacot-style kernel identity, as TorchJD's autogram uses
  for ``nn.Linear``): with ``x_b: [N, C]`` (N positions of sample b: batch rows, sequence,
  pixels) and ``delta_{t,b}: [N, F]``, the gradient of objective (b, t) is
  ``x_b^T delta_{t,b}`` and ``<g_{bt}, g_{cu}> = sum_{p,q} (x_b[p] . x_c[q]) (delta_{t,b}[p] .
  delta_{u,c}[q])``: O(N^2 (C + T F)) instead of the rows' O(T N C F + O^2 C F). For IWRM
  (N = 1 position per sample) it is ``G = (X X^T) o (D D^T)``;
* **embedding identity** (a ``gather`` of whole rows of the leaf, ``jnp.take(table, idx,
  axis=0)``): the same sum with ``x_b[p] . x_c[q]`` replaced by ``[idx_b[p] == idx_c[q]]``
  (a row looked up twice adds up; dropped out-of-range indices count zero), instead of
  ``[O, V, D]`` rows;
* **rows**: the site's own VJP (``jax.vjp`` of the one equation) vmapped over the O
  cotangents: the leaf's ``[O, *leaf]`` rows, turned into ``rows rows^T`` and dropped (any
  primitive: conv, the ``mul``/``add`` of LayerNorm and BatchNorm, biases).

:func:`choose` picks the cheaper by a flop count, the update included. The update ``sum_o w_o
g_o`` of a site's leaves is the same site VJP at the combined cotangent ``sum_t w_{bt}
delta_{t,b}`` (one weight-gradient computation; the activation cotangents are the ones the Gram
matrix used), or for a dense leaf that took rows the combination of its kept rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax.autogram.walk import BIJECTIVE_PRIMS, Site, apply_chain, bind_eqn, is_literal

__all__ = [
    "DenseLayout",
    "GatherLayout",
    "choose",
    "combined_cotangent",
    "compute_dtype",
    "dense_identity_gram",
    "dense_layout",
    "dense_rows",
    "gather_identity_gram",
    "gather_layout",
    "identity_gram",
    "identity_layout",
    "plain_dense",
    "rows_gram",
    "site_rows",
    "site_update",
]

HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype: Any) -> Any:
    """Blocks are accumulated in float32 for 16-bit parameters, else in their own dtype."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def local_output(site: Site, leaf_vals: dict[int, Any], acts: Sequence[Any]) -> Any:
    """The site's output for one sample from its leaves (through their views) and activations."""
    invals, it = [], iter(acts)
    leaf_at = {pos: (leaf, chain) for pos, leaf, chain in site.leaf_inputs}
    for pos, v in enumerate(site.eqn.invars):
        if pos in leaf_at:
            leaf, chain = leaf_at[pos]
            invals.append(apply_chain(chain, leaf_vals[leaf]))
        elif is_literal(v):
            invals.append(v.val)
        else:
            invals.append(next(it))
    return bind_eqn(site.eqn, invals)


def _split(leaf_vals: dict[int, Any], wrt: Sequence[int]) -> tuple[dict, dict]:
    return {i: leaf_vals[i] for i in wrt}, {i: v for i, v in leaf_vals.items() if i not in wrt}


def site_rows(
    site: Site,
    leaf_vals: dict[int, Any],
    acts: Sequence[Any],
    deltas: jax.Array,
    wrt: Sequence[int],
) -> dict[int, jax.Array]:
    """``{leaf: rows [O, *leaf]}``: per-objective gradients of the ``wrt`` leaves at this site.

    ``acts``: leaves ``[B, ...]``; ``deltas: [T, B, *out]``.
    """
    free, fixed = _split(leaf_vals, wrt)

    def one(acts_b: Sequence[Any], delta: jax.Array) -> dict[int, jax.Array]:
        out = lambda lv: local_output(site, {**fixed, **lv}, acts_b)
        return jax.vjp(out, free)[1](delta)[0]

    per_t = jax.vmap(one, in_axes=(None, 0))  # over T
    rows = jax.vmap(per_t, in_axes=(0, 1))(list(acts), deltas)  # [B, T, *leaf]
    return {i: jnp.reshape(r, (-1, *r.shape[2:])) for i, r in rows.items()}


def plain_dense(site: Site, layout: Any) -> bool:
    """Whether ``site`` is ``x @ W`` with the leaf itself as ``W: [C, F]`` (no view, contracted
    on its first axis): its rows are ``x^T delta_t``, in the leaf's own layout."""
    if not isinstance(layout, DenseLayout) or layout.param_pos != 1:
        return False
    _, _, chain = site.leaf_inputs[0]
    (_, rc), _ = site.eqn.params["dimension_numbers"]
    w_aval = site.eqn.invars[1].aval
    return not chain and tuple(rc) == (0,) and w_aval.ndim == 2


def dense_rows(layout: DenseLayout, act: jax.Array, deltas: jax.Array) -> jax.Array:
    """``[T, C, F]`` rows of a :func:`plain_dense` site with one sample (B = 1): a batched GEMM
    ``x^T delta_t`` whose output is already the rows' layout (the site VJP's rows came out as
    ``[T F, C]`` and were transposed in a copy as large as the rows: issue 25 profile)."""
    x, d = _dense_parts(layout, act, deltas)  # [1, N, C], [T, 1, N, F]
    num_t = d.shape[0]
    xb = jnp.broadcast_to(x[0], (num_t, *x.shape[1:]))
    return jax.lax.dot_general(xb, d[:, 0], (((1,), (1,)), ((0,), (0,))), precision=HIGHEST)


def rows_gram(rows: jax.Array) -> jax.Array:
    """``rows rows^T`` of ``[O, *leaf]`` rows (16-bit rows in float32)."""
    flat = jnp.reshape(rows, (rows.shape[0], -1))
    if jnp.finfo(flat.dtype).bits < 32:
        flat = flat.astype(jnp.float32)
    return jnp.matmul(flat, flat.T, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class DenseLayout:
    """How a ``dot_general`` site's activation and cotangent become ``[N, C]`` and ``[N, F]``."""

    param_pos: int  # operand position of the parameter view (0 = lhs, 1 = rhs)
    act_perm: tuple[int, ...]  # the activation's free dims, then its contracting dims
    positions: int  # N
    contracted: int  # C
    features: int  # F (the parameter's free size)


def dense_layout(site: Site) -> DenseLayout | None:
    """The identity's layout if ``site`` is ``x @ view(W)`` with a bijective view, else ``None``."""
    eqn = site.eqn
    if eqn.primitive.name != "dot_general" or len(site.leaf_inputs) != 1:
        return None
    pos, _, chain = site.leaf_inputs[0]
    if any(e.primitive.name not in BIJECTIVE_PRIMS for e in chain):
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    x_aval = eqn.invars[1 - pos].aval
    w_aval = eqn.invars[pos].aval
    cx = tuple(lc if pos == 1 else rc)
    cw = tuple(rc if pos == 1 else lc)
    free_x = tuple(d for d in range(x_aval.ndim) if d not in cx)
    n = math.prod(x_aval.shape[d] for d in free_x)
    c = math.prod(x_aval.shape[d] for d in cx)
    f = math.prod(w_aval.shape[d] for d in range(w_aval.ndim) if d not in cw)
    return DenseLayout(pos, free_x + cx, n, c, f)


def _dense_parts(layout: DenseLayout, act: jax.Array, deltas: jax.Array):
    """``X: [B, N, C]``, ``D: [T, B, N, F]`` from ``act: [B, ...]`` and ``deltas: [T, B, *out]``."""
    num_b, num_t = act.shape[0], deltas.shape[0]
    perm = (0, *tuple(d + 1 for d in layout.act_perm))
    x = jnp.reshape(jnp.transpose(act, perm), (num_b, layout.positions, layout.contracted))
    if layout.param_pos == 1:  # output = (x free..., W free...)
        d = jnp.reshape(deltas, (num_t, num_b, layout.positions, layout.features))
    else:  # output = (W free..., x free...)
        d = jnp.reshape(deltas, (num_t, num_b, layout.features, layout.positions))
        d = jnp.swapaxes(d, 2, 3)
    return x, d


def _kernel_gram(a: jax.Array, d: jax.Array) -> jax.Array:
    """``G[(b,t),(c,u)] = sum_{p,q} a[b,p,c,q] <d[t,b,p], d[u,c,q]>``: ``[O, O]``.

    ``a``: ``[N, N]`` when B = 1, ``[B, B]`` for one position per sample, else
    ``[B, N, B, N]``; ``d: [T, B, N, F]``.
    """
    num_t, num_b = d.shape[0], d.shape[1]
    if num_b == 1:
        # Laid out for XLA: r_u = a d_u as a batched GEMM over u (``a`` broadcast), then G as ONE
        # GEMM of the flat [T, N F] rows; the einsums "pq,uqf->upf", "tpf,upf->tu" compiled to
        # transposing copies of d and r that cost as much as the products (issue 25 profile).
        d0 = d[:, 0]
        r = jax.lax.dot_general(
            jnp.broadcast_to(a, (num_t, *a.shape)),
            d0,
            (((2,), (1,)), ((0,), (0,))),
            precision=HIGHEST,
        )
        flat = (num_t, -1)
        return jax.lax.dot_general(
            jnp.reshape(d0, flat),
            jnp.reshape(r, flat),
            (((1,), (1,)), ((), ())),
            precision=HIGHEST,
        )
    if d.shape[2] == 1:
        dd = jnp.einsum("tbf,ucf->btcu", d[:, :, 0], d[:, :, 0], precision=HIGHEST)
        g = dd * a[:, None, :, None]
    else:
        g = jnp.einsum("bpcq,tbpf,ucqf->btcu", a, d, d, precision=HIGHEST)
    return jnp.reshape(g, (num_b * num_t, num_b * num_t))


def _block_dtype(*arrays: jax.Array) -> Any:
    return compute_dtype(jnp.result_type(*(x.dtype for x in arrays)))


def dense_identity_gram(layout: DenseLayout, act: jax.Array, deltas: jax.Array) -> jax.Array:
    """The leaf's ``[O, O]`` block by the kernel identity (module docstring)."""
    x, d = _dense_parts(layout, act, deltas)
    dtype = _block_dtype(x, d)
    x, d = x.astype(dtype), d.astype(dtype)
    if d.shape[1] == 1:
        a = jnp.matmul(x[0], x[0].T, precision=HIGHEST)  # [N, N]
    elif layout.positions == 1:
        a = jnp.matmul(x[:, 0], x[:, 0].T, precision=HIGHEST)  # [B, B]
    else:
        a = jnp.einsum("bpk,cqk->bpcq", x, x, precision=HIGHEST)
    return _kernel_gram(a, d)


@dataclasses.dataclass(frozen=True)
class GatherLayout:
    """An embedding lookup ``table[idx]`` (``jnp.take(table, idx, axis=0)``): ``N`` indices per
    sample, ``F`` features per row, ``V`` rows; out-of-range indices dropped (``fill``) or
    clipped (``clip``), as the gather's mode says."""

    positions: int
    features: int
    vocab: int
    clip: bool


def gather_layout(site: Site) -> GatherLayout | None:
    """The layout if ``site`` gathers whole rows of (a bijective view of) the leaf, else ``None``."""
    eqn = site.eqn
    if eqn.primitive.name != "gather" or len(site.leaf_inputs) != 1:
        return None
    pos, _, chain = site.leaf_inputs[0]
    if pos != 0 or any(e.primitive.name not in BIJECTIVE_PRIMS for e in chain):
        return None
    dims, params = eqn.params["dimension_numbers"], eqn.params
    table, idx = eqn.invars[0].aval, eqn.invars[1].aval
    out_rank = site.out_aval.ndim
    mode = str(params.get("mode", ""))
    if (
        tuple(dims.collapsed_slice_dims) != (0,)
        or tuple(dims.start_index_map) != (0,)
        or tuple(getattr(dims, "operand_batching_dims", ())) != ()
        or tuple(params["slice_sizes"]) != (1, *table.shape[1:])
        or tuple(dims.offset_dims) != tuple(range(out_rank - (table.ndim - 1), out_rank))
        or idx.shape[-1] != 1
        or not ("FILL_OR_DROP" in mode or "CLIP" in mode)
    ):
        return None
    return GatherLayout(
        positions=math.prod(idx.shape[:-1]),
        features=math.prod(table.shape[1:]),
        vocab=table.shape[0],
        clip="CLIP" in mode,
    )


def gather_identity_gram(layout: GatherLayout, idx: jax.Array, deltas: jax.Array) -> jax.Array:
    """The table's ``[O, O]`` block: ``a[p, q] = [idx_p == idx_q]`` (rows looked up twice add up),
    then the kernel identity; dropped indices contribute nothing."""
    num_b, num_t = idx.shape[0], deltas.shape[0]
    i = jnp.reshape(idx, (num_b, layout.positions))
    if layout.clip:
        i, valid = jnp.clip(i, 0, layout.vocab - 1), jnp.ones(i.shape, bool)
    else:
        valid = (i >= 0) & (i < layout.vocab)
    d = jnp.reshape(deltas, (num_t, num_b, layout.positions, layout.features))
    d = d.astype(compute_dtype(d.dtype))
    eq = (i[:, :, None, None] == i[None, None, :, :]) & valid[:, :, None, None] & valid[None, None]
    eq = eq.astype(d.dtype)  # [B, N, B, N]
    if num_b == 1:
        a = eq[0, :, 0, :]
    elif layout.positions == 1:
        a = eq[:, 0, :, 0]
    else:
        a = eq
    return _kernel_gram(a, d)


def identity_layout(site: Site) -> DenseLayout | GatherLayout | None:
    """The site's identity layout (dense or embedding), or ``None`` (rows)."""
    return dense_layout(site) or gather_layout(site)


def identity_gram(layout: Any, acts: Sequence[jax.Array], deltas: jax.Array) -> jax.Array:
    (act,) = acts  # one activation operand: the input of x @ W, or the indices of a lookup
    if isinstance(layout, GatherLayout):
        return gather_identity_gram(layout, act, deltas)
    return dense_identity_gram(layout, act, deltas)


def choose(
    layout: DenseLayout | GatherLayout | None,
    num_b: int,
    num_t: int,
    identities: bool | str = True,
) -> tuple[str, float, float]:
    """``(method, identity flops, rows flops)`` for one leaf at one site (multiply-adds),
    the update included: an identity leaf's update is the site's weighted VJP (``B N C F``), a
    dense rows leaf's the combination of its rows (``O C F``, :func:`mtl_jax.gramian.combine`).

    ``identities``: ``True`` the cheaper, ``"always"`` the identity where it applies, ``False``
    rows."""
    if layout is None or identities is False:
        return "rows", math.inf, math.nan
    n, f = layout.positions, layout.features
    objectives = num_b * num_t
    if isinstance(layout, GatherLayout):  # rows: scatter-adds into [O, V F], then their Gram
        c, rows = 1, objectives * n * f + objectives**2 * layout.vocab * f
    else:
        c = layout.contracted
        rows = objectives * n * c * f + objectives**2 * c * f + objectives * c * f
    if num_b == 1:
        identity = n * n * c + num_t * n * n * f + num_t**2 * n * f
    elif n == 1:
        identity = num_b**2 * c + objectives**2 * f
    else:
        identity = (num_b * n) ** 2 * c + (objectives * n) ** 2 * f
    identity += num_b * n * c * f  # the update: one weighted VJP of the site
    use = identities == "always" or (identities is True and identity < rows)
    return ("identity" if use else "rows"), float(identity), float(rows)


def combined_cotangent(deltas: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_t w[b, t] deltas[t, b]``: ``[B, *out]`` from ``deltas: [T, B, *out]``, ``w: [B, T]``."""
    num_t, num_b = deltas.shape[:2]
    if num_b == 1:
        # One GEMV, not ``sum(w * deltas)``: XLA:CPU ran that broadcast-multiply-reduce over K
        # tasks 20-40x slower than the dot (issue 25 profile: 95 of 290 ms at K = 40).
        flat = jnp.reshape(deltas, (num_t, -1))
        out = jnp.tensordot(weights[0].astype(deltas.dtype), flat, 1, precision=HIGHEST)
        return jnp.reshape(out, deltas.shape[1:])
    w = weights.T.astype(deltas.dtype)  # instance-wise: few tasks per sample
    w = jnp.reshape(w, w.shape + (1,) * (deltas.ndim - 2))
    return jnp.sum(w * deltas, axis=0)


def site_update(
    site: Site,
    leaf_vals: dict[int, Any],
    acts: Sequence[Any],
    cotangent: jax.Array,
    wrt: Sequence[int],
) -> dict[int, jax.Array]:
    """``{leaf: gradient}`` of ``sum_b <cotangent_b, out_b>``: the site's VJP over the batch."""
    free, fixed = _split(leaf_vals, wrt)
    batched = lambda lv: jax.vmap(lambda a: local_output(site, {**fixed, **lv}, a))(list(acts))
    return jax.vjp(batched, free)[1](cotangent)[0]
