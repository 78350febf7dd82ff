"""Per-task gradients: the task Jacobian in one forward pass and K batched backward passes.

Two entry points (docs/design/DESIGN.md section 1):

* :func:`value_and_jacobian` differentiates a function returning a loss *vector* ``f32[K]``. It
  runs the forward pass once (``jax.vjp``) and maps the pullback over the K one-hot cotangents
  with ``jax.vmap`` -- what ``jax.jacrev`` does -- or, with ``chunk_size``, with
  ``jax.lax.map(..., batch_size=chunk_size)`` to bound peak memory.
* :func:`mtl_value_and_grad` is the structured case of a shared encoder and one head per task. Only
  the encoder gets Jacobian rows; each head gets the ordinary gradient of its own loss, and the
  per-task gradients with respect to the shared representation ``z`` are returned too (what
  MGDA-UB / Aligned-MTL-UB aggregate).

* :func:`value_and_grads` is the general case of shared and task-specific parameters in one tree
  (heads, Recon's per-task copies, modulation scales): one forward pass, Jacobian rows for the
  shared leaves only, and the ordinary gradient of the summed loss for the task-specific leaves,
  so they cost O(K x leaf), never a ``[K, K, ...]`` Jacobian. :func:`mtl_jax.shared_rows`
  turns that tree into updates for all parameters in one ``optax.chain``.

All are pure function transformations: the returned functions can be ``jax.jit``-ed, and they work
for any pure ``apply(params, x)``: Flax Linen ``model.apply``, Flax NNX (``nnx.split`` /
``nnx.merge``), Equinox or plain JAX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax.sharing import task_specific_leaves

PyTree = Any

__all__ = [
    "STRATEGIES",
    "mtl_value_and_grad",
    "value_and_grads",
    "value_and_jacobian",
]


def _check_loss_vector(losses: Any, where: str) -> None:
    shape = jnp.shape(losses)
    if len(shape) != 1:
        raise ValueError(
            f"{where} must return a loss vector f32[K] (one loss per task); got shape {shape}. "
            "Stack the task losses with jnp.stack([...])."
        )
    if not jnp.issubdtype(jnp.result_type(losses), jnp.floating):
        raise TypeError(
            f"{where} must return floating-point losses; got {jnp.result_type(losses)}."
        )


STRATEGIES = ("vmap", "unroll", "scan")


def _check_strategy(strategy: str, chunk_size: int | None) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose from {STRATEGIES}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size}.")
    if chunk_size is not None and strategy != "vmap":
        raise ValueError("chunk_size applies to strategy='vmap' only.")


def _map_pullback(
    pullback: Callable, cotangents: PyTree, chunk_size: int | None, strategy: str = "vmap"
) -> PyTree:
    """Applies ``pullback`` to every row of ``cotangents`` (leading axis K).

    ``"vmap"``: one batched backward pass (chunks of ``chunk_size`` rows under ``lax.map``);
    ``"unroll"``: K separate backward passes in the traced program (compile time grows with K);
    ``"scan"``: K backward passes in a ``lax.map`` loop without batching.
    """
    num = jax.tree.leaves(cotangents)[0].shape[0]
    if strategy == "unroll":
        rows = [pullback(jax.tree.map(lambda c, k=k: c[k], cotangents)) for k in range(num)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
    if strategy == "scan":
        return jax.lax.map(pullback, cotangents)
    if chunk_size is None or chunk_size >= num:
        return jax.vmap(pullback)(cotangents)
    return jax.lax.map(pullback, cotangents, batch_size=chunk_size)


def value_and_jacobian(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    chunk_size: int | None = None,
    strategy: str = "vmap",
) -> Callable[..., Any]:
    """Transforms ``loss_fn`` (returning ``f32[K]``) into one returning the losses and Jacobian.

    Args:
      loss_fn: a function returning the vector of K task losses (and an auxiliary output when
        ``has_aux``).
      argnums: which positional argument(s) to differentiate, as in ``jax.grad``.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      chunk_size: if set, the K backward passes run in chunks of this many tasks (with
        ``jax.lax.map``), bounding memory to ``chunk_size`` cotangents at once. The result equals
        the unchunked one. It bounds the activation cotangents of the backward passes
        (``[chunk_size, batch, ...]`` instead of ``[K, batch, ...]``), not the Jacobian itself,
        which is ``K x P`` either way: it pays off when activations dominate (conv nets, large
        batches); ``benchmarks/memory.py`` measures both.
      strategy: how the K backward passes run. ``"vmap"`` (default): one batched pass, the
        best choice on accelerators. ``"unroll"``: K separate passes in the compiled program
        (no batched kernels; on CPU this is up to 2x faster for conv nets, whose vmapped kernel
        gradient becomes a grouped convolution; compile time grows with K). ``"scan"``: K
        passes in a loop (smallest program; on CPU fastest for large-K MLPs, slow for convs).
        ``benchmarks/step_time.py`` measures all three. Results are equal up to rounding.

    Returns:
      A function with the signature of ``loss_fn`` returning ``(losses, jac)``, or
      ``((losses, aux), jac)`` with ``has_aux``. Every leaf of ``jac`` has shape
      ``(K, *leaf.shape)`` of the differentiated argument (a tuple of such trees when ``argnums``
      is a sequence).

    Example::

      def loss_fn(params, batch):               # -> f32[2]
        pred = model.apply(params, batch['x'])
        return jnp.stack([mse(pred[:, 0], batch['y0']), mse(pred[:, 1], batch['y1'])])

      losses, jac = mtl.value_and_jacobian(loss_fn)(params, batch)
    """
    _check_strategy(strategy, chunk_size)
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        for i in nums:
            if i >= len(args):
                raise ValueError(
                    f"argnums={argnums} refers to positional argument {i}, but only {len(args)} "
                    "positional arguments were given."
                )
        diff_args = tuple(args[i] for i in nums)

        def partial_fn(*diff: Any) -> Any:
            full = list(args)
            for i, value in zip(nums, diff, strict=True):
                full[i] = value
            return loss_fn(*full, **kwargs)

        if has_aux:
            losses, pullback, aux = jax.vjp(partial_fn, *diff_args, has_aux=True)
        else:
            losses, pullback = jax.vjp(partial_fn, *diff_args)
        _check_loss_vector(losses, "loss_fn")
        basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
        jac = _map_pullback(pullback, basis, chunk_size, strategy)
        jac = jac[0] if single else jac
        return ((losses, aux), jac) if has_aux else (losses, jac)

    return wrapped


def _head_value_and_grad(
    head_loss_fn: Callable[..., Any], has_aux: bool
) -> Callable[[PyTree, PyTree, PyTree], Any]:
    """``(head_params, z, target) -> ((loss, aux), (d loss/d head_params, d loss/d z))``."""
    # jax.value_and_grad itself rejects a non-scalar head loss with a TypeError naming its shape.
    grad_fn = jax.value_and_grad(head_loss_fn, argnums=(0, 1), has_aux=has_aux)

    def fn(head_params: PyTree, z: PyTree, target: PyTree) -> Any:
        value, grads = grad_fn(head_params, z, target)
        loss, aux = value if has_aux else (value, None)
        return loss, aux, grads

    return fn


def _stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def mtl_value_and_grad(
    encoder_fn: Callable[..., Any],
    head_loss_fns: Callable[..., Any] | Sequence[Callable[..., Any]] | Mapping[str, Callable],
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    strategy: str = "vmap",
) -> Callable[..., Any]:
    """Losses, encoder Jacobian, head gradients and representation gradients of a shared-encoder model.

    The model is ``z = encoder_fn(encoder_params, x)`` followed by one head per task,
    ``loss_k = head_loss_fns[k](head_params[k], z, targets[k])``. The encoder gets a K-row Jacobian
    (one forward pass, then K encoder VJPs batched with ``vmap``); each head gets the ordinary
    gradient of its own loss (a K-row Jacobian of the heads is mostly zeros, and pulling every
    task's cotangent back through every head is K-fold waste).

    Heads can be given three ways; the task order is the order of ``losses`` everywhere:

    * a sequence of K functions, with ``head_params`` and ``targets`` sequences of length K;
    * a mapping ``name -> function``, with ``head_params`` and ``targets`` mappings with the same
      keys; the task order is the mapping's iteration order, ``list(head_loss_fns)``;
    * a single function for K homogeneous heads whose ``head_params`` and ``targets`` are stacked
      along a leading task axis; the heads then run under one ``vmap``.

    Args:
      encoder_fn: ``(encoder_params, x) -> z`` (any pytree ``z``); with ``has_aux``,
        ``(encoder_params, x) -> (z, encoder_aux)`` (e.g. updated BatchNorm statistics).
      head_loss_fns: see above; each returns a scalar loss, or ``(loss, head_aux)`` with
        ``has_aux``.
      has_aux: whether the encoder and the heads return auxiliary outputs.
      chunk_size: as in :func:`value_and_jacobian`, for the encoder's K pullbacks.
      strategy: as in :func:`value_and_jacobian`: ``"vmap"``, ``"unroll"`` or ``"scan"``.

    Returns:
      A function ``(encoder_params, head_params, x, targets) -> (losses, encoder_jac, head_grads,
      rep_grads)``; with ``has_aux`` the first element is ``(losses, (encoder_aux, head_aux))``.
      ``losses`` is ``f32[K]``; ``encoder_jac`` has leaves ``(K, *encoder_param.shape)``;
      ``head_grads`` has the container type of ``head_params``; ``rep_grads`` has the structure of
      ``z`` with a leading K axis: ``rep_grads[k] = d loss_k / d z``.
    """
    _check_strategy(strategy, chunk_size)
    stacked = callable(head_loss_fns) and not isinstance(head_loss_fns, Mapping | Sequence)
    if isinstance(head_loss_fns, Mapping):
        names = list(head_loss_fns)
        fns = [head_loss_fns[n] for n in names]
    elif stacked:
        names, fns = None, None
    else:
        names, fns = None, list(head_loss_fns)
        if not fns:
            raise ValueError("head_loss_fns is empty; give one head loss function per task.")

    def _per_task(container: Any, what: str) -> list[Any]:
        if names is not None:
            if not isinstance(container, Mapping) or set(container) != set(names):
                got = sorted(container) if isinstance(container, Mapping) else type(container)
                raise ValueError(f"{what} must be a mapping with the task keys {names}; got {got}.")
            return [container[n] for n in names]
        if not isinstance(container, Sequence) or len(container) != len(fns):
            got = len(container) if isinstance(container, Sequence) else type(container).__name__
            raise ValueError(
                f"{what} must be a sequence of {len(fns)} entries (one per head); got {got}."
            )
        return list(container)

    def fn(encoder_params: PyTree, head_params: Any, x: Any, targets: Any) -> Any:
        def encode(p: PyTree) -> Any:
            return encoder_fn(p, x)

        if has_aux:
            z, pullback, encoder_aux = jax.vjp(encode, encoder_params, has_aux=True)
        else:
            z, pullback = jax.vjp(encode, encoder_params)
            encoder_aux = None

        if stacked:
            one = _head_value_and_grad(head_loss_fns, has_aux)
            losses, head_aux, (head_grads, rep_grads) = jax.vmap(one, in_axes=(0, None, 0))(
                head_params, z, targets
            )
        else:
            params_k = _per_task(head_params, "head_params")
            targets_k = _per_task(targets, "targets")
            results = [
                _head_value_and_grad(f, has_aux)(p, z, t)
                for f, p, t in zip(fns, params_k, targets_k, strict=True)
            ]
            losses = jnp.stack([r[0] for r in results])
            rep_grads = _stack([r[2][1] for r in results])
            grads_k = [r[2][0] for r in results]
            aux_k = [r[1] for r in results]
            if names is not None:
                head_grads = dict(zip(names, grads_k, strict=True))
                head_aux = dict(zip(names, aux_k, strict=True))
            else:
                head_grads = (
                    type(head_params)(grads_k) if isinstance(head_params, tuple) else grads_k
                )
                head_aux = aux_k

        (encoder_jac,) = _map_pullback(pullback, rep_grads, chunk_size, strategy)
        first = (losses, (encoder_aux, head_aux)) if has_aux else losses
        return first, encoder_jac, head_grads, rep_grads

    return fn


# --------------------------------------------------------------------------------------------
# One gradient tree: Jacobian rows for shared leaves, ordinary gradients for task-specific ones


def value_and_grads(
    loss_fn: Callable[..., Any],
    task_specific: PyTree | Callable[[PyTree], PyTree],
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    strategy: str = "vmap",
) -> Callable[..., Any]:
    """Task losses and ONE gradient tree: Jacobian rows for shared leaves, plain gradients elsewhere.

    ``loss_fn(params, *args, **kwargs)`` returns the loss vector ``f32[K]``. The returned function
    gives ``(losses, grads)`` where ``grads`` has the structure of ``params`` and

    * a **shared** leaf gets its task Jacobian rows, ``[K, *shape]`` (row k = d loss_k / d leaf);
    * a **task-specific** leaf (a head, Recon's per-task copies ``[K, ...]``, per-task modulation
      scales) gets the ordinary gradient of ``sum_k loss_k``, ``[*shape]``. Only its own task's
      loss reaches it, so this IS its own-task gradient: for a copied leaf ``[K, ...]``, copy t
      receives exactly ``d loss_t / d copy_t``.

    One forward pass (``jax.vjp`` over all parameters), the K pullbacks of the one-hot
    cotangents (batched as in :func:`value_and_jacobian`) of which only the shared outputs are
    used, and one more pullback of the all-ones cotangent for the task-specific leaves. Under
    ``jax.jit`` XLA removes the unused task-specific outputs of the K pullbacks, so task-specific
    leaves cost O(K x leaf) time and memory, never a ``[K, K, ...]`` Jacobian
    (tests/test_grads_tree.py checks the compiled program; ``benchmarks/grads_tree.py`` measures
    it). Without ``jit`` every operation runs eagerly and the dead rows are computed and
    discarded: jit the train step.

    What stays quadratic: the K pullbacks of the joint loss vector carry every task's cotangent
    through everything downstream of the first task-specific leaf, so activations after a
    branch (per-task streams, heads' outputs) get ``[K, K, batch, ...]`` cotangents, row t being
    zero outside stream t. When the model is a per-task forward (:func:`mtl_jax.per_task`),
    :func:`mtl_jax.sharing.per_task_grads` gives the same tree without them (the gradient is
    taken inside the task ``vmap``).

    :func:`mtl_jax.shared_rows` turns ``grads`` into updates for all parameters::

      grad_fn = mtl.value_and_grads(loss_fn, task_specific={"encoder": False, "heads": True})
      tx = optax.chain(mtl.shared_rows(mtl.pcgrad(), {"encoder": False, "heads": True}),
                       optax.adam(1e-3))
      losses, grads = grad_fn(params, batch)                # encoder [K, ...], heads [...]
      updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)

    With a sharing spec (e.g. from :func:`mtl_jax.recon.branch`) pass the spec itself:
    ``mtl.value_and_grads(loss_fn, spec)``.

    Args:
      loss_fn: ``(params, *args, **kwargs) -> losses[K]`` (``(losses, aux)`` with ``has_aux``);
        only the first argument is differentiated.
      task_specific: which leaves are task-specific: a bool pytree or a sharing spec (the
        structure of ``params`` or a prefix), or a callable ``params -> either``; see
        :func:`mtl_jax.sharing.task_specific_leaves`.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      chunk_size: as in :func:`value_and_jacobian`, for the K pullbacks of the shared rows.
      strategy: as in :func:`value_and_jacobian`: ``"vmap"``, ``"unroll"`` or ``"scan"``.

    Returns:
      ``fn(params, *args, **kwargs) -> (losses, grads)``, or ``((losses, aux), grads)``.

    Raises:
      ValueError: if ``task_specific`` does not match ``params`` or the losses are not a vector.
    """
    _check_strategy(strategy, chunk_size)

    def fn(params: PyTree, *args: Any, **kwargs: Any) -> Any:
        specific = jax.tree.leaves(task_specific_leaves(task_specific, params))
        leaves, treedef = jax.tree.flatten(params)
        shared_idx = [i for i, s in enumerate(specific) if not s]
        specific_idx = [i for i, s in enumerate(specific) if s]

        def split_loss(shared: list[Any], own: list[Any]) -> Any:
            full = list(leaves)
            for i, x in zip(shared_idx, shared, strict=True):
                full[i] = x
            for i, x in zip(specific_idx, own, strict=True):
                full[i] = x
            return loss_fn(treedef.unflatten(full), *args, **kwargs)

        primals = ([leaves[i] for i in shared_idx], [leaves[i] for i in specific_idx])
        if has_aux:
            losses, pullback, aux = jax.vjp(split_loss, *primals, has_aux=True)
        else:
            losses, pullback = jax.vjp(split_loss, *primals)
        _check_loss_vector(losses, "loss_fn")
        out = list(leaves)
        if shared_idx:
            basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
            rows = _map_pullback(lambda c: pullback(c)[0], basis, chunk_size, strategy)
            for i, g in zip(shared_idx, rows, strict=True):
                out[i] = g
        if specific_idx:
            own = pullback(jnp.ones_like(losses))[1]
            for i, g in zip(specific_idx, own, strict=True):
                out[i] = g
        grads = treedef.unflatten(out)
        return ((losses, aux), grads) if has_aux else (losses, grads)

    return fn
