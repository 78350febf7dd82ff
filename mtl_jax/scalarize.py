"""Loss-only methods: combine the K task losses into one scalar before the backward pass.

These methods need the losses, not the task Jacobian, so a step costs one ordinary backward pass
(the "loss-only" cost class). They share one small interface, a :class:`Scalarizer`:

* ``init(num_tasks) -> state``;
* ``scalarize(losses, state, *, grad_norms=None) -> (loss, weights, new_state)``: ``losses`` is
  ``f32[K]``; ``loss`` is the scalar to differentiate; ``weights[K]`` are the effective task
  weights of that step (``d loss / d theta = sum_k weights[k] d L_k / d theta``, constants for the
  backward pass); ``new_state`` is computed from the loss *values* only (no gradient flows into
  it);
* ``post_step(state, new_losses) -> state``: called after the optimizer step with the losses
  recomputed on the same batch. Only FAMO uses it (one extra forward pass per step); for the others
  it returns the state unchanged, so a train loop can call it uniformly, or skip it.

All three are pure and jit-able. A typical train step::

  sc = mtl.get_scalarizer("uw")
  sc_state = sc.init(num_tasks)

  def objective(params, sc_state, batch):
      losses = task_losses(params, batch)                   # f32[K]
      loss, weights, sc_state = sc.scalarize(losses, sc_state)
      return loss, (losses, weights, sc_state)

  @jax.jit
  def step(params, opt_state, sc_state, batch):
      grads, (losses, weights, sc_state) = jax.grad(objective, has_aux=True)(params, sc_state, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      sc_state = sc.post_step(sc_state, task_losses(params, batch))  # FAMO only; else a no-op
      return params, opt_state, sc_state, losses

Learnable loss weights (UW's log-variances, IMTL-L's scales, FAMO's logits, GradNorm's weights)
live in the state together with the state of their own optax optimizer, and are stepped inside
``scalarize`` (``post_step`` for FAMO) with their analytic gradient: the same update as training
them jointly with the model in the official code, but without adding them to the model's
parameters. Non-finite losses give a NaN loss and leave the state unchanged.

Methods are selected by name with :func:`get_scalarizer` (registry :data:`SCALARIZERS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import _tree
from mtl_jax.weighting.base import EmptyState
from mtl_jax.weighting.registry import build
from mtl_jax.weighting.rlw import random_weights

__all__ = [
    "SCALARIZERS",
    "DWAState",
    "FAMOState",
    "GradNormState",
    "LearnedState",
    "RLWState",
    "STCHState",
    "Scalarizer",
    "dwa",
    "famo",
    "from_scalarizer",
    "get_scalarizer",
    "gls",
    "gradnorm",
    "imtl_l",
    "layer_grad_norms",
    "mean",
    "post_step_in_state",
    "rlw",
    "stch",
    "sum",
    "uw",
]

PyTree = Any
ScalarizeFn = Callable[..., tuple[jax.Array, jax.Array, PyTree]]


class Scalarizer(NamedTuple):
    """A loss-only method: ``init``, ``scalarize`` and ``post_step`` (see the module docstring)."""

    init: Callable[[int], PyTree]
    scalarize: ScalarizeFn
    post_step: Callable[[PyTree, jax.Array], PyTree]


def _float_dtype() -> jnp.dtype:
    return jnp.zeros(()).dtype


def _no_post_step(state: PyTree, new_losses: jax.Array) -> PyTree:
    del new_losses
    return state


def _check_num_tasks(num_tasks: Any, method: str) -> int:
    if num_tasks is None or int(num_tasks) != num_tasks or num_tasks < 1:
        raise ValueError(f"{method}: init needs the number of tasks K >= 1; got {num_tasks!r}.")
    return int(num_tasks)


def _check_losses(losses: Any, num_tasks: int | None, method: str) -> jax.Array:
    shape = jnp.shape(losses)
    if len(shape) != 1:
        raise ValueError(f"{method}: losses must be a vector f32[K]; got shape {shape}.")
    if num_tasks is not None and shape[0] != num_tasks:
        raise ValueError(
            f"{method}: losses has {shape[0]} entries but the state was made for K={num_tasks}."
        )
    return jnp.asarray(losses)


def _keep_if_finite(losses: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    finite = jnp.all(jnp.isfinite(losses))
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def _weighted_sum(losses: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(jax.lax.stop_gradient(weights).astype(losses.dtype) * losses)


# ---------------------------------------------------------------------------------------------
# Fixed and random weights.


def mean() -> Scalarizer:
    """Equal weighting: ``mean_k L_k`` (weights ``1/K``)."""

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = _check_losses(losses, None, "mean")
        num = losses.shape[0]
        return jnp.mean(losses), jnp.full(num, 1.0 / num, losses.dtype), state

    return Scalarizer(lambda num_tasks: EmptyState(), scalarize, _no_post_step)


def sum() -> Scalarizer:
    """The summed loss ``sum_k L_k`` (weights 1)."""

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = _check_losses(losses, None, "sum")
        return jnp.sum(losses), jnp.ones(losses.shape[0], losses.dtype), state

    return Scalarizer(lambda num_tasks: EmptyState(), scalarize, _no_post_step)


class RLWState(NamedTuple):
    """State of :func:`rlw`: the PRNG key, split at every call."""

    key: jax.Array


def rlw(seed: int = 0) -> Scalarizer:
    """Random loss weighting (Lin et al., TMLR 2022): ``sum_k w_k L_k``, ``w = softmax(N(0, I))``.

    A fresh draw per call, from the key in the state (LibMTL ``RLW``); see also the aggregator
    :func:`mtl_jax.random_weighting`.
    """

    def init(num_tasks: int) -> RLWState:
        _check_num_tasks(num_tasks, "rlw")
        return RLWState(jax.random.PRNGKey(seed))

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = _check_losses(losses, None, "rlw")
        key, sub = jax.random.split(state.key)
        weights = random_weights(losses.shape[0], sub, losses.dtype)
        return _weighted_sum(losses, weights), weights, RLWState(key)

    return Scalarizer(init, scalarize, _no_post_step)


# ---------------------------------------------------------------------------------------------
# Learned loss weights: UW and IMTL-L.


class LearnedState(NamedTuple):
    """Per-task learnable scalars (UW's log-variances, IMTL-L's log-scales) and their optimizer."""

    params: jax.Array
    opt_state: PyTree


def _learned(
    method: str,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    weight_fn: Callable[[jax.Array], jax.Array],
) -> Scalarizer:
    """A scalarizer whose loss ``loss_fn(losses, s)`` has learnable per-task ``s`` (init 0).

    The network sees ``s`` as constants; ``s`` takes one ``optimizer`` step on ``d loss / d s`` at
    the current loss values, i.e. the simultaneous update of joint training.
    """

    def init(num_tasks: int) -> LearnedState:
        k = _check_num_tasks(num_tasks, method)
        params = jnp.zeros((k,), _float_dtype())
        return LearnedState(params, optimizer.init(params))

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = _check_losses(losses, state.params.shape[0], method)
        s = state.params.astype(losses.dtype)
        loss = loss_fn(losses, jax.lax.stop_gradient(s))
        values = jax.lax.stop_gradient(losses)
        grad_s = jax.grad(lambda p: loss_fn(values, p))(s).astype(state.params.dtype)
        updates, opt_state = optimizer.update(grad_s, state.opt_state, state.params)
        new = LearnedState(optax.apply_updates(state.params, updates), opt_state)
        return loss, weight_fn(s), _keep_if_finite(values, new, state)

    return Scalarizer(init, scalarize, _no_post_step)


def _optimizer(learning_rate: float, optimizer: optax.GradientTransformation | None):
    if optimizer is not None:
        return optimizer
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; got {learning_rate}.")
    return optax.adam(learning_rate)


def uw(
    learning_rate: float = 1e-3, optimizer: optax.GradientTransformation | None = None
) -> Scalarizer:
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), log-variance form.

    ``loss = sum_k 1/2 exp(-s_k) L_k + 1/2 s_k`` with learnable log-variances ``s = log sigma^2``
    (init 0, i.e. uniform weights; LibMTL starts at -0.5); weights ``1/2 exp(-s_k)``. ``s`` takes one
    step of ``optimizer`` (default ``optax.adam(learning_rate)``; the paper trains ``s`` with the
    network's optimizer, so pass that one for fidelity) per call on ``d loss / d s =
    1/2 - 1/2 exp(-s) L``. For fixed losses ``s`` converges to ``log L_k``.
    """
    return _learned(
        "uw",
        _optimizer(learning_rate, optimizer),
        lambda losses, s: jnp.sum(0.5 * jnp.exp(-s) * losses + 0.5 * s),
        lambda s: 0.5 * jnp.exp(-s),
    )


