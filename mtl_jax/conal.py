"""CoNAL: conflict-noticed architecture learning (Yue, Zhang & Liang, AAAI 2023), and CoNAL-Pro.

A backbone is cut into B sequential blocks ``f^(0..B-1)`` (``P = B + 1`` branch points). Every task
k has a purely task-specific copy ``h_k^(b)`` of every block and a softmax over branch points.
**Branch point** ``p in {0..B}`` (0-based, = the number of shared blocks; the paper's 1-based
``p`` is this plus one) means: task k uses the shared blocks ``0..p-1`` and then its own copies
``p..B-1``. ``p = B`` is the fully shared encoder, ``p = 0`` the fully private one. The pieces:

* :class:`Block`, :func:`linen_block`, :func:`nnx_block`: a block as pure ``init``/``apply``
  functions (Flax Linen or NNX; BatchNorm statistics are the block's *state*).
* :class:`Supernet`: the relaxed search space; ``init`` gives
  ``params = {"shared": [block params], "private": [block params, leaves [K, ...]],
  "alpha": f32[K, P]}`` (alpha = 1: uniform softmax, as the official code) and
  ``state = {"shared": [...], "private": [...]}``. ``apply(params, state, x, weights)`` returns
  the per-task encoder features ``[K, N, ...]``. Private blocks run for all tasks under one
  ``jax.vmap`` over the task axis; the shared blocks run once.
* :func:`make_search`: the alternating first-order search step (one pure, jit-able function).
* :func:`discretise`, :class:`Architecture`, :func:`architecture_init` / :func:`architecture_apply`
  (the retrain model), :func:`param_counts`, :func:`architecture_text`.
* CoNAL-Pro: :func:`pro_restrict`, :func:`pro_decide`, :func:`pro_architecture`,
  :func:`search_pro`.

Path mixing (``Supernet.mixing``)
---------------------------------
The paper's relaxed encoder feature of task k is ``z_k = sum_p w_kp z_k^(p)`` with
``w_k = softmax(alpha_k)`` and ``z_k^(p) = h_k^(B-1) o ... o h_k^(p) o f^(p-1) o ... o f^(0) (x)``
(the official ``model.py`` loops over branch points and runs the private suffix
``h_k^(p..B-1)`` once per branch point: the private *weights* are shared across a task's paths,
the private *computation* is not). Two formulations are offered:

* ``"paths"`` (exact): per task the streams of all paths that have branched are carried as a
  stacked axis; private block b runs (vmapped over the path axis) on the ``b + 1`` streams that
  branched at or before b. Cost per task: ``B (B + 1) / 2`` private block evaluations (the official
  code's amount), one shared pass. Equals the P-path mixture for any block. BatchNorm in training
  mode normalises every path stream with its own batch statistics (as the official per-path
  calls do); the running statistics of a private block get one update with the mean over its
  path streams (the official code applies one momentum update per path call).
* ``"stream"`` (default; one private pass per task, as the issue asks): task k carries ONE private
  stream, the running convex mixture of its paths. With ``s_b`` the shared feature entering block
  b and ``c_b = sum_{p <= b} w_kp``::

      u_0 = s_0 = x
      u_b = (c_{b-1} h_k^(b-1)(u_{b-1}) + w_kb s_b) / c_b        (b = 1..B-1; u_b = s_b if c_b = 0)
      z_k = c_{B-1} h_k^(B-1)(u_{B-1}) + w_kB s_B

  This is **exactly** the P-path mixture when the private blocks are affine (an affine map
  commutes with a convex combination; proof by induction on b) and whenever ``w_k`` is one-hot
  (every discretised architecture, and hard Gumbel samples). For non-linear blocks it is a
  relaxation: the private block sees the mixture of its paths' inputs instead of mixing their
  outputs. The private block input is always a convex combination of path features, so its scale
  matches the discrete architecture's. Cost: one shared pass plus one private pass per task.

``tests/test_conal.py`` checks both against a naive P x K reference (every path computed
separately): ``"paths"`` on a non-linear model, ``"stream"`` on affine blocks and at one-hot
weights.

Learning (:func:`make_search`, the official ``search.py``)
--------------------------------------------------------
One step = (1) an architecture update: the gradient of the summed task losses on a held-out
batch with respect to ``alpha`` (weights fixed), with its own optax optimizer (default Adam lr
5e-5 with L2 weight decay 1e-5 added to the gradient, as ``torch.optim.Adam(weight_decay=...)``);
then (2) a weight update on a training batch with the new ``alpha`` (default: clip the global norm
of the weight gradient at 5, L2 decay 1e-5, Adam lr 1e-4). Both forwards run in training mode
(BatchNorm uses batch statistics and updates its running averages on both batches, as the
official loop, which never calls ``model.eval()``).

Conflict noticing (``nocl=True``, default): the shared blocks' per-task gradients go through
:func:`mtl_jax.nocl` with one group per shared block (:func:`block_grouping`): a block with any
negative pairwise inner product gets no update, otherwise the mean of its task gradients. They
are computed without K backward passes through the whole supernet: the trunk (shared blocks) runs
once; one backward pass of the summed loss through the private streams gives, in row t of the
cotangent of the task-broadcast trunk features, task t's gradient with respect to every shared
feature (task t's loss sees only row t); K vmapped backward passes through the trunk alone then
give the Jacobian rows. Cost of a step: two forwards (architecture and weight batch), each one
trunk pass plus one private pass per task (``"stream"``), their backward passes, and K trunk
backward passes for nocl. Private copies and heads get the gradient of
the summed loss. ``nocl=False`` gives the shared blocks the gradient of the summed loss (what the
released search loop does: it builds ``NOCLGrad`` but calls a plain ``backward()``). Any other
aggregator can be passed as ``shared_aggregator``. Departure from the official ``NOCLGrad``:
there, after the per-task backward passes, the private parameters keep the gradient of the last
task only (a bug); here they get the summed-loss gradient.

Gumbel-softmax (``gumbel=True``): straight-through hard samples ``one_hot(argmax((alpha + g) /
tau))`` with the soft sample's gradient (``F.gumbel_softmax(hard=True)``), drawn independently
for the architecture and the weight forward; the default is the plain softmax.

CoNAL-Pro (details UNVERIFIED in the paper; this library's concrete algorithm)
--------------------------------------------------------------------------------
Stages go from the deepest branch point ``d = B`` toward the input. In stage d every undecided
task searches over the candidates ``0..d`` (the other logits are masked to -inf; ``alpha`` and the
weights are warm-started from the previous stage); decided tasks keep their one-hot weights.
After the stage's steps the undecided tasks whose (masked) argmax is d are decided at d and form
**task groups**: if ``d < B`` each group's private copies of blocks ``d..B-1`` are averaged and
tied (``SearchState.tie``: after every weight update the rows of a group are replaced by their
mean, so the group trains one partially-specific copy, the paper's ``h_S``). Tasks decided at the
same point share a group unless their shared-block gradients conflicted at the stage's last step
(greedy split, :func:`split_by_conflict`; our addition: the paper only says that tasks branching
at the same point share a partially-specific module). The last stage (d = 0) decides everybody
left. The result is an :class:`Architecture` with ``grouped=True`` (and group labels). Stages
reuse the same jitted step (the mask and the tie matrices are state values, not trace constants).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.aggregate import last_gram, nocl
from mtl_jax.gramian import group_gramians

PyTree = Any
Batch = tuple[Any, Any]

__all__ = [
    "MIXINGS",
    "TASK_MAPS",
    "Architecture",
    "Block",
    "Search",
    "SearchConfig",
    "SearchState",
    "Supernet",
    "architecture_apply",
    "architecture_init",
    "architecture_text",
    "block_grouping",
    "block_param_counts",
    "branch_weights",
    "default_arch_optimizer",
    "default_weight_optimizer",
    "discretise",
    "inherit_params",
    "linen_block",
    "make_search",
    "nnx_block",
    "param_counts",
    "pro_architecture",
    "pro_decide",
    "pro_restrict",
    "retrain_task_specific",
    "search_pro",
    "split_by_conflict",
]

MIXINGS = ("stream", "paths")


# --------------------------------------------------------------------------------------------
# Blocks


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


def _bcast(w: jax.Array, like: jax.Array) -> jax.Array:
    """``w: [K] -> [K, 1, ..., 1]`` broadcastable against ``like: [K, ...]``."""
    return jnp.reshape(w, w.shape + (1,) * (jnp.ndim(like) - w.ndim)).astype(like.dtype)


TASK_MAPS = ("vmap", "scan", "unroll")


def _vmap_apply(
    block: Block, train: bool, path_axis: bool = False, task_map: str = "vmap"
) -> Callable:
    """``(params[K], state[K], x[K, ...]) -> (y[K, ...], state[K])``: all task copies at once.

    ``task_map="vmap"``: one batched call (per-task kernels become batched matmuls / grouped
    convolutions); ``"scan"``: ``jax.lax.map`` over the copies (a loop in the compiled program);
    ``"unroll"``: K separate calls in the traced program (it grows with K). On XLA:CPU the
    gradients of vmapped (grouped) and of looped convolutions are 7-60x slower than K plain ones
    (benchmarks/conal_step.py), so ``"unroll"`` is the CPU choice for conv backbones.
    With ``path_axis`` the input is ``[K, Q, ...]`` (Q path streams per task), the inner vmap maps
    the streams with the task's params and the new state is averaged over the Q streams.
    """

    def one(params: PyTree, state: PyTree, x: Any) -> tuple[Any, PyTree]:
        return block.apply(params, state, x, train)

    def per_task(params: PyTree, state: PyTree, xs: Any) -> tuple[Any, PyTree]:
        ys, states = jax.vmap(one, in_axes=(None, None, 0))(params, state, xs)
        return ys, jax.tree.map(lambda s, old: jnp.mean(s, axis=0).astype(old.dtype), states, state)

    fn = per_task if path_axis else one
    if task_map == "scan":
        return lambda params, state, x: jax.lax.map(lambda a: fn(*a), (params, state, x))
    if task_map == "unroll":

        def unrolled(params: PyTree, state: PyTree, x: Any) -> tuple[Any, PyTree]:
            rows = [
                fn(*jax.tree.map(lambda a, t=t: a[t], (params, state, x)))
                for t in range(jax.tree.leaves(x)[0].shape[0])
            ]
            return _stack(rows)

        return unrolled
    return jax.vmap(fn)


# --------------------------------------------------------------------------------------------
# The supernet


def branch_weights(
    alpha: jax.Array,
    candidates: jax.Array | None = None,
    key: jax.Array | None = None,
    *,
    gumbel: bool = False,
    tau: float = 1.0,
    hard: bool = True,
) -> jax.Array:
    """Mixing weights ``w[K, P]`` from the architecture logits ``alpha[K, P]``.

    ``softmax`` over each task's candidate branch points (``candidates: bool[K, P]``, default
    all; masked logits get weight exactly 0). ``gumbel=True``: Gumbel-softmax with temperature
    ``tau`` (needs ``key``); ``hard=True`` returns the straight-through one-hot sample (forward
    one-hot, gradient of the soft sample), as ``F.gumbel_softmax(hard=True)`` in the official code.
    """
    logits = alpha if candidates is None else jnp.where(candidates, alpha, -jnp.inf)
    if not gumbel:
        return jax.nn.softmax(logits, axis=-1)
    if key is None:
        raise ValueError("branch_weights(gumbel=True) needs a PRNG key.")
    noise = jax.random.gumbel(key, alpha.shape, alpha.dtype)
    soft = jax.nn.softmax((logits + noise) / tau, axis=-1)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), alpha.shape[-1], dtype=soft.dtype)
    return one_hot - jax.lax.stop_gradient(soft) + soft


@dataclasses.dataclass(frozen=True, eq=False)
class Supernet:
    """CoNAL's search space over a sequence of blocks (see the module docstring).

    Equality and hashing are by identity, so a supernet can be a static argument of ``jax.jit``.

    Attributes:
      blocks: the B backbone blocks, input to output.
      num_tasks: K.
      mixing: ``"stream"`` (one private pass per task; exact for affine blocks and one-hot
        weights) or ``"paths"`` (the exact P-path mixture, ``B (B + 1) / 2`` private block
        evaluations per task).
      alpha_init: initial architecture logit (1.0 as the official code: a uniform softmax).
      task_map: how the K private copies of a block run: ``"vmap"`` (one batched call, the
        default; best on accelerators), ``"scan"`` (``jax.lax.map``, a compiled loop; on CPU the
        fastest for large-K MLPs) or ``"unroll"`` (K calls in the traced program, which then
        grows with K; on CPU the fastest for conv blocks, whose vmapped or looped gradients
        XLA:CPU runs slowly). Only ``"unroll"`` has a per-task Python loop in the step.
    """

    blocks: tuple[Block, ...]
    num_tasks: int
    mixing: str = "stream"
    alpha_init: float = 1.0
    task_map: str = "vmap"

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if not self.blocks:
            raise ValueError("Supernet needs at least one block.")
        if int(self.num_tasks) != self.num_tasks or self.num_tasks < 1:
            raise ValueError(f"Supernet num_tasks must be an integer >= 1; got {self.num_tasks}.")
        if self.mixing not in MIXINGS:
            raise ValueError(f"Unknown mixing {self.mixing!r}; choose from {MIXINGS}.")
        if self.task_map not in TASK_MAPS:
            raise ValueError(f"Unknown task_map {self.task_map!r}; choose from {TASK_MAPS}.")

    @property
    def num_blocks(self) -> int:
        """B."""
        return len(self.blocks)

    @property
    def num_branch_points(self) -> int:
        """P = B + 1."""
        return len(self.blocks) + 1

    def init(self, key: jax.Array, x: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(params, state)`` for an example input batch ``x``.

        Every block gets a shared instance and K private copies, each with its own random init.
        """
        k = self.num_tasks
        keys = jax.random.split(key, self.num_blocks * (k + 1)).reshape(self.num_blocks, k + 1, -1)
        shared, shared_state, private, private_state = [], [], [], []
        s = x
        for block, bkeys in zip(self.blocks, keys, strict=True):
            p, st = block.init(bkeys[0], s)
            copies = [block.init(bkeys[1 + t], s) for t in range(k)]
            shared.append(p)
            shared_state.append(st)
            private.append(_stack([c[0] for c in copies]))
            private_state.append(_stack([c[1] for c in copies]))
            s, _ = block.apply(p, st, s, False)
        alpha = jnp.full((k, self.num_branch_points), self.alpha_init, jnp.float32)
        params = {"shared": shared, "private": private, "alpha": alpha}
        state = {"shared": shared_state, "private": private_state}
        return params, state

    def apply(
        self,
        params: dict[str, Any],
        state: dict[str, Any],
        x: Any,
        weights: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Per-task encoder features ``[K, N, ...]`` and the new state.

        Args:
          params: ``{"shared", "private"[, "alpha"]}`` from :meth:`init`.
          state: ``{"shared", "private"}``.
          x: input batch ``[N, ...]`` (the same for every task).
          weights: mixing weights ``w[K, P]``; default ``softmax(params["alpha"])``.
          train: training mode (BatchNorm batch statistics, state updated).
        """
        k, nb = self.num_tasks, self.num_blocks
        if weights is None:
            weights = jax.nn.softmax(params["alpha"], axis=-1)
        if jnp.shape(weights) != (k, nb + 1):
            raise ValueError(
                f"weights must be [K, P] = [{k}, {nb + 1}] (one weight per branch point); got "
                f"{jnp.shape(weights)}."
            )
        for name in ("shared", "private"):
            if len(params[name]) != nb or len(state[name]) != nb:
                raise ValueError(
                    f"params[{name!r}] and state[{name!r}] need one entry per block ({nb}); got "
                    f"{len(params[name])} and {len(state[name])}. Build them with Supernet.init."
                )
        feats, shared_state = self.trunk(params["shared"], state["shared"], x, train=train)
        feats_k = self.broadcast(feats)
        z, private_state = self.mix(
            params["private"], state["private"], feats_k, weights, train=train
        )
        return z, {"shared": shared_state, "private": private_state}

    def trunk(
        self, shared_params: list[PyTree], shared_state: list[PyTree], x: Any, *, train: bool
    ) -> tuple[list[Any], list[PyTree]]:
        """The shared blocks, run once: ``([s_0 = x, s_1, ..., s_B], new shared state)``."""
        feats = [x]
        new_state = []
        for b, block in enumerate(self.blocks):
            s, st = block.apply(shared_params[b], shared_state[b], feats[-1], train)
            feats.append(s)
            new_state.append(st)
        return feats, new_state

    def broadcast(self, feats: list[Any]) -> list[Any]:
        """Every shared feature with a task axis: ``s_b -> [K, *s_b.shape]`` (no copy in XLA)."""
        return [jnp.broadcast_to(f, (self.num_tasks, *jnp.shape(f))) for f in feats]

    def mix(
        self,
        private_params: list[PyTree],
        private_state: list[PyTree],
        feats_k: list[Any],
        weights: jax.Array,
        *,
        train: bool,
    ) -> tuple[jax.Array, list[PyTree]]:
        """The private streams and the path mixture from the trunk features ``feats_k`` (each
        ``[K, ...]``; row t is what task t sees). Task t's output depends on row t only."""
        if self.mixing == "paths":
            return self._mix_paths(private_params, private_state, feats_k, weights, train)
        return self._mix_stream(private_params, private_state, feats_k, weights, train)

    def _mix_stream(self, params, state, feats_k, weights, train):
        k = self.num_tasks
        y = None
        c = jnp.zeros((k,), weights.dtype)
        new_private = []
        for b, block in enumerate(self.blocks):
            w_b = weights[:, b]
            c_new = c + w_b
            s_k = feats_k[b]
            if y is None:
                u = s_k  # u_0 = x whatever the weights
            else:
                num = _bcast(c, y) * y + _bcast(w_b, y) * s_k
                pos = _bcast(c_new > 0, num)
                u = jnp.where(pos, num / jnp.where(pos, _bcast(c_new, num), 1.0), s_k)
            y, st = _vmap_apply(block, train, task_map=self.task_map)(params[b], state[b], u)
            new_private.append(st)
            c = c_new
        s_k = feats_k[-1]
        z = _bcast(c, y) * y + _bcast(weights[:, -1], s_k) * s_k
        return z, new_private

    def _mix_paths(self, params, state, feats_k, weights, train):
        streams = None  # [K, Q, N, ...]: the private streams of the paths that branched so far
        new_private = []
        for b, block in enumerate(self.blocks):
            s_k = feats_k[b][:, None]
            inp = s_k if streams is None else jnp.concatenate([streams, s_k], axis=1)
            streams, st = _vmap_apply(block, train, True, self.task_map)(params[b], state[b], inp)
            new_private.append(st)
        w = weights[:, :-1].astype(streams.dtype)
        z = jnp.einsum("kq,kq...->k...", w, streams, precision=jax.lax.Precision.HIGHEST)
        s_k = feats_k[-1]
        z = z + _bcast(weights[:, -1], s_k) * s_k
        return z, new_private


def block_grouping(path: str) -> str:
    """The grouping ``path -> group`` of the shared blocks' parameters: one group per block.

    Paths of ``params["shared"]`` start with the block index (``'2/params/Dense_0/kernel'``);
    the group is ``'block2'``. Use as ``mtl.nocl(granularity=block_grouping)``.
    """
    return "block" + path.split("/", 1)[0]


# --------------------------------------------------------------------------------------------
# The search step


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Hyper-parameters of :func:`make_search` (defaults: the official ``search.py``).

    Attributes:
      weight_lr, weight_decay, grad_clip: weight optimizer ``clip_by_global_norm(grad_clip)``,
        L2 decay added to the gradient, Adam. ``grad_clip = 0`` disables clipping.
      arch_lr, arch_weight_decay: architecture optimizer (L2 decay + Adam).
      nocl: CoNAL's conflict rule on the shared blocks (else the summed-loss gradient).
      track_conflict: compute the shared blocks' per-task Gram matrices even with ``nocl=False``
        (for the ``shared_conflict`` metric); costs the Jacobian rows of the shared blocks.
      gumbel, tau, hard: Gumbel-softmax sampling of the mixing weights (default: plain softmax).
      seed: PRNG seed for Gumbel samples.
    """

    weight_lr: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 5.0
    arch_lr: float = 5e-5
    arch_weight_decay: float = 1e-5
    nocl: bool = True
    track_conflict: bool = False
    gumbel: bool = False
    tau: float = 1.0
    hard: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_lr", "arch_lr", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SearchConfig.{name} must be > 0; got {getattr(self, name)}.")
        for name in ("weight_decay", "arch_weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"SearchConfig.{name} must be >= 0; got {getattr(self, name)}.")


def default_weight_optimizer(config: SearchConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm -> add_decayed_weights -> adam`` (torch Adam with ``weight_decay``)."""
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    parts += [optax.add_decayed_weights(config.weight_decay), optax.adam(config.weight_lr)]
    return optax.chain(*parts)


def default_arch_optimizer(config: SearchConfig) -> optax.GradientTransformation:
    """``add_decayed_weights -> adam`` on ``alpha``."""
    return optax.chain(
        optax.add_decayed_weights(config.arch_weight_decay), optax.adam(config.arch_lr)
    )


class SearchState(NamedTuple):
    """The state of the search (fixed structure, shapes and dtypes from ``init`` on).

    Attributes:
      params: ``{"shared", "private", "alpha": f32[K, P], "heads"}``.
      model_state: ``{"shared", "private"}`` (BatchNorm statistics; private leaves ``[K, ...]``).
      weight_opt_state: state of the weight optimizer (on shared, private and heads).
      arch_opt_state: state of the architecture optimizer (on alpha).
      aggregator_state: state of the shared-block aggregator (``optax.EmptyState()`` if none).
      candidates: ``bool[K, P]``, the branch points each task may choose (all, except in
        CoNAL-Pro stages).
      tie: ``f32[B, K, K]``, per block the row-averaging matrix of tied task groups (CoNAL-Pro);
        the identity otherwise.
      step: ``int32``, steps taken.
      key: PRNG key for Gumbel samples.
    """

    params: dict[str, Any]
    model_state: dict[str, Any]
    weight_opt_state: Any
    arch_opt_state: Any
    aggregator_state: Any
    candidates: jax.Array
    tie: jax.Array
    step: jax.Array
    key: jax.Array


class Search(NamedTuple):
    """``init(key, x, head_params) -> SearchState``; ``step(state, train_batch, val_batch)``."""

    init: Callable[..., SearchState]
    step: Callable[..., tuple[SearchState, dict[str, jax.Array]]]
    supernet: Supernet
    config: SearchConfig


def _weights_of(params: dict[str, Any]) -> dict[str, Any]:
    return {"shared": params["shared"], "private": params["private"], "heads": params["heads"]}


def _apply_tie(tree_list: list[PyTree], tie: jax.Array) -> list[PyTree]:
    """Per block b: every leaf ``[K, ...] -> tie[b] @ leaf`` (group means; identity: unchanged)."""

    def one(t: jax.Array, leaf: jax.Array) -> jax.Array:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            return leaf
        out = jnp.tensordot(t.astype(leaf.dtype), leaf, axes=1, precision=jax.lax.Precision.HIGHEST)
        return out.astype(leaf.dtype)

    return [jax.tree.map(lambda x, t=tie[b]: one(t, x), tree) for b, tree in enumerate(tree_list)]


def _check_losses(losses: Any, k: int) -> None:
    if jnp.shape(losses) != (k,):
        raise ValueError(
            f"loss_fn must return the task losses f32[K] = [{k}]; got shape {jnp.shape(losses)}."
        )


def make_search(
    supernet: Supernet,
    loss_fn: Callable[[PyTree, jax.Array, Any], jax.Array],
    config: SearchConfig = SearchConfig(),
    *,
    weight_optimizer: optax.GradientTransformation | None = None,
    arch_optimizer: optax.GradientTransformation | None = None,
    shared_aggregator: optax.GradientTransformation | None = None,
) -> Search:
    """CoNAL's alternating search as a pure ``init`` and a pure, jit-able ``step``.

    Args:
      supernet: the search space.
      loss_fn: ``(head_params, features[K, N, ...], targets) -> losses f32[K]``; the heads are
        any pytree (e.g. stacked per-task heads applied with ``jax.vmap``). ``losses[t]`` must
        depend on ``features[t]`` only (not on another task's features): the step reads every
        task's gradient with respect to the shared features off one backward pass of the summed
        loss, then gets the shared blocks' Jacobian rows from K backward passes through the
        shared blocks alone (not through the K private streams).
      config: :class:`SearchConfig`.
      weight_optimizer: optimizer of the weights (shared, private, heads); default
        :func:`default_weight_optimizer`.
      arch_optimizer: optimizer of alpha; default :func:`default_arch_optimizer`.
      shared_aggregator: an aggregator (:mod:`mtl_jax.aggregate`) for the shared blocks'
        Jacobian rows; default ``mtl.nocl(granularity=block_grouping)`` when ``config.nocl``,
        else the summed-loss gradient (no Jacobian).

    Returns:
      :class:`Search`. ``step(state, (x_train, y_train), (x_val, y_val)) -> (state, metrics)``
      with metrics ``train_losses[K]``, ``val_losses[K]``, ``alpha_softmax[K, P]`` (the masked
      softmax after the update: log it for the alpha trajectory), ``shared_conflict[B]`` (1 where
      some pair of task gradients on that shared block had a negative inner product: with nocl
      the block was not updated; 0 everywhere when no Jacobian is computed).

    Example::

      search = mtl.conal.make_search(supernet, loss_fn)
      state = search.init(jax.random.PRNGKey(0), x, head_params)
      step = jax.jit(search.step)
      for train_batch, val_batch in batches:
          state, metrics = step(state, train_batch, val_batch)
      branch_points = mtl.conal.discretise(state.params["alpha"])
    """
    k, nb = supernet.num_tasks, supernet.num_blocks
    weight_tx = weight_optimizer or default_weight_optimizer(config)
    arch_tx = arch_optimizer or default_arch_optimizer(config)
    aggregator = shared_aggregator
    if aggregator is None and config.nocl:
        aggregator = nocl(granularity=block_grouping, num_tasks=k)
    track = aggregator is not None or config.track_conflict
    if aggregator is None and track:
        aggregator = nocl(granularity=block_grouping, num_tasks=k)  # only for its Gram matrices
    use_aggregate = shared_aggregator is not None or config.nocl

    def init(key: jax.Array, x: Any, head_params: PyTree = None) -> SearchState:
        params, model_state = supernet.init(key, x)
        params["heads"] = {} if head_params is None else head_params
        return SearchState(
            params=params,
            model_state=model_state,
            weight_opt_state=weight_tx.init(_weights_of(params)),
            arch_opt_state=arch_tx.init(params["alpha"]),
            aggregator_state=aggregator.init(params["shared"]) if track else optax.EmptyState(),
            candidates=jnp.ones((k, nb + 1), bool),
            tie=jnp.broadcast_to(jnp.eye(k, dtype=jnp.float32), (nb, k, k)),
            step=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(config.seed),
        )

    def mixing(alpha: jax.Array, candidates: jax.Array, key: jax.Array) -> jax.Array:
        return branch_weights(
            alpha, candidates, key, gumbel=config.gumbel, tau=config.tau, hard=config.hard
        )

    def step(
        state: SearchState, train_batch: Batch, val_batch: Batch
    ) -> tuple[SearchState, dict[str, jax.Array]]:
        x_train, y_train = train_batch
        x_val, y_val = val_batch
        params = state.params
        key, arch_key, weight_key = jax.random.split(state.key, 3)

        # (1) architecture step on the held-out batch (weights fixed)
        def arch_loss(alpha: jax.Array) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
            w = mixing(alpha, state.candidates, arch_key)
            feats, new_ms = supernet.apply(params, state.model_state, x_val, w, train=True)
            losses = loss_fn(params["heads"], feats, y_val)
            _check_losses(losses, k)
            return jnp.sum(losses), (losses, new_ms)

        (_, (val_losses, model_state)), g_alpha = jax.value_and_grad(arch_loss, has_aux=True)(
            params["alpha"]
        )
        upd, arch_opt_state = arch_tx.update(g_alpha, state.arch_opt_state, params["alpha"])
        alpha = optax.apply_updates(params["alpha"], upd)

        # (2) weight step on the training batch with the new alpha
        w = jax.lax.stop_gradient(mixing(alpha, state.candidates, weight_key))

        # one trunk pass; its per-task cotangents come from ONE backward pass of the summed loss
        # through the private streams: task t's loss depends on row t of the broadcast trunk
        # features only, so row t of their cotangent is d loss_t / d s_b. The shared blocks'
        # Jacobian rows are then K (vmapped) backward passes through the trunk alone.
        def trunk(shared: PyTree) -> tuple[list[Any], list[PyTree]]:
            feats, new_state = supernet.trunk(shared, model_state["shared"], x_train, train=True)
            return feats[1:], new_state  # s_1..s_B (s_0 = x does not depend on the params)

        feats, trunk_vjp, shared_ms = jax.vjp(trunk, params["shared"], has_aux=True)
        x_k = supernet.broadcast([x_train])

        def private_losses(feats_k: list[Any], rest: PyTree) -> tuple[jax.Array, list[PyTree]]:
            z, new_private = supernet.mix(
                rest["private"], model_state["private"], x_k + feats_k, w, train=True
            )
            losses = loss_fn(rest["heads"], z, y_train)
            _check_losses(losses, k)
            return losses, new_private

        rest = {"private": params["private"], "heads": params["heads"]}
        losses, private_vjp, private_ms = jax.vjp(
            private_losses, supernet.broadcast(feats), rest, has_aux=True
        )
        model_state = {"shared": shared_ms, "private": private_ms}
        g_feats_k, g_rest = private_vjp(jnp.ones_like(losses))  # g_feats_k[b]: [K, ...]
        g_shared = trunk_vjp([jnp.sum(g, axis=0) for g in g_feats_k])[0]
        agg_state = state.aggregator_state
        conflict = jnp.zeros((nb,), jnp.float32)
        if track:
            jac = jax.vmap(lambda g: trunk_vjp(g)[0])(g_feats_k)  # leaves [K, ...]
            g_agg, agg_state = aggregator.update(
                jac, agg_state, params["shared"], task_losses=losses
            )
            if use_aggregate:
                g_shared = g_agg
            grams = group_gramians(jac, block_grouping)  # (XLA shares it with nocl's)
            off = ~jnp.eye(k, dtype=bool)
            conflict = jnp.stack(
                [
                    jnp.any(off & (grams[f"block{b}"] < 0)).astype(jnp.float32)
                    if f"block{b}" in grams
                    else jnp.zeros((), jnp.float32)
                    for b in range(nb)
                ]
            )
        grads = {"shared": g_shared, "private": g_rest["private"], "heads": g_rest["heads"]}
        weights = _weights_of(params)
        upd, weight_opt_state = weight_tx.update(grads, state.weight_opt_state, weights)
        weights = optax.apply_updates(weights, upd)
        weights["private"] = _apply_tie(weights["private"], state.tie)
        model_state = {
            "shared": model_state["shared"],
            "private": _apply_tie(model_state["private"], state.tie),
        }
        new_params = {**weights, "alpha": alpha}
        new_state = SearchState(
            params=new_params,
            model_state=model_state,
            weight_opt_state=weight_opt_state,
            arch_opt_state=arch_opt_state,
            aggregator_state=agg_state,
            candidates=state.candidates,
            tie=state.tie,
            step=state.step + 1,
            key=key,
        )
        metrics = {
            "train_losses": losses,
            "val_losses": val_losses,
            "alpha_softmax": branch_weights(alpha, state.candidates),
            "shared_conflict": conflict,
        }
        return new_state, metrics

    return Search(init, step, supernet, config)


# --------------------------------------------------------------------------------------------
# Discretisation, architectures, the retrain model


def discretise(alpha: Any, candidates: Any = None, *, tie_break: str = "shared") -> tuple[int, ...]:
    """The branch point ``argmax_p alpha[k, p]`` of every task (0-based: number of shared blocks).

    Args:
      alpha: ``[K, P]`` logits (or softmax weights: same argmax).
      candidates: optional ``bool[K, P]``; only candidates are considered.
      tie_break: among exactly tied maxima, ``"shared"`` takes the deepest branch point (more
        sharing, fewer parameters; our default) and ``"private"`` the earliest (``np.argmax``,
        what the official code's ``argmax`` does).

    Returns:
      A tuple of K Python ints in ``0..P-1``.
    """
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"alpha must be [K, P]; got shape {a.shape}.")
    if candidates is not None:
        a = np.where(np.asarray(candidates, bool), a, -np.inf)
    if not np.all(np.isfinite(a.max(axis=1))):
        raise ValueError("discretise: a task has no finite candidate logit (NaN alpha?).")
    if tie_break == "private":
        return tuple(int(i) for i in np.argmax(a, axis=1))
    if tie_break == "shared":
        return tuple(int(a.shape[1] - 1 - i) for i in np.argmax(a[:, ::-1], axis=1))
    raise ValueError(f"tie_break must be 'shared' or 'private'; got {tie_break!r}.")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A discrete tree architecture: the trunk plus one branch per task or per task group.

    Attributes:
      branch_points: per task, ``0..num_blocks`` (number of shared trunk blocks before its
        branch; ``num_blocks`` = fully shared).
      num_blocks: B.
      grouped: ``False`` (CoNAL): every task with ``p < B`` has its own copies of blocks
        ``p..B-1``. ``True`` (CoNAL-Pro): tasks with the same branch point (and the same
        ``group_labels`` entry) share one partially-specific copy of those blocks.
      group_labels: optional per-task labels splitting the tasks of one branch point into
        several groups (``grouped=True`` only); ``None``: one group per branch point.
    """

    branch_points: tuple[int, ...]
    num_blocks: int
    grouped: bool = False
    group_labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        bps = tuple(int(p) for p in self.branch_points)
        object.__setattr__(self, "branch_points", bps)
        if not bps:
            raise ValueError("Architecture needs at least one task.")
        bad = [p for p in bps if not 0 <= p <= self.num_blocks]
        if bad:
            raise ValueError(
                f"Branch points must lie in 0..{self.num_blocks} (num_blocks); got {list(bps)}."
            )
        if self.group_labels is not None:
            labels = tuple(int(g) for g in self.group_labels)
            object.__setattr__(self, "group_labels", labels)
            if len(labels) != len(bps):
                raise ValueError(
                    f"group_labels has {len(labels)} entries for {len(bps)} tasks (one per task)."
                )

    @property
    def num_tasks(self) -> int:
        return len(self.branch_points)

    @property
    def trunk_depth(self) -> int:
        """Number of trunk blocks that are computed: ``max(branch_points)``."""
        return max(self.branch_points)

    def branches(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """``(branch point, tasks)`` of every non-trunk branch, ordered by branch point, then task."""
        bps = self.branch_points
        if self.grouped:
            labels = self.group_labels or (0,) * len(bps)
            keys = sorted({(p, g) for p, g in zip(bps, labels, strict=True) if p < self.num_blocks})
            return tuple(
                (p, tuple(t for t in range(len(bps)) if (bps[t], labels[t]) == (p, g)))
                for p, g in keys
            )
        order = sorted((p, t) for t, p in enumerate(bps) if p < self.num_blocks)
        return tuple((p, (t,)) for p, t in order)

    def active(self, block: int) -> list[int]:
        """Indices (into :meth:`branches`) of the branches that have a copy of ``block``."""
        return [c for c, (p, _) in enumerate(self.branches()) if p <= block]


def inherit_params(supernet_tree: dict[str, Any], arch: Architecture) -> dict[str, Any]:
    """Retrain-model params (or state) taken from supernet params (or state).

    The trunk keeps the supernet's shared blocks ``0..trunk_depth-1``; a branch's copy of block b is
    the private copy of its first task. For checks and warm starts; the paper retrains from
    scratch (:func:`architecture_init`).
    """
    branches = arch.branches()
    private = []
    for b in range(arch.num_blocks):
        act = arch.active(b)
        if not act:
            private.append(None)
            continue
        leaders = np.array([branches[c][1][0] for c in act])
        private.append(jax.tree.map(lambda x, i=leaders: x[i], supernet_tree["private"][b]))
    return {"shared": list(supernet_tree["shared"][: arch.trunk_depth]), "private": private}


def architecture_init(
    blocks: Sequence[Block], arch: Architecture, key: jax.Array, x: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fresh ``(params, state)`` of the discrete architecture (retraining from scratch).

    ``params = {"shared": [trunk block params, trunk_depth of them], "private": [per block: the
    active branches' copies stacked on a leading axis, or None]}``; ``state`` likewise.
    """
    _check_blocks(blocks, arch)
    branches = arch.branches()
    keys = jax.random.split(key, arch.num_blocks * (len(branches) + 1))
    keys = keys.reshape(arch.num_blocks, len(branches) + 1, -1)
    shared, shared_state, private, private_state = [], [], [], []
    s = x
    for b, block in enumerate(blocks):
        p, st = block.init(keys[b, 0], s)
        act = arch.active(b)
        if act:
            copies = [block.init(keys[b, 1 + c], s) for c in act]
            private.append(_stack([c[0] for c in copies]))
            private_state.append(_stack([c[1] for c in copies]))
        else:
            private.append(None)
            private_state.append(None)
        if b < arch.trunk_depth:
            shared.append(p)
            shared_state.append(st)
        s, _ = block.apply(p, st, s, False)
    return (
        {"shared": shared, "private": private},
        {"shared": shared_state, "private": private_state},
    )


