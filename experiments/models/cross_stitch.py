"""``cross_stitch``: K columns of a small CNN mixed by cross-stitch units (Misra et al., CVPR 2016).

Misra, Shrivastava, Gupta, Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016;
LibMTL's ``LibMTL/architecture/Cross_stitch.py`` is the reference implementation researchers know.

One column per task, each a stack of ``Conv3x3 -> BN -> ReLU -> MaxPool 2`` stages
(``column{k}/block{i}``, :class:`experiments.models.small_cnn.ConvBlock`). After stage ``i`` a
cross-stitch unit ``stitch{i}: [K, K]`` mixes the columns' activations (paper Eq. 1, for K tasks)::

    x~_k = sum_j alpha[k, j] * x_j            x_j: [B, H, W, C] (column j after stage i)

so every column's parameters receive every task's gradient through the units: the whole encoder
is shared (K Jacobian rows). The encoder returns ``z: [B, K, D]`` (each column's last stage,
globally average-pooled; ``D = channels[-1]``) and the head of task k (:class:`ColumnHead`, given
its task index) reads ``z[:, k]`` through a :class:`~experiments.models.base.ClassifierHead`.

With every unit at the identity the columns are K independent single-task networks (task j's loss
has a zero gradient on column k != j); ``tests/test_models_columns.py`` checks exactly that.

Departures from LibMTL (and the paper):

* Init: ``alpha[k, k] = stitch_self`` (0.9) and ``alpha[k, j] = (1 - stitch_self) / (K - 1)``, the
  paper's (alpha_S, alpha_D) = (0.9, 0.1) for K = 2, rows summing to 1 for any K. LibMTL
  initialises every entry to 1 (``torch.ones(4, K, K)``), i.e. each column starts as the sum of
  all columns; ``stitch_self=1/K`` gives its equal mixing up to the scale, which BatchNorm removes.
* Placement: a unit after *every* stage, the last included (the paper puts units after pool1,
  pool2, pool5, fc6, fc7, i.e. also after the last shared layer); LibMTL's ResNet has units only
  between its four layers (none after the last).
* One scalar per column pair and unit (the paper's basic unit; it also discusses per-channel
  units). The paper scales the units' learning rate up (by 10^2..10^3); here they train with the
  encoder's optimizer like every other parameter.
* Columns are small CNNs (CPU-sized), not LibMTL's ResNet-18 / the paper's AlexNet; no
  per-column fc layer (heads have an optional hidden layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.base import ClassifierHead, MultiTaskModel, check_pools_fit
from experiments.models.small_cnn import ConvBlock
from experiments.tasks import TaskSpec

DEFAULTS = {
    "channels": (8, 16),  # one Conv3x3 -> BN -> ReLU -> MaxPool2 stage per entry, in every column
    "stitch_self": 0.9,  # initial alpha[k, k]; off-diagonal (1 - stitch_self) / (K - 1)
    "head_hidden": 32,  # per-task hidden width; 0 = linear head
}
TASK_KINDS = ("classification",)


def stitch_init(num_columns: int, self_weight: float) -> jax.nn.initializers.Initializer:
    """``alpha [K, K]``: ``self_weight`` on the diagonal, ``(1 - self_weight) / (K - 1)`` off it."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        del key
        if tuple(shape) != (num_columns, num_columns):
            raise ValueError(
                f"stitch_init: shape {tuple(shape)} != ({num_columns}, {num_columns})."
            )
        other = (1.0 - self_weight) / max(num_columns - 1, 1)
        eye = jnp.eye(num_columns, dtype=dtype)
        return eye * self_weight + (1.0 - eye) * other

    return init


def cross_stitch(alpha: jax.Array, columns: jax.Array) -> jax.Array:
    """Misra et al. Eq. 1: ``x~_k = sum_j alpha[k, j] x_j``.

    ``alpha: [K, K]``, ``columns: [K, B, ...]`` -> ``[K, B, ...]``.
    """
    return jnp.tensordot(alpha, columns, axes=1)


class CrossStitchEncoder(nn.Module):
    """``x [B, H, W, C] -> z [B, K, channels[-1]]``: K stitched columns, each average-pooled."""

    num_columns: int
    channels: Sequence[int] = (8, 16)
    stitch_self: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k = self.num_columns
        columns = [x] * k
        for i, c in enumerate(self.channels):
            outs = [ConvBlock(c, name=f"column{j}_block{i}")(columns[j], train) for j in range(k)]
            alpha = self.param(f"stitch{i}", stitch_init(k, self.stitch_self), (k, k))
            mixed = cross_stitch(alpha, jnp.stack(outs))  # [K, B, H_i, W_i, c]
            columns = list(mixed)
        pooled = jnp.stack([col.mean(axis=(1, 2)) for col in columns], axis=1)
        return pooled  # [B, K, channels[-1]]


class ColumnHead(nn.Module):
    """Task ``task_index``'s head: ``z [B, K, D] -> z[:, task_index] -> logits [B, num_classes]``."""

    task_index: int
    num_classes: int
    hidden: int = 0

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        if z.ndim != 3 or not 0 <= self.task_index < z.shape[1]:
            raise ValueError(
                f"ColumnHead {self.task_index}: expected z [B, K, D] with K > task index; "
                f"got shape {z.shape}."
            )
        return ClassifierHead(self.num_classes, self.hidden, name="classifier")(
            z[:, self.task_index], train
        )


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    channels = tuple(int(c) for c in config.channels)
    if not channels:
        raise ValueError("cross_stitch: channels must list at least one stage, e.g. (8, 16).")
    check_pools_fit("cross_stitch", input_shape, len(channels))
    encoder = CrossStitchEncoder(len(tasks), channels, float(config.stitch_self))
    heads = {
        t.name: ColumnHead(i, t.num_classes, int(config.head_hidden)) for i, t in enumerate(tasks)
    }
    return MultiTaskModel(encoder, heads, tuple(tasks))
