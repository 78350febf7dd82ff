"""``dselect_k``: DSelect-k (Hazimeh et al., NeurIPS 2021), LibMTL's ``DSelect_k``.

MMoE (:mod:`experiments.models.mmoe`) with each task's softmax gate replaced by a k-sparse,
differentiable selection over the E shared experts. With ``m = ceil(log2 E)`` bits and the binary
code ``c_e in {0, 1}^m`` of expert e, task k's gate holds k selectors (paper Eqs. 4-7)::

    S(t)      = 0 if t <= -gamma/2;  1 if t >= gamma/2;  -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2 else
    r_i(x)_e  = prod_l ( S(z_il) if c_el = 1 else 1 - S(z_il) )      # z_i = Z_i x + b_i: [m]
    alpha(x)  = softmax(W x + b)                                     # [k]
    q(x)_e    = sum_i alpha_i(x) r_i(x)_e                            # the expert weights
    y_k       = tower_k( sum_e q(x)_e f_e(x) )

Once every ``|z_il| >= gamma/2`` each ``r_i`` is one-hot (the expert whose code matches the signs),
so at most k experts have non-zero weight: the selection is k-sparse.

Interface: the encoder is :class:`~experiments.models.mmoe.MMoEEncoder` (the shared experts;
``z = {"x": [B, D_in], "experts": [B, E, D]}``); head k holds the selector logits ``z_logits``
(``Dense(k * m)``), the selector weights ``w_logits`` (``Dense(k)``) and the tower, so the gate is a
task-specific leaf. The gate reads the flattened input, as LibMTL (the paper's per-example gate).

Entropy regulariser (optional): LibMTL (``LibMTL/architecture/DSelect_k.py``) and the official
TensorFlow code push every selector towards one-hot with the entropy of the selector outputs,
summed over the batch, the k selectors and the E experts::

    H(r) = - sum_{b, i, e} r_i(x_b)_e log(r_i(x_b)_e + 1e-6)        (:func:`selector_entropy`)

LibMTL adds ``1e-6 H`` (:data:`LIBMTL_ENTROPY_REG`) by an extra ``backward()`` inside
``forward``. Here it is the head option ``entropy_reg`` (default 0: off; :func:`build` reads
``config.entropy_reg`` when the config has that key) and :meth:`DSelectKHead.aux_loss` returns
``entropy_reg * H``, an auxiliary loss for a custom loop to add to task k's loss. ``H`` depends
only on head k's ``z_logits`` (the gate reads the input, not the experts), so its gradient
reaches no shared leaf: the Jacobian rows every aggregator sees are unchanged, as with LibMTL's
separate ``backward()``. The runner's train step adds no auxiliary loss, so :data:`DEFAULTS` has no
``entropy_reg`` and the runner refuses the key rather than ignore it.

Departures from LibMTL (itself from the official TensorFlow code): (1) the entropy regulariser
is off by default (above), and the penalty LibMTL adds when E is not a power of 2,
``sum 1 / sum_e r_i(x)_e``, is not applied. With E a power of 2 (the default, 4) every code is
an expert and each ``r_i`` sums to 1; otherwise the codes ``>= E`` are dropped, as LibMTL, and
the mass a selector puts on them is lost (no penalty pushes it back): prefer a power of 2.
(2) Experts are MLPs on the flattened input (as ``mmoe``). Initialisation as LibMTL:
``z_logits`` weights and biases ``U(-gamma/100, gamma/100)``, ``w_logits`` ``U(-0.05, 0.05)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models.base import ClassifierHead, MultiTaskModel
from experiments.models.mmoe import MMoEEncoder, check_expert_config, mix_experts
from experiments.tasks import TaskSpec

DEFAULTS = {
    "num_experts": 4,  # E shared experts (a power of 2: see the departures)
    "num_nonzeros": 2,  # k: experts selected per task
    "gamma": 1.0,  # the smooth-step's width
    "expert_sizes": (64,),  # every expert: Dense -> ReLU per width, on the flattened input
    "tower_hidden": 32,  # per-task tower hidden width; 0 = linear tower
}
TASK_KINDS = ("classification",)

__all__ = [
    "DEFAULTS",
    "LIBMTL_ENTROPY_REG",
    "TASK_KINDS",
    "DSelectKHead",
    "binary_codes",
    "build",
    "expert_weights",
    "selector_entropy",
    "selector_outputs",
    "smooth_step",
]

#: LibMTL's coefficient of the selector entropy (``_entropy_reg_loss``: ``... .sum() * 1e-6``).
LIBMTL_ENTROPY_REG = 1e-6
#: The ``eps`` inside the logarithm of LibMTL's and the TensorFlow code's entropy.
ENTROPY_EPS = 1e-6


def smooth_step(t: jax.Array, gamma: float) -> jax.Array:
    """The cubic smooth-step (paper Eq. 4): 0 below ``-gamma/2``, 1 above ``gamma/2``, C^1 between."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def binary_codes(num_experts: int) -> np.ndarray:
    """``[E, m]`` bool, row e the ``m = ceil(log2 E)``-bit code of e, most significant bit first."""
    m = math.ceil(math.log2(num_experts))
    return np.array([[(e >> (m - 1 - b)) & 1 for b in range(m)] for e in range(num_experts)], bool)