def _check_blocks(blocks: Sequence[Block], arch: Architecture) -> None:
    if len(blocks) != arch.num_blocks:
        raise ValueError(
            f"The architecture has {arch.num_blocks} blocks but {len(blocks)} blocks were given."
        )


def architecture_apply(
    blocks: Sequence[Block],
    arch: Architecture,
    params: dict[str, Any],
    state: dict[str, Any],
    x: Any,
    *,
    train: bool = False,
    task_map: str = "vmap",
) -> tuple[jax.Array, dict[str, Any]]:
    """Forward of the discrete architecture: per-task features ``[K, N, ...]`` and the new state.

    The trunk runs once (its first ``trunk_depth`` blocks); at every block the active branches run
    under one ``jax.vmap`` (inputs gathered from the trunk feature or the branch's previous
    output with static indices), so there is no Python loop over tasks. Use with any aggregator:
    ``mtl.multitask(aggregator, retrain_task_specific(params))`` sums the branch copies' rows.
    ``task_map`` as in :class:`Supernet`.
    """
    _check_blocks(blocks, arch)
    branches = arch.branches()
    s = x
    prev: Any = None
    prev_act: list[int] = []
    new_shared, new_private = [], []
    for b, block in enumerate(blocks):
        act = arch.active(b)
        if act:
            with_trunk = b <= arch.trunk_depth
            pool = [s[None]] if with_trunk else []
            if prev is not None:
                pool.append(prev)
            offset = 1 if with_trunk else 0
            src = [0 if branches[c][0] == b else offset + prev_act.index(c) for c in act]
            inp = jnp.concatenate(pool, axis=0)[np.array(src)]
            apply_copies = _vmap_apply(block, train, task_map=task_map)
            prev, st = apply_copies(params["private"][b], state["private"][b], inp)
            new_private.append(st)
        else:
            new_private.append(state["private"][b])
        prev_act = act
        if b < arch.trunk_depth:
            s, st = block.apply(params["shared"][b], state["shared"][b], s, train)
            new_shared.append(st)
    pool = [s[None]] if arch.trunk_depth == arch.num_blocks else []
    offset = len(pool)
    if prev is not None:
        pool.append(prev)
    branch_of = {t: c for c, (_, tasks) in enumerate(branches) for t in tasks}
    src = [
        0 if p == arch.num_blocks else offset + prev_act.index(branch_of[t])
        for t, p in enumerate(arch.branch_points)
    ]
    feats = jnp.concatenate(pool, axis=0)[np.array(src)]
    return feats, {"shared": new_shared, "private": new_private}


