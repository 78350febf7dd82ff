"""``small_cnn``: a small BatchNorm CNN with per-task heads, for plant_leaves (species + health).

The CommIT paper's CNN (its depth, widths and input size) is not published (docs/design/METHODS.md section 3,
UNVERIFIED), so this is our choice, kept small enough for CPU runs on 64-96 px images:

* encoder: for each ``c`` in ``channels``: ``Conv3x3(c) -> BN -> ReLU -> MaxPool2`` (``block{i}``
  with ``conv`` and ``bn``; the conv has a bias only without BatchNorm) -> global average pool ->
  ``fc`` Dense(feature_dim) -> ReLU = ``z [B, feature_dim]``;
* heads: :class:`~experiments.models.base.ClassifierHead` (12-way species, binary health);
* ``modulation``: indices of the blocks followed by a :class:`mtl_jax.modules.TaskModulation`
  (per-channel scales, init 1; Zhao et al. 2018). Their ``task_scale`` parameters become per-task
  copies through the sharing spec (``mtl.modules.modulation_spec``) and ``mtl.per_task``; without that the
  model is the plain network (one scale vector of ones).

Convolutions use Kaiming-normal (fan_out) init as the ResNet does; Dense layers PyTorch's default.
Per-module names make ``mtl.gramian.by_module`` see every conv, BN and fc as one layer (Recon's grouping).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from experiments.models.base import (
    BN_EPSILON,
    BN_MOMENTUM,
    ClassifierHead,
    MultiTaskModel,
    check_pools_fit,
    torch_default_init,
)
from experiments.tasks import TaskSpec
from mtl_jax.modules import TaskModulation

DEFAULTS = {
    "channels": (16, 32, 64, 128),  # one conv block (conv3x3 -> BN -> ReLU -> max-pool 2) per entry
    "batch_norm": True,
    "feature_dim": 128,  # shared fc after the pool (+ ReLU); 0 = none
    "head_hidden": 0,  # per-task hidden width; 0 = linear head
    "modulation": (),  # block indices followed by a TaskModulation (per-task channel scales)
}
TASK_KINDS = ("classification",)

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBlock(nn.Module):
    """``Conv3x3 -> [BN] -> ReLU -> MaxPool 2x2`` (spatial size halves, floor)."""

    features: int
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(
            self.features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=not self.batch_norm,
            kernel_init=_conv_init,
            name="conv",
        )(x)
        if self.batch_norm:
            x = nn.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name="bn"
            )(x)
        return nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))


class SmallCNNEncoder(nn.Module):
    """``x [B, H, W, C] -> z [B, feature_dim]`` (``[B, channels[-1]]`` with ``feature_dim=0``)."""

    channels: Sequence[int] = (16, 32, 64, 128)
    batch_norm: bool = True
    feature_dim: int = 128
    modulation: Sequence[int] = ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, c in enumerate(self.channels):
            x = ConvBlock(c, self.batch_norm, name=f"block{i}")(x, train)
            if i in self.modulation:
                x = TaskModulation(name=f"modulation{i}")(x)
        x = x.mean(axis=(1, 2))
        if self.feature_dim > 0:
            x = nn.relu(nn.Dense(self.feature_dim, kernel_init=torch_default_init(), name="fc")(x))
        return x


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    channels = tuple(int(c) for c in config.channels)
    if not channels:
        raise ValueError("small_cnn: channels must list at least one conv block.")
    check_pools_fit("small_cnn", input_shape, len(channels))
    modulation = tuple(int(i) for i in config.modulation)
    bad = [i for i in modulation if not 0 <= i < len(channels)]
    if bad:
        raise ValueError(f"small_cnn: modulation blocks {bad} outside 0..{len(channels) - 1}.")
    encoder = SmallCNNEncoder(
        channels, bool(config.batch_norm), int(config.feature_dim), modulation
    )
    heads = {t.name: ClassifierHead(t.num_classes, int(config.head_hidden)) for t in tasks}
    return MultiTaskModel(encoder, heads, tuple(tasks))