def imtl_l(
    learning_rate: float = 1e-3, optimizer: optax.GradientTransformation | None = None
) -> Scalarizer:
    """IMTL-L (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), loss balance.

    ``loss = sum_k exp(s_k) L_k - s_k`` with learnable log-scales ``s`` (init 0); weights
    ``exp(s_k)``; ``s`` is stepped like :func:`uw`'s on ``d loss / d s = exp(s) L - 1``, which
    drives every scaled loss ``exp(s_k) L_k`` towards 1.
    """
    return _learned(
        "imtl_l",
        _optimizer(learning_rate, optimizer),
        lambda losses, s: jnp.sum(jnp.exp(s) * losses - s),
        jnp.exp,
    )


# ---------------------------------------------------------------------------------------------
# DWA, GLS, STCH.


class DWAState(NamedTuple):
    """State of :func:`dwa`: the running epoch sum, and the last two epoch averages."""

    loss_sum: jax.Array
    count: jax.Array
    history: jax.Array  # [2, K]: older, newer epoch averages
    num_epochs: jax.Array


def dwa(temperature: float = 2.0, steps_per_epoch: int = 1) -> Scalarizer:
    """Dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019).

    ``w_k(t) = K exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T)`` with ``r_k(t-1) = L_k(t-1) /
    L_k(t-2)``, the ratio of the task's average losses over the two previous epochs; ``w = 1``
    until two epochs are complete (LibMTL). ``loss = sum_k w_k L_k``. The state accumulates the
    losses of every call and closes an epoch every ``steps_per_epoch`` calls: pass your number of
    batches per epoch for the paper's epoch averages (the default 1 makes every step an epoch).
    """
    if not temperature > 0:
        raise ValueError(f"DWA's temperature must be > 0; got {temperature}.")
    if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
        raise ValueError(
            f"DWA's steps_per_epoch must be a positive integer; got {steps_per_epoch}."
        )
    per_epoch = int(steps_per_epoch)

    def init(num_tasks: int) -> DWAState:
        k = _check_num_tasks(num_tasks, "dwa")
        dtype = _float_dtype()
        zero = jnp.zeros((), jnp.int32)
        return DWAState(jnp.zeros((k,), dtype), zero, jnp.ones((2, k), dtype), zero)

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = _check_losses(losses, state.loss_sum.shape[0], "dwa")
        num = losses.shape[0]
        older, newer = state.history[0], state.history[1]
        ratio = newer / jnp.where(older != 0, older, 1.0)
        weights = jnp.where(
            state.num_epochs >= 2, num * jax.nn.softmax(ratio / temperature), jnp.ones(num)
        ).astype(losses.dtype)
        values = jax.lax.stop_gradient(losses).astype(state.loss_sum.dtype)
        loss_sum = state.loss_sum + values
        count = state.count + 1
        closes = count == per_epoch
        average = loss_sum / per_epoch
        history = jnp.where(closes, jnp.stack([newer, average]), state.history)
        new = DWAState(
            jnp.where(closes, 0.0, loss_sum),
            jnp.where(closes, 0, count),
            history,
            state.num_epochs + closes.astype(jnp.int32),
        )
        return _weighted_sum(losses, weights), weights, _keep_if_finite(values, new, state)

    return Scalarizer(init, scalarize, _no_post_step)