def retrain_task_specific(params: dict[str, Any]) -> dict[str, Any]:
    """Labels for ``mtl.multitask``: ``True`` for the branch copies, ``False`` for the trunk."""
    return {
        "shared": jax.tree.map(lambda _: False, params["shared"]),
        "private": jax.tree.map(lambda _: True, params["private"]),
    }


def _size(tree: PyTree) -> int:
    return int(sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree)))


def block_param_counts(supernet_params: dict[str, Any]) -> list[int]:
    """Parameters of one copy of every block (from the supernet's shared blocks)."""
    return [_size(p) for p in supernet_params["shared"]]


def param_counts(block_sizes: Sequence[int], arch: Architecture) -> dict[str, int]:
    """Encoder parameter counts: the learned architecture, all-shared, all-private (heads excluded).

    ``learned = sum_{b < trunk_depth} n_b + sum_branches sum_{b >= p} n_b``.
    """
    if len(block_sizes) != arch.num_blocks:
        raise ValueError(f"{len(block_sizes)} block sizes for {arch.num_blocks} blocks.")
    n = [int(v) for v in block_sizes]
    trunk = sum(n[: arch.trunk_depth])
    copies = sum(sum(n[p:]) for p, _ in arch.branches())
    return {
        "learned": trunk + copies,
        "all_shared": sum(n),
        "all_private": arch.num_tasks * sum(n),
    }


