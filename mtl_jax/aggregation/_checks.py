"""Input checks and leaf helpers shared by every aggregator of this package.

Bad input is caught at trace time with a ``ValueError`` naming the problem: a Jacobian whose
leaves disagree on K (or has K = 0), a Jacobian that does not match the parameters, ``task_losses``
of the wrong length, or a K other than the one the aggregator was built for. Non-finite input is
not an error: :func:`finite_mask` / :func:`leaves_finite` give the flag under which aggregators
return an all-NaN update (see ``docs/methods.md``, "Aggregators as optax transforms").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import _tree

__all__ = [
    "check_num_tasks",
    "compute_dtype_losses",
    "finite_mask",
    "float_dtype",
    "leaves_finite",
    "map_unmasked",
    "validate_jacobian",
]

PyTree = Any


def float_dtype() -> jnp.dtype:
    """The default float dtype of new state arrays."""
    return jnp.zeros(()).dtype  # float32, or float64 under jax_enable_x64


def validate_jacobian(
    jac: PyTree, params: PyTree | None, task_losses: Any, num_tasks: int | None, name: str
) -> int:
    """K, the number of task rows of ``jac`` (leaves ``[K, ...]``), after the checks above.

    Also refused: a Flax ``variables`` dict (BatchNorm statistics) as the Jacobian or the
    parameters, and integer/bool Jacobian leaves (from integer parameters).
    """
    _tree.check_not_variables(jac, f"{name}.update (the task Jacobian)")
    if params is not None:
        _tree.check_not_variables(params, f"{name}.update (params)")
    k = _tree.task_axis_size(jac)
    _check_float_jacobian(jac, name)
    if k == 0:
        raise ValueError(
            f"{name}: the task Jacobian has K=0 tasks (an empty leading axis); an aggregator "
            "needs at least one task gradient."
        )
    if params is not None:
        _tree.check_jacobian_matches(jac, params)
    _tree.check_task_losses(task_losses, k)
    if num_tasks is not None and k != num_tasks:
        raise ValueError(
            f"{name} was built for {num_tasks} tasks (num_tasks={num_tasks}, or a per-task "
            f"vector of length {num_tasks}), but the Jacobian has K={k}."
        )
    return k


def _check_float_jacobian(jac: PyTree, name: str) -> None:
    bad = _tree.non_float_leaves(jac, jnp.floating)
    if bad:
        raise TypeError(
            f"{name}: the task Jacobian must be floating-point; non-float leaves: "
            f"{_tree._listing(bad)}. Integer parameters have no gradient: cast them to float "
            "(jax.tree.map(lambda x: x.astype(jnp.float32), params)) before differentiating."
        )


def check_num_tasks(num_tasks: Any, name: str) -> None:
    """``num_tasks`` is None or a positive int (not a bool, not a float)."""
    if num_tasks is None:
        return
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int | np.integer):
        raise TypeError(
            f"{name}: num_tasks must be an int (K, the number of tasks); got "
            f"{num_tasks!r} ({type(num_tasks).__name__})."
        )
    if num_tasks < 1:
        raise ValueError(f"{name}: num_tasks must be >= 1; got {num_tasks}.")


def compute_dtype_losses(task_losses: Any) -> Any:
    """``task_losses`` in float32 when given in a 16-bit float (the weighting solves in float32)."""
    if task_losses is None:
        return None
    dtype = jnp.result_type(task_losses)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.asarray(task_losses, jnp.float32)
    return task_losses


def finite_mask(gram: jax.Array, task_losses: Any) -> jax.Array:
    """Whether ``gram`` (any shape) and the task losses (if given) are all finite."""
    finite = jnp.all(jnp.isfinite(gram))
    if task_losses is not None:
        finite &= jnp.all(jnp.isfinite(task_losses))
    return finite


def leaves_finite(leaves: Sequence[jax.Array], task_losses: Any) -> jax.Array:
    """Whether every leaf and the task losses (if given) are all finite."""
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))
    if task_losses is not None:
        finite &= jnp.all(jnp.isfinite(task_losses))
    return finite


def map_unmasked(tree: PyTree, fn: Callable[[int, jax.Array], jax.Array]) -> PyTree:
    """Applies ``fn(i, leaf)`` to the i-th non-masked leaf; ``MaskedNode`` leaves pass through."""
    flat, treedef = jax.tree_util.tree_flatten(
        tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    out, i = [], 0
    for leaf in flat:
        if isinstance(leaf, optax.MaskedNode):
            out.append(leaf)
        else:
            out.append(fn(i, leaf))
            i += 1
    return treedef.unflatten(out)