def gls() -> Scalarizer:
    """Geometric loss strategy (Chennupati et al., "MultiNet++", CVPR-W 2019): ``(prod_k L_k)^(1/K)``.

    Computed as ``exp(mean(log L))``; its gradient has the weights ``GLS / (K L_k)``. The losses
    must be positive (a zero loss makes the product 0 and its own weight infinite).
    """

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = _check_losses(losses, None, "gls")
        loss = jnp.exp(jnp.mean(jnp.log(losses)))
        values = jax.lax.stop_gradient(losses)
        weights = jax.lax.stop_gradient(loss) / (losses.shape[0] * values)
        return loss, weights, state

    return Scalarizer(lambda num_tasks: EmptyState(), scalarize, _no_post_step)


class STCHState(NamedTuple):
    """State of :func:`stch`'s warm-up: calls so far and the running sum of the losses."""

    step: jax.Array
    nadir_sum: jax.Array


def stch(
    mu: float = 1.0,
    pref_vector: Sequence[float] | None = None,
    reference: Sequence[float] | None = None,
    warmup_steps: int = 0,
    nadir_steps: int = 0,
) -> Scalarizer:
    """Smooth Tchebycheff scalarisation (Lin, Zhang, Liu & Zhang, ICML 2024).

    ``loss = mu log sum_k exp(lambda_k (L_k - z_k) / mu)``, a smooth upper bound of
    ``max_k lambda_k (L_k - z_k)`` that tightens as ``mu -> 0``; ``lambda`` = ``pref_vector``
    (default ``1/K``), ``z`` = ``reference`` (the ideal point, default 0). Weights: ``lambda_k
    softmax(lambda (L - z) / mu)_k``.

    With ``nadir_steps > 0`` it follows the official multi-task recipe (Xi-L/STCH ``STCH_MTL``,
    LibMTL ``STCH``, counted in calls instead of epochs): for ``warmup_steps`` calls and then
    ``nadir_steps`` more the loss is ``sum_k log L_k``, and the losses of the last ``nadir_steps``
    calls are averaged into the nadir ``n``; afterwards ``loss = K mu log sum_k exp(log(L_k / n_k)
    / mu)`` (LibMTL's defaults: mu = 1, 4 warm-up epochs, 1 nadir epoch).
    """
    if not mu > 0:
        raise ValueError(f"STCH's mu must be > 0; got {mu}.")
    for name, value in (("warmup_steps", warmup_steps), ("nadir_steps", nadir_steps)):
        if int(value) != value or value < 0:
            raise ValueError(f"STCH's {name} must be an integer >= 0; got {value}.")
    pref = None if pref_vector is None else np.asarray(pref_vector, dtype=float)
    ref = None if reference is None else np.asarray(reference, dtype=float)
    official = nadir_steps > 0
    start = int(warmup_steps)
    stop = start + int(nadir_steps)

    def init(num_tasks: int) -> STCHState:
        k = _check_num_tasks(num_tasks, "stch")
        for name, vec in (("pref_vector", pref), ("reference", ref)):
            if vec is not None and vec.shape != (k,):
                raise ValueError(f"stch {name} has shape {vec.shape}; expected ({k},).")
        return STCHState(jnp.zeros((), jnp.int32), jnp.zeros((k,), _float_dtype()))

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = _check_losses(losses, state.nadir_sum.shape[0], "stch")
        num = losses.shape[0]
        dtype = losses.dtype
        values = jax.lax.stop_gradient(losses)
        if not official:
            lam = jnp.full(num, 1.0 / num, dtype) if pref is None else jnp.asarray(pref, dtype)
            y = lam * (losses - (0.0 if ref is None else jnp.asarray(ref, dtype)))
            loss = mu * jax.nn.logsumexp(y / mu)
            weights = lam * jax.nn.softmax(jax.lax.stop_gradient(y) / mu)
            return loss, weights, STCHState(state.step + 1, state.nadir_sum)
        in_warmup = state.step < stop
        collect = (state.step >= start) & in_warmup
        nadir_sum = jnp.where(collect, state.nadir_sum + values, state.nadir_sum)
        nadir = state.nadir_sum.astype(dtype) / max(stop - start, 1)
        safe_nadir = jnp.where(nadir > 0, nadir, 1.0)
        logs = jnp.log(losses / safe_nadir + 1e-20)
        stch_loss = num * mu * jax.nn.logsumexp(logs / mu)
        warm_loss = jnp.sum(jnp.log(losses + 1e-20))
        loss = jnp.where(in_warmup, warm_loss, stch_loss)
        stch_weights = (
            num * jax.nn.softmax(jax.lax.stop_gradient(logs) / mu) / (values + 1e-20 * safe_nadir)
        )
        weights = jnp.where(in_warmup, 1.0 / (values + 1e-20), stch_weights)
        new = STCHState(state.step + 1, nadir_sum.astype(state.nadir_sum.dtype))
        return loss, weights, _keep_if_finite(values, new, state)

    return Scalarizer(init, scalarize, _no_post_step)