def architecture_text(
    arch: Architecture,
    block_names: Sequence[str] | None = None,
    task_names: Sequence[str] | None = None,
) -> str:
    """A readable description: per task, its shared and its own (or group's) blocks."""
    names = list(block_names or [f"block{b}" for b in range(arch.num_blocks)])
    tasks = list(task_names or [f"task{t}" for t in range(arch.num_tasks)])
    if len(names) != arch.num_blocks or len(tasks) != arch.num_tasks:
        raise ValueError(
            f"architecture_text: {len(names)} block names for {arch.num_blocks} blocks, "
            f"{len(tasks)} task names for {arch.num_tasks} tasks."
        )
    width = max(len(t) for t in tasks)
    lines = []
    for t, p in enumerate(arch.branch_points):
        shared = ", ".join(names[:p]) or "-"
        own = ", ".join(names[p:]) or "-"
        group = next((ts for q, ts in arch.branches() if q == p and t in ts), (t,))
        kind = "group " + "+".join(tasks[u] for u in group) if len(group) > 1 else "own"
        lines.append(f"{tasks[t]:<{width}}  branch point {p}: shared [{shared}] | {kind} [{own}]")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CoNAL-Pro


def _decided(candidates: np.ndarray) -> np.ndarray:
    return candidates.sum(axis=1) == 1