def selector_outputs(z_logits: jax.Array, codes: np.ndarray, gamma: float) -> jax.Array:
    """The k single-expert selectors ``r [B, k, E]`` (paper Eq. 5) from ``z_logits [B, k, m]``.

    ``r_i(x)_e = prod_l (S(z_il) if c_el else 1 - S(z_il))``; ``codes``: ``[E, m]`` bool.
    """
    s = smooth_step(z_logits, gamma)[:, :, None, :]  # [B, k, 1, m]
    return jnp.prod(jnp.where(jnp.asarray(codes), s, 1.0 - s), axis=-1)


def expert_weights(
    z_logits: jax.Array, w_logits: jax.Array, codes: np.ndarray, gamma: float
) -> jax.Array:
    """DSelect-k's expert weights ``q [B, E]`` (paper Eqs. 5-7).

    Args:
      z_logits: ``[B, k, m]`` the k selectors' logits.
      w_logits: ``[B, k]`` the logits of the selectors' mixing weights.
      codes: ``[E, m]`` bool, :func:`binary_codes`.
      gamma: the smooth-step's width.
    """
    selectors = selector_outputs(z_logits, codes, gamma)  # r: [B, k, E]
    return jnp.einsum("bk,bke->be", jax.nn.softmax(w_logits, axis=-1), selectors)


def selector_entropy(selectors: jax.Array, eps: float = ENTROPY_EPS) -> jax.Array:
    """``H(r) = -sum r log(r + eps)`` over every axis (batch, selectors, experts): LibMTL's
    ``_entropy_reg_loss`` and the TensorFlow code's ``_entropy_reg_loss`` before the coefficient.

    ``selectors``: ``[B, k, E]`` (:func:`selector_outputs`), each row in [0, 1]. The sum (not a
    mean) over the batch is theirs: the penalty grows with the batch size. Zero when every
    selector is one-hot; at most ``B k log E`` (uniform selectors).
    """
    if selectors.ndim != 3:
        raise ValueError(
            f"selector_entropy takes the selector outputs r [B, k, E]; got shape "
            f"{selectors.shape}. Use selector_outputs(z_logits, codes, gamma)."
        )
    return -jnp.sum(selectors * jnp.log(selectors + eps))


def _uniform(scale: float) -> jax.nn.initializers.Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


class DSelectKHead(nn.Module):
    """Task k's DSelect-k gate and tower: ``z -> logits [B, num_classes]``.

    :meth:`expert_weights` gives the gate's ``q [B, E]`` (``head.apply(v, z,
    method="expert_weights")``).
    """

    num_classes: int
    num_experts: int
    num_nonzeros: int
    gamma: float = 1.0
    tower_hidden: int = 0
    entropy_reg: float = 0.0  # coefficient of the selector entropy in aux_loss (LibMTL: 1e-6)

    def setup(self):
        self.codes = binary_codes(self.num_experts)
        m = self.codes.shape[1]
        zi = _uniform(self.gamma / 100.0)
        self.z_logits = nn.Dense(self.num_nonzeros * m, kernel_init=zi, bias_init=zi)
        self.w_logits = nn.Dense(
            self.num_nonzeros, kernel_init=_uniform(0.05), bias_init=_uniform(0.05)
        )
        self.tower = ClassifierHead(self.num_classes, self.tower_hidden)

    def _z(self, x: jax.Array) -> jax.Array:  # [B, D_in] -> the selectors' logits [B, k, m]
        return self.z_logits(x).reshape((x.shape[0], self.num_nonzeros, self.codes.shape[1]))

    def expert_weights(self, z: dict[str, jax.Array]) -> jax.Array:
        x = z["x"]  # [B, D_in]
        return expert_weights(self._z(x), self.w_logits(x), self.codes, self.gamma)

    def selector_outputs(self, z: dict[str, jax.Array]) -> jax.Array:
        """The selectors ``r [B, k, E]`` (``head.apply(v, z, method="selector_outputs")``)."""
        return selector_outputs(self._z(z["x"]), self.codes, self.gamma)

    def aux_loss(self, z: dict[str, jax.Array]) -> jax.Array:
        """``entropy_reg * selector_entropy(r)``: add it to this task's loss (0 when off)."""
        if self.entropy_reg == 0:
            return jnp.zeros((), jnp.float32)
        return self.entropy_reg * selector_entropy(self.selector_outputs(z))

    def __call__(self, z: dict[str, jax.Array], train: bool = False) -> jax.Array:
        del train
        return self.tower(mix_experts(self.expert_weights(z), z["experts"]))


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    del input_shape  # any image shape: the experts and gates read the flattened input
    sizes = check_expert_config(
        "dselect_k",
        config.expert_sizes,
        config.tower_hidden,
        num_experts=config.num_experts,
        num_nonzeros=config.num_nonzeros,
    )
    e, k, gamma = int(config.num_experts), int(config.num_nonzeros), float(config.gamma)
    if e < 2:
        raise ValueError(f"dselect_k: num_experts must be >= 2 (a 1-bit code); got {e}.")
    if k > e:
        raise ValueError(f"dselect_k: num_nonzeros (k = {k}) must be <= num_experts ({e}).")
    if not gamma > 0:
        raise ValueError(f"dselect_k: gamma must be > 0; got {gamma}.")
    entropy_reg = float(config.get("entropy_reg", 0.0))
    if not entropy_reg >= 0:
        raise ValueError(
            f"dselect_k: entropy_reg must be >= 0 (0 = off; LibMTL: 1e-6); got {entropy_reg}."
        )
    tower = int(config.tower_hidden)
    heads = {t.name: DSelectKHead(t.num_classes, e, k, gamma, tower, entropy_reg) for t in tasks}
    return MultiTaskModel(MMoEEncoder(e, sizes), heads, tuple(tasks))
