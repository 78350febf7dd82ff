"""``skip_nonfinite``: skips the steps whose Jacobian or task losses hold a NaN or an inf.

Wraps a whole chain that starts with an aggregator; a rejected step gives a zero update and keeps
the inner state, until ``max_consecutive_errors`` such steps in a row. Named apart from
``optax.apply_if_finite`` on purpose, because the contract differs: optax's rejected branch
returns zeros shaped like the transform's *input*, which for an aggregator is the Jacobian
(leaves ``[K, ...]``), not the parameter-shaped output; here the zeros are shaped like the inner
transform's output (``jax.eval_shape``). To wrap only the optimizer after an aggregator, optax's
own works: ``optax.chain(aggregator, optax.apply_if_finite(optimizer, n))``. See
``docs/methods.md``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["skip_nonfinite"]

PyTree = Any


def skip_nonfinite(
    inner: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
    """Skips non-finite steps of a transform that changes the shape of the updates.

    Wraps a whole chain that starts with an aggregator, e.g.
    ``mtl.aggregation.skip_nonfinite(optax.chain(mtl.aggregation.upgrad(), optax.sgd(1e-2)), 3)``: a step
    whose task Jacobian (the input) or ``task_losses`` holds a NaN or an inf is skipped -- the
    update is zero and the inner state (the aggregator's keys, EMA targets, the optimizer's
    moments) is kept -- until ``max_consecutive_errors`` such steps in a row, after which the
    update goes through. The state is ``optax.ApplyIfFiniteState``, as optax's.

    Departure from ``optax.apply_if_finite``: optax's rejected branch returns zeros shaped like
    the transform's *input*; an aggregator's input is the Jacobian (leaves ``[K, ...]``) and its
    output is shaped like the parameters, so optax's version cannot wrap it (the two branches of
    its ``lax.cond`` differ in type). Here the rejected branch returns zeros shaped like the
    inner transform's output (``jax.eval_shape``). Wrapping only what follows the aggregator,
    ``optax.chain(aggregator, optax.apply_if_finite(optimizer, n))``, works with optax's own.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params: PyTree) -> optax.ApplyIfFiniteState:
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update(updates, state, params=None, **extra_args):
        checked = [*jax.tree.leaves(updates)]
        if extra_args.get("task_losses") is not None:
            checked.append(jnp.asarray(extra_args["task_losses"]))
        isfinite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in checked]))
        notfinite_count = jnp.where(isfinite, 0, state.notfinite_count + 1).astype(jnp.int32)

        def do_update(_):
            return inner.update(updates, state.inner_state, params, **extra_args)

        out_shape = jax.eval_shape(do_update, None)[0]

        def reject_update(_):
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
            return zeros, state.inner_state

        new_updates, new_inner = jax.lax.cond(
            isfinite | (notfinite_count > max_consecutive_errors),
            do_update,
            reject_update,
            None,
        )
        return new_updates, optax.ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=isfinite,
            total_notfinite=jnp.where(isfinite, state.total_notfinite, state.total_notfinite + 1),
            inner_state=new_inner,
        )

    return optax.GradientTransformationExtraArgs(init, update)