def pro_restrict(state: SearchState, depth: int) -> SearchState:
    """Starts the CoNAL-Pro stage ``depth``: undecided tasks may choose branch points ``0..depth``."""
    cand = np.asarray(state.candidates)
    p = cand.shape[1]
    if not 0 <= depth < p:
        raise ValueError(f"depth must lie in 0..{p - 1}; got {depth}.")
    undecided = ~_decided(cand)
    row = np.arange(p) <= depth
    cand = np.where(undecided[:, None], row[None, :], cand)
    return state._replace(candidates=jnp.asarray(cand))


def _shared_gram(state: SearchState) -> np.ndarray | None:
    """The last step's Gram matrix of the task gradients summed over the shared blocks, if any."""
    grams = last_gram(state.aggregator_state)
    if grams is None:
        return None
    if isinstance(grams, dict):
        return np.sum([np.asarray(g) for g in grams.values()], axis=0) if grams else None
    return np.asarray(grams)


def split_by_conflict(tasks: Sequence[int], gram: np.ndarray | None) -> list[tuple[int, ...]]:
    """Greedy grouping in task order: a task joins the first group it conflicts with in no pair
    (``G_tu >= 0`` for every member u), else starts a new group. ``gram=None``: one group."""
    if gram is None:
        return [tuple(tasks)] if tasks else []
    groups: list[list[int]] = []
    for t in tasks:
        for g in groups:
            if all(gram[t, u] >= 0 for u in g):
                g.append(t)
                break
        else:
            groups.append([t])
    return [tuple(g) for g in groups]


