"""CoNAL's supernet: the relaxed search space over branch points, and the task map.

Every task k has a task-specific copy ``h_k^(b)`` of every block and a softmax ``w_k`` over the
``P = B + 1`` branch points (0-based ``p`` = number of shared blocks; the paper's 1-based ``p`` is
this plus one). ``Supernet.apply`` gives the per-task features ``z_k = sum_p w_kp z_k^(p)``
(Yue, Zhang & Liang, AAAI 2023, Eq. 2): ``mixing="paths"`` exactly (``B (B + 1) / 2`` private
block evaluations per task, as the official ``model.py``), ``"stream"`` (default) with one
private pass per task, exact for affine blocks and one-hot weights, a relaxation otherwise
(departure). ``task_map`` says how the K private copies run (``vmap``, ``scan``, ``unroll``).
The derivation of ``"stream"``: ``docs/recipes/conal.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .blocks import Block, PyTree, _stack

__all__ = ["MIXINGS", "TASK_MAPS", "Supernet", "branch_weights"]

MIXINGS = ("stream", "paths")


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
        keys = jax.random.split(key, (self.num_blocks, k + 1))  # raw or typed keys alike
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