# ---------------------------------------------------------------------------------------------
# FAMO.


class FAMOState(NamedTuple):
    """State of :func:`famo`: the logits, their optimizer state, and the losses before the step."""

    logits: jax.Array
    opt_state: PyTree
    prev_losses: jax.Array


_FAMO_EPS = 1e-8


def famo(
    gamma: float = 0.01, w_lr: float = 0.025, min_losses: float | Sequence[float] = 0.0
) -> Scalarizer:
    """FAMO (Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023).

    ``loss = sum_k z_k log(L_k - b_k + 1e-8) / c`` with ``z = softmax(xi)`` and the constant
    ``c = sum_k z_k / (L_k - b_k + 1e-8)`` (so the weights ``z_k / (c (L_k - b_k))`` sum to 1);
    ``b`` = ``min_losses`` (default 0: the losses must be positive).

    The logits ``xi`` are learned from the change of the log-losses across the model step:
    ``post_step(state, new_losses)``, called after the optimizer step with the losses recomputed on
    the same batch (one extra forward pass, as in the official code), sets ``delta = log(L_before -
    b) - log(L_after - b)``, the gradient ``J_softmax(xi)^T delta`` and takes one Adam step with
    learning rate ``w_lr`` and L2 weight decay ``gamma`` (``torch.optim.Adam(weight_decay=gamma)``:
    ``optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))``). Defaults are the official
    standalone ``famo.py`` (gamma 0.01, w_lr 0.025; LibMTL uses gamma 1e-3). The official
    ``max_norm`` clipping of the shared gradient belongs in the optax chain
    (``optax.clip_by_global_norm(1.0)``).
    """
    optimizer = optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))
    bound = np.asarray(min_losses, dtype=float)

    def init(num_tasks: int) -> FAMOState:
        k = _check_num_tasks(num_tasks, "famo")
        if bound.ndim != 0 and bound.shape != (k,):
            raise ValueError(f"famo min_losses has shape {bound.shape}; expected () or ({k},).")
        dtype = _float_dtype()
        logits = jnp.zeros((k,), dtype)
        return FAMOState(logits, optimizer.init(logits), jnp.zeros((k,), dtype))

    def scalarize(losses, state, *, grad_norms=None):
        del grad_norms
        losses = _check_losses(losses, state.logits.shape[0], "famo")
        z = jax.nn.softmax(state.logits).astype(losses.dtype)
        gap = losses - jnp.asarray(bound, losses.dtype) + _FAMO_EPS
        c = jax.lax.stop_gradient(jnp.sum(z / gap))
        loss = jnp.sum(z * jnp.log(gap)) / c
        weights = jax.lax.stop_gradient(z / (c * gap))
        values = jax.lax.stop_gradient(losses).astype(state.prev_losses.dtype)
        new = state._replace(prev_losses=values)
        return loss, weights, _keep_if_finite(values, new, state)

    def post_step(state: FAMOState, new_losses: jax.Array) -> FAMOState:
        new_losses = _check_losses(new_losses, state.logits.shape[0], "famo.post_step")
        b = jnp.asarray(bound, state.prev_losses.dtype)
        after = jax.lax.stop_gradient(new_losses).astype(state.prev_losses.dtype)
        delta = jnp.log(state.prev_losses - b + _FAMO_EPS) - jnp.log(after - b + _FAMO_EPS)
        _, vjp = jax.vjp(jax.nn.softmax, state.logits)
        (grad,) = vjp(delta)
        updates, opt_state = optimizer.update(grad, state.opt_state, state.logits)
        new = FAMOState(optax.apply_updates(state.logits, updates), opt_state, state.prev_losses)
        return _keep_if_finite(delta, new, state)

    return Scalarizer(init, scalarize, post_step)