def pro_decide(
    state: SearchState,
    depth: int,
    *,
    tie_break: str = "shared",
    force: bool = False,
    split_conflicting: bool = True,
) -> tuple[SearchState, tuple[tuple[int, ...], ...]]:
    """Ends the CoNAL-Pro stage ``depth``: decides the undecided tasks whose argmax is ``depth``.

    With ``force`` every undecided task is decided at ``depth`` (the last stage). The decided
    tasks get a one-hot candidate row. When ``depth < B`` they form task groups: with
    ``split_conflicting`` (and a shared-block Gram matrix in the state, i.e. ``nocl`` or
    ``track_conflict``) tasks whose gradients on the shared blocks conflicted at the last step
    go to different groups (:func:`split_by_conflict`; our choice: a group copy shared by
    conflicting tasks would reintroduce the conflict CoNAL removes), else one group. Each group's
    private copies (params and model state) of blocks ``depth..B-1`` are averaged and tied
    (``state.tie``), so the group trains one partially-specific copy from now on.

    Returns:
      ``(state, groups)``: the decided task groups (tuples of task indices).
    """
    cand = np.asarray(state.candidates)
    p = cand.shape[1]
    nb = p - 1
    undecided = np.flatnonzero(~_decided(cand))
    choice = discretise(state.params["alpha"], cand, tie_break=tie_break)
    decided = [int(t) for t in undecided if force or choice[t] == depth]
    if not decided:
        return state, ()
    cand = cand.copy()
    cand[decided] = np.arange(p) == depth
    gram = _shared_gram(state) if split_conflicting else None
    groups = tuple(split_by_conflict(decided, gram)) if depth < nb else (tuple(decided),)
    tie = np.asarray(state.tie).copy()
    for group in groups:
        if depth == nb or len(group) < 2:
            continue
        g = np.array(group)
        for b in range(depth, nb):
            tie[b][np.ix_(g, g)] = 1.0 / len(g)
    tie_j = jnp.asarray(tie, state.tie.dtype)
    params = {**state.params, "private": _apply_tie(state.params["private"], tie_j)}
    model_state = {
        "shared": state.model_state["shared"],
        "private": _apply_tie(state.model_state["private"], tie_j),
    }
    new = state._replace(
        params=params, model_state=model_state, candidates=jnp.asarray(cand), tie=tie_j
    )
    return new, groups


