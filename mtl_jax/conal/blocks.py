"""A CoNAL block: one backbone stage as pure ``init``/``apply`` functions.

CoNAL (Yue, Zhang & Liang, AAAI 2023) cuts a backbone into B sequential blocks ``f^(0..B-1)``;
the supernet and the retrain tree hold several copies of each. :func:`linen_block` and
:func:`nnx_block` wrap a Flax Linen module or an NNX module (factory or instance); BatchNorm
statistics are the block's *state*. See ``docs/recipes/conal.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["Block", "linen_block", "nnx_block"]


class Block(NamedTuple):
    """One backbone stage as pure functions.

    Attributes:
      init: ``(key, x) -> (params, state)``; ``state`` holds the non-trainable collections
        (BatchNorm statistics), ``{}`` when there are none.
      apply: ``(params, state, x, train: bool) -> (y, new_state)``; with ``train=False`` the state
        is returned unchanged.
      name: used in reports.
    """

    init: Callable[[jax.Array, Any], tuple[PyTree, PyTree]]
    apply: Callable[[PyTree, PyTree, Any, bool], tuple[Any, PyTree]]
    name: str = "block"


def _takes_train(module: Any) -> bool:
    try:
        return "train" in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return False


def linen_block(module: Any, name: str | None = None) -> Block:
    """A :class:`Block` from a Flax Linen module ``__call__(x[, train])``.

    ``train`` is passed when ``__call__`` has such an argument. In training mode every non-param
    collection present at init (e.g. ``batch_stats``) is mutable and returned as the new state.
    """
    takes_train = _takes_train(module)

    def kwargs(train: bool) -> dict[str, bool]:
        return {"train": train} if takes_train else {}

    def init(key: jax.Array, x: Any) -> tuple[PyTree, PyTree]:
        variables = dict(module.init(key, x, **kwargs(False)))
        params = variables.pop("params", {})
        return params, variables

    def apply(params: PyTree, state: PyTree, x: Any, train: bool) -> tuple[Any, PyTree]:
        variables = {"params": params, **state}
        if train and state:
            y, new_state = module.apply(variables, x, mutable=list(state), **kwargs(True))
            return y, dict(new_state)
        return module.apply(variables, x, **kwargs(train)), state

    return Block(init, apply, name or type(module).__name__)


def nnx_block(module: Any, name: str | None = None) -> Block:
    """A :class:`Block` from Flax NNX: a factory ``rngs -> nnx.Module`` or a module instance.

    ``init(key, x)`` builds a fresh module with ``nnx.Rngs(key)`` from a factory (every task copy
    gets its own random init, as the official ``new_bb()``); an instance gives its own values to
    every copy. Params are the ``nnx.Param`` variables, the state everything else (BatchStat).
    ``apply`` merges, sets ``module.train()`` / ``module.eval()``, calls ``module(x)`` and splits.
    """
    from flax import nnx

    is_instance = isinstance(module, nnx.Module)
    template = module if is_instance else module(nnx.Rngs(0))
    graphdef, _, _ = nnx.split(template, nnx.Param, ...)

    def init(key: jax.Array, x: Any) -> tuple[PyTree, PyTree]:
        del x
        built = template if is_instance else module(nnx.Rngs(key))
        _, params, state = nnx.split(built, nnx.Param, ...)
        return params, state

    def apply(params: PyTree, state: PyTree, x: Any, train: bool) -> tuple[Any, PyTree]:
        # copy=True: fresh Variables at the current trace level (the state may come from an
        # outer trace, e.g. closed over by jax.grad), so BatchNorm may update them here
        m = nnx.merge(graphdef, params, state, copy=True)
        m.train() if train else m.eval()
        y = m(x)
        _, _, new_state = nnx.split(m, nnx.Param, ...)
        return y, new_state

    return Block(init, apply, name or type(template).__name__)


def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
