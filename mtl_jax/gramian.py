"""Gram space: ``G = J J^T`` of the task Jacobian, cosines, and parameter groupings.

Almost every gradient-manipulation method returns ``d = sum_k w_k g_k`` with weights that depend
on the task gradients only through the K x K Gram matrix (docs/design/DESIGN.md section 2). The
Jacobian is never flattened into one ``[K, P]`` matrix: :func:`leaf_gramians` computes one
``[K, K]`` block per leaf, groups sum their leaves' blocks, and :func:`combine` works leaf by
leaf (tests/test_memory_paths.py reads the optimized HLO). ``granularity`` says where G is
computed: ``"global"`` (one matrix), ``"leaf"`` (one per array) or a callable ``path -> group``
such as :func:`by_module` (a Flax module's kernel and bias together, as Recon and GradVac use).
Details: ``docs/conflict.md``, "Gram matrices and groupings".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax import _tree

PyTree = Any
Granularity = str | Callable[[str], str]

GLOBAL = "global"

__all__ = [
    "GLOBAL",
    "Granularity",
    "by_module",
    "combine",
    "cosine_matrix",
    "gramian",
    "group_gramians",
    "group_names",
    "leaf_gramians",
    "leaf_groups",
]

# Trailing path entries that name the array inside a variable rather than the module: NNX
# ``Variable.value`` (and the older ``raw_value``).
_VALUE_KEYS = frozenset({"value", "raw_value"})


def by_module(path: str) -> str:
    """Groups a leaf with the other leaves of its module: ``'params/Dense_0/kernel' -> 'params/Dense_0'``.

    Works for Flax Linen (``params/<module>/<name>``) and NNX (``<module>/<name>/value``) paths:
    the parameter name (and NNX's trailing ``value``) is dropped. A top-level leaf is its own
    group.
    """
    parts = path.split("/")
    while len(parts) > 1 and parts[-1] in _VALUE_KEYS:
        parts.pop()
    return "/".join(parts[:-1]) if len(parts) > 1 else parts[0]


def _leaf_label(granularity: Granularity) -> Callable[[str], str]:
    if granularity == GLOBAL:
        return lambda path: GLOBAL
    if granularity == "leaf":
        return lambda path: path
    if callable(granularity):
        return granularity
    raise ValueError(
        f"Unknown granularity {granularity!r}; use 'global', 'leaf' or a callable path -> group "
        "(e.g. mtl.gramian.by_module)."
    )


def leaf_groups(tree: PyTree, granularity: Granularity = GLOBAL) -> list[str]:
    """The group name of every leaf of ``tree``, in flattening order (static Python strings)."""
    label = _leaf_label(granularity)
    groups = []
    for path, _ in _tree.leaves_with_paths(tree):
        group = label(path)
        if not isinstance(group, str):
            raise TypeError(f"granularity returned {group!r} for leaf {path!r}; expected a str.")
        groups.append(group)
    return groups


def group_names(tree: PyTree, granularity: Granularity = GLOBAL) -> list[str]:
    """The distinct groups of ``tree`` under ``granularity``, in order of first appearance."""
    return list(dict.fromkeys(leaf_groups(tree, granularity)))


def _flat_rows(leaf: jax.Array) -> jax.Array:
    """``[K, P_leaf]`` rows; bf16/fp16 rows in float32, so G and its solve are float32."""
    rows = jnp.reshape(leaf, (leaf.shape[0], -1))
    return rows.astype(_compute_dtype(rows.dtype))


def leaf_gramians(jac: PyTree) -> list[jax.Array]:
    """One ``[K, K]`` Gram block per Jacobian leaf (``rows @ rows.T``), in flattening order."""
    _tree.task_axis_size(jac)
    return [
        jnp.matmul(r, r.T, precision=jax.lax.Precision.HIGHEST)
        for r in (_flat_rows(leaf) for _, leaf in _tree.leaves_with_paths(jac))
    ]


def _symmetrize(gram: jax.Array) -> jax.Array:
    return 0.5 * (gram + gram.T)


def group_gramians(jac: PyTree, granularity: Granularity = GLOBAL) -> dict[str, jax.Array]:
    """Gram matrices per group: ``{group: G[K, K]}`` with groups in order of first appearance."""
    out: dict[str, jax.Array] = {}
    for group, block in zip(leaf_groups(jac, granularity), leaf_gramians(jac), strict=True):
        out[group] = block if group not in out else out[group] + block
    return {g: _symmetrize(G) for g, G in out.items()}


def gramian(jac: PyTree, granularity: Granularity = GLOBAL) -> jax.Array | dict[str, jax.Array]:
    """``G = J J^T``: a ``[K, K]`` matrix for ``"global"``, else ``{group: G[K, K]}``.

    Args:
      jac: task Jacobian, leaves ``[K, ...]``.
      granularity: ``"global"``, ``"leaf"`` or a callable ``path -> group``.
    """
    grams = group_gramians(jac, granularity)
    return grams[GLOBAL] if granularity == GLOBAL else grams


def cosine_matrix(gram: jax.Array, eps: float = 0.0) -> jax.Array:
    """Pairwise cosines ``C_ij = G_ij / (|g_i| |g_j|)`` from a Gram matrix ``G[K, K]``.

    A task with a zero gradient has cosine 0 with every task (and with itself), never NaN.
    Values are clipped to [-1, 1] against rounding.
    """
    norms = jnp.sqrt(jnp.clip(jnp.diagonal(gram), 0.0))
    denom = norms[:, None] * norms[None, :]
    safe = denom > eps
    cos = jnp.where(safe, gram / jnp.where(safe, denom, 1.0), 0.0)
    return jnp.clip(cos, -1.0, 1.0)


def _compute_dtype(dtype: Any) -> Any:
    """The dtype sums are accumulated in: float32 for 16-bit floats, else ``dtype`` itself."""
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.float32
    return dtype


def combine(weights: jax.Array, leaf: jax.Array) -> jax.Array:
    """``sum_k weights[k] * leaf[k]`` for one Jacobian leaf ``[K, ...]``, in the leaf's dtype.

    A ``bfloat16``/``float16`` leaf is summed in float32 with float32 weights and the result
    cast back (``docs/methods.md``, "Precision"): with the weights rounded to bfloat16 and the
    K rows summed in bfloat16 the update was off by up to 1.1e-2 relative (K = 3), against one
    bfloat16 rounding (2^-8 = 3.9e-3) now (tests/test_mistakes_library.py).
    """
    dtype = _compute_dtype(leaf.dtype)
    out = jnp.tensordot(
        weights.astype(dtype), leaf.astype(dtype), axes=1, precision=jax.lax.Precision.HIGHEST
    )
    return out.astype(leaf.dtype)