def pro_architecture(state: SearchState) -> Architecture:
    """The grouped :class:`Architecture` of a finished CoNAL-Pro search (every task decided).

    Branch points from the one-hot candidate rows; groups from the tie matrices of the last
    block (tasks tied there share their copies).
    """
    cand = np.asarray(state.candidates)
    if not _decided(cand).all():
        raise ValueError("pro_architecture: some tasks are undecided; finish the stages first.")
    bps = tuple(int(np.flatnonzero(row)[0]) for row in cand)
    last_tie = np.asarray(state.tie)[-1]
    labels = tuple(int(np.flatnonzero(row > 0)[0]) for row in last_tie)
    return Architecture(bps, cand.shape[1] - 1, grouped=True, group_labels=labels)


def search_pro(
    search: Search,
    state: SearchState,
    batches: Iterator[tuple[Batch, Batch]],
    steps_per_stage: int,
    *,
    tie_break: str = "shared",
    step_fn: Callable | None = None,
) -> tuple[Architecture, SearchState, list[dict[str, Any]]]:
    """CoNAL-Pro: progressive stages from the deepest branch point toward the input.

    Args:
      search: from :func:`make_search`.
      state: its initial (or a warm) state.
      batches: yields ``(train_batch, val_batch)``.
      steps_per_stage: search steps per stage.
      tie_break: as in :func:`discretise`.
      step_fn: the step to call (default ``jax.jit(search.step)``; pass your jitted step to reuse
        its compilation).

    Returns:
      ``(Architecture(grouped=True), final state, history)``; history has one entry per stage:
      ``{"depth", "decided": task groups, "alpha_softmax"}`` (the last step's masked softmax).
    """
    if steps_per_stage < 1:
        raise ValueError(f"steps_per_stage must be >= 1; got {steps_per_stage}.")
    step = step_fn or jax.jit(search.step)
    nb = search.supernet.num_blocks
    history: list[dict[str, Any]] = []
    for depth in range(nb, -1, -1):
        if _decided(np.asarray(state.candidates)).all() and depth < nb:
            break
        metrics: dict[str, Any] = {}
        if depth > 0:  # (at depth 0 the remaining tasks have a single candidate: no search)
            state = pro_restrict(state, depth)
            for _ in range(steps_per_stage):
                train_batch, val_batch = next(batches)
                state, metrics = step(state, train_batch, val_batch)
        state, groups = pro_decide(state, depth, tie_break=tie_break, force=depth == 0)
        history.append(
            {
                "depth": depth,
                "decided": groups,
                "alpha_softmax": np.asarray(metrics["alpha_softmax"]) if metrics else None,
            }
        )
    return pro_architecture(state), state, history
