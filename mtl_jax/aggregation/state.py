"""Reading an aggregator's state: the last step's weights ``w[K]`` and Gram matrices ``G[K, K]``.

:func:`weights` and :func:`gram` read an :class:`~mtl_jax.aggregation.gramspace.AggregatorState`,
given explicitly or found as the one inside an optax state (:func:`aggregator_state`, which
raises naming the fix if there are several). Optax's own lookup finds it by the field's name::

  optax.tree_utils.tree_get(opt_state, "weights")  # {group: w[K]}, the AggregatorState's field

(the field is named ``weights``; with ExcessMTL, whose inner state has a ``weights`` too, add
``filtering=lambda path, value: isinstance(value, dict)``). :func:`aggregator_state` returns the
one AggregatorState of an optax state. See ``docs/methods.md``.
"""

from __future__ import annotations

from typing import Any

import jax

from mtl_jax.gramian import GLOBAL

from .gramspace import AggregatorState

__all__ = ["aggregator_state", "gram", "weights"]

PyTree = Any
Logs = jax.Array | dict[str, jax.Array]


def _unwrap_groups(logs: dict[str, jax.Array], what: str) -> Logs:
    """``w`` (or ``G``) for one global group, the ``{group: ...}`` dict otherwise."""
    if not logs:
        raise ValueError(
            f"This aggregator's state keeps no {what}: it was built without the number of tasks. "
            "Pass num_tasks=K to the aggregator (e.g. mtl.aggregation.upgrad(num_tasks=K)) to log them."
        )
    if set(logs) == {GLOBAL}:
        return logs[GLOBAL]
    return dict(logs)


def _find(state: Any) -> AggregatorState | None:
    return state if isinstance(state, AggregatorState) else aggregator_state(state)


def weights(state: PyTree) -> Logs | None:
    """The weights ``w[K]`` of the last step (zeros before the first step).

    ``state``: an :class:`AggregatorState`, or an optax state holding exactly one (e.g. a
    chain's). An array for ``granularity="global"``, a ``{group: w[K]}`` dict otherwise;
    ``None`` for a state without an aggregator that logs weights (GradDrop, a plain optimizer).

    Raises:
      ValueError: if an optax state holds several aggregator states (read the one you mean),
        or the aggregator was built without ``num_tasks`` (its state has no room for them).
    """
    found = _find(state)
    return None if found is None else _unwrap_groups(found.weights, "weights")


def gram(state: PyTree) -> Logs | None:
    """The Gram matrices ``G[K, K]`` of the last step, like :func:`weights`."""
    found = _find(state)
    return None if found is None else _unwrap_groups(found.gram, "Gram matrices")


def _path_name(path: tuple) -> str:
    return "opt_state" + "".join(str(k) for k in path)


def aggregator_state(opt_state: PyTree) -> AggregatorState | None:
    """The one :class:`AggregatorState` inside an optax state; ``None`` if there is none.

    Raises:
      ValueError: if the state holds several (e.g. two aggregators in one chain), listing where
        they are; read the one you mean explicitly with :func:`weights` / :func:`gram`.
    """
    found = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            opt_state, is_leaf=lambda x: isinstance(x, AggregatorState)
        )[0]
        if isinstance(leaf, AggregatorState)
    ]
    if len(found) > 1:
        where = ", ".join(_path_name(path) for path, _ in found)
        raise ValueError(
            f"The optax state holds {len(found)} aggregator states ({where}); say which one: "
            "pass it to mtl.aggregation.weights(...) / mtl.aggregation.gram(...), e.g. "
            f"mtl.aggregation.weights({_path_name(found[0][0])})."
        )
    return found[0][1] if found else None