# ---------------------------------------------------------------------------------------------
# GradNorm.


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`: the task weights, their optimizer, ``L(0)`` and the step."""

    weights: jax.Array
    opt_state: PyTree
    initial_losses: jax.Array
    step: jax.Array


def layer_grad_norms(jac: PyTree, layer: str | Callable[[str], bool]) -> jax.Array:
    """``|d L_k / d W|`` for every task: the norms of the rows of the layer ``W`` in a task Jacobian.

    Args:
      jac: a task Jacobian (leaves ``[K, ...]``), e.g. from :func:`mtl_jax.value_and_jacobian`.
        Under ``jit`` only the selected leaves are computed: XLA drops the rest of the K backward
        passes, so differentiating all the parameters and selecting the last shared layer costs
        K backward passes through the layers above it only.
      layer: a ``/``-joined path prefix (``"params/Dense_2"``) or a predicate ``path -> bool``.

    Returns:
      ``norms[K]``, the input of :func:`gradnorm`'s ``grad_norms``.
    """
    select = (
        layer if callable(layer) else (lambda path: path == layer or path.startswith(layer + "/"))
    )
    chosen = [leaf for path, leaf in _tree.leaves_with_paths(jac) if select(path)]
    if not chosen:
        paths = [path for path, _ in _tree.leaves_with_paths(jac)]
        raise ValueError(f"layer {layer!r} selects no leaf of the Jacobian; its leaves: {paths}.")
    _tree.task_axis_size(chosen)
    sq = jnp.zeros((chosen[0].shape[0],), jnp.result_type(*chosen))
    for leaf in chosen:
        sq = sq + jnp.sum(jnp.reshape(jnp.square(leaf), (leaf.shape[0], -1)), axis=1)
    return jnp.sqrt(sq)


def gradnorm(alpha: float = 1.5, learning_rate: float = 0.025) -> Scalarizer:
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, Algorithm 1).

    ``loss = sum_k w_k L_k``. With ``n_k = |d L_k / d W|`` for a chosen shared layer ``W`` (pass them
    as ``grad_norms``: :func:`layer_grad_norms` reads them off that layer's rows of a task
    Jacobian), ``G_k = w_k n_k``, ``G_bar = mean_k G_k``, ``r_k = L~_k / mean(L~)`` with
    ``L~_k = L_k / L_k(0)``, GradNorm minimises ``L_grad = sum_k |G_k - G_bar r_k^alpha|`` over ``w``
    with the targets held constant: one Adam step (``learning_rate``) on ``d L_grad / d w_k =
    sign(G_k - target_k) n_k``, then ``w`` is renormalised to sum to K. The network uses the weights
    of the current step; the new ones apply from the next. ``L(0)`` are the losses of the first
    call; weights start at 1. Defaults: alpha 1.5 (paper's NYUv2 value, LibMTL), Adam learning
    rate 0.025 (common in public implementations; the paper trains ``w`` with the network's
    optimizer).
    """
    if not alpha >= 0:
        raise ValueError(f"GradNorm's alpha must be >= 0; got {alpha}.")
    optimizer = optax.adam(learning_rate)

    def init(num_tasks: int) -> GradNormState:
        k = _check_num_tasks(num_tasks, "gradnorm")
        dtype = _float_dtype()
        weights = jnp.ones((k,), dtype)
        return GradNormState(
            weights, optimizer.init(weights), jnp.ones((k,), dtype), jnp.zeros((), jnp.int32)
        )

    def scalarize(losses, state, *, grad_norms=None):
        if grad_norms is None:
            raise ValueError(
                "gradnorm needs grad_norms=[K]: the task gradient norms of the shared layer W "
                "(see mtl_jax.scalarize.layer_grad_norms)."
            )
        losses = _check_losses(losses, state.weights.shape[0], "gradnorm")
        norms = jnp.asarray(grad_norms)
        if norms.shape != losses.shape:
            raise ValueError(
                f"gradnorm: grad_norms has shape {norms.shape}; expected {losses.shape}."
            )
        num = losses.shape[0]
        dtype = state.weights.dtype
        w = state.weights
        values = jax.lax.stop_gradient(losses).astype(dtype)
        norms = jax.lax.stop_gradient(norms).astype(dtype)
        initial = jnp.where(state.step == 0, values, state.initial_losses)
        ratio = values / jnp.where(initial != 0, initial, 1.0)
        inverse_rate = ratio / jnp.mean(ratio)
        weighted_norms = w * norms
        target = jnp.mean(weighted_norms) * inverse_rate**alpha
        grad_w = jnp.sign(weighted_norms - target) * norms
        updates, opt_state = optimizer.update(grad_w, state.opt_state, w)
        stepped = optax.apply_updates(w, updates)
        renormalised = num * stepped / jnp.sum(stepped)
        new = GradNormState(renormalised, opt_state, initial, state.step + 1)
        finite = jnp.all(jnp.isfinite(norms))
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        weights = w.astype(losses.dtype)
        return _weighted_sum(losses, weights), weights, _keep_if_finite(values, new, state)

    return Scalarizer(init, scalarize, _no_post_step)


SCALARIZERS: dict[str, Callable[..., Scalarizer]] = {
    "mean": mean,
    "sum": sum,
    "rlw": rlw,
    "uw": uw,
    "imtl_l": imtl_l,
    "dwa": dwa,
    "gls": gls,
    "stch": stch,
    "famo": famo,
    "gradnorm": gradnorm,
}


def get_scalarizer(name: str, **hyperparams: Any) -> Scalarizer:
    """Builds the loss-only method registered as ``name`` (experiment configs select by name).

    Raises:
      ValueError: for an unknown name (listing the valid ones) or an unknown hyper-parameter
        (listing the method's).
    """
    return build("scalarizer", SCALARIZERS, name, hyperparams)


# ---------------------------------------------------------------------------------------------
# As an aggregator of a task Jacobian.

SCALARIZER_STATE_KEY = "scalarizer"


def from_scalarizer(
    scalarizer: Scalarizer,
    *,
    num_tasks: int,
    grad_norm_layer: str | Callable[[str], bool] | None = None,
    name: str = "scalarizer",
) -> Any:
    """A loss-only method as an aggregator of a task Jacobian: ``sum_k w_k g_k`` with the weights
    of ``scalarizer.scalarize(task_losses, ...)``.

    Since ``d loss / d theta = sum_k w_k d L_k / d theta`` (the weights are constants of the
    backward pass), this is the gradient of the scalarized loss, computed from a Jacobian that a
    train loop has anyway (e.g. to measure conflicts with the same Gram matrices). Without that
    need, one backward pass of the scalarized loss is cheaper (the module docstring's step).

    Args:
      scalarizer: e.g. ``get_scalarizer("uw")``.
      num_tasks: K (every scalarizer's state needs it).
      grad_norm_layer: for GradNorm, the shared layer whose task-gradient norms it balances
        (:func:`layer_grad_norms` of the Jacobian).

    ``update(jac, state, params, task_losses=...)`` requires ``task_losses``. Heads: scale each
    head's own gradient by its task's weight (``mtl.last_weights(state)``) to match the gradient of
    the scalarized loss. FAMO: call :func:`post_step_in_state` after the optimizer step.
    """
    from mtl_jax.aggregate import from_weights_fn  # the aggregate module does not import this one

    def weights_fn(jac, gram, inner, key, task_losses, extra_args):
        del gram, key, extra_args
        if task_losses is None:
            raise ValueError(f"{name} (a loss-only method) needs task_losses=... in update.")
        norms = None if grad_norm_layer is None else layer_grad_norms(jac, grad_norm_layer)
        _, weights, inner = scalarizer.scalarize(task_losses, inner, grad_norms=norms)
        return weights, inner

    return from_weights_fn(
        weights_fn,
        lambda: scalarizer.init(num_tasks),
        num_tasks=num_tasks,
        inner_key=SCALARIZER_STATE_KEY,
        name=name,
    )


def post_step_in_state(opt_state: PyTree, scalarizer: Scalarizer, new_losses: jax.Array) -> PyTree:
    """Applies ``scalarizer.post_step`` to the state of a :func:`from_scalarizer` aggregator found
    anywhere inside an optax state (FAMO: the losses recomputed after the step)."""
    from mtl_jax.aggregate import AggregatorState

    def visit(x: Any) -> Any:
        if isinstance(x, AggregatorState) and SCALARIZER_STATE_KEY in x.inner:
            inner = scalarizer.post_step(x.inner[SCALARIZER_STATE_KEY], new_losses)
            return x._replace(inner={SCALARIZER_STATE_KEY: inner})
        return x

    return jax.tree.map(visit, opt_state, is_leaf=lambda x: isinstance(x, AggregatorState))
