"""``mtan``: Multi-Task Attention Network, classification version (Liu et al., CVPR 2019).

Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019 (lorenmt/mtan);
LibMTL's ``LibMTL/architecture/MTAN.py`` (ResNet version) is the reference researchers know.

Shared backbone (the encoder, K Jacobian rows): stage ``i`` is ``stage{i}_mid`` then ``stage{i}_out``
(each ``Conv3x3 -> BN -> ReLU``, :class:`experiments.models.segnet.ConvBNReLU`), then a 2x2
max-pool into the next stage. The encoder returns every stage's two feature maps::

    z = ((mid_0, out_0), ..., (mid_{S-1}, out_{S-1}))    mid_i, out_i: [B, H / 2^i, W / 2^i, c_i]

Head k (:class:`MTANHead`, task-specific: only task k's gradient) holds task k's attention modules,
one per stage, and its tower. With ``a_{-1}`` absent (paper Eq. 1-2; LibMTL's ``forward``)::

    m_i = sigmoid(BN(conv1x1(ReLU(BN(conv1x1([mid_i ; a_{i-1}]))))))      attention mask, [.., c_i]
    a^_i = m_i * out_i                                                      element-wise
    a_i = MaxPool2(ConvBNReLU_{c_{i+1}}(a^_i))         for i < S - 1   (LibMTL's encoder_block_att)

and the tower reads the last ``a^_{S-1}``: global average pool -> ``Dense(head_hidden) -> ReLU``
-> ``Dense(num_classes)`` (LibMTL's decoders are the task heads; this is the classification
version for the embedded image data). The attention block is LibMTL's ``_att_layer`` (conv 1x1
-> BN -> ReLU -> conv 1x1 -> BN -> sigmoid, intermediate width ``c_i``).

Departures:

* Per-task attention modules. LibMTL builds them with ``nn.ModuleList([att_layer(...)] *
  task_num)``, which repeats ONE module, so its tasks share their attention; the paper (and
  lorenmt/mtan) has one set per task, as here.
* The conv after each attention module (``encoder_block_att``) is one module shared by all tasks
  in LibMTL and lorenmt/mtan; in the ``encoder -> z -> heads`` interface nothing shared can follow
  a task-specific module, so each head has its own copy (``block_att{i}``): more parameters, each
  trained by its task only.
* Small CPU backbone (two 3x3 convs per stage, max-pool between stages) instead of ResNet-18 / the
  SegNet encoder; the attention masks read the first conv's output (LibMTL: a ResNet layer's
  blocks but the last) and gate the second's (the last block's), as in the paper.
* A dense classification tower (pool -> MLP) instead of MTAN's dense-prediction decoders.
* Initialisation: the 3x3 convs Xavier-normal as MTAN's SegNet (``ConvBNReLU``), the attention
  1x1 convs Flax's default (LeCun normal, zero bias; LibMTL: PyTorch's default).
* Heads carry BatchNorm statistics (``batch_stats`` in each head's state), so the runner's
  per-task sharing mode (which needs state-free heads) does not take this model.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.base import (
    BN_EPSILON,
    BN_MOMENTUM,
    ClassifierHead,
    MultiTaskModel,
    check_pools_fit,
)
from experiments.models.segnet import ConvBNReLU
from experiments.tasks import TaskSpec

DEFAULTS = {
    "channels": (8, 16),  # one shared stage (two Conv3x3 -> BN -> ReLU, then MaxPool2) per entry
    "head_hidden": 32,  # the tower's hidden width; 0 = linear tower
}
TASK_KINDS = ("classification",)

StageFeatures = tuple[tuple[jax.Array, jax.Array], ...]


def _max_pool2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class MTANBackbone(nn.Module):
    """``x [B, H, W, C] -> ((mid_i, out_i) for each stage)``; see the module docstring."""

    channels: Sequence[int] = (8, 16)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> StageFeatures:
        features = []
        for i, c in enumerate(self.channels):
            if i > 0:
                x = _max_pool2(x)
            mid = ConvBNReLU(c, name=f"stage{i}_mid")(x, train)
            x = ConvBNReLU(c, name=f"stage{i}_out")(mid, train)
            features.append((mid, x))
        return tuple(features)


class AttentionMask(nn.Module):
    """LibMTL's ``_att_layer``: ``conv1x1(c) -> BN -> ReLU -> conv1x1(c) -> BN -> sigmoid``.

    ``x: [B, H, W, C_in] -> mask [B, H, W, features]`` in (0, 1).
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def bn(name: str) -> nn.BatchNorm:
            return nn.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
            )

        x = nn.Conv(self.features, (1, 1), padding="VALID", name="conv1")(x)
        x = nn.relu(bn("bn1")(x))
        x = nn.Conv(self.features, (1, 1), padding="VALID", name="conv2")(x)
        return nn.sigmoid(bn("bn2")(x))


class MTANHead(nn.Module):
    """Task k's attention modules (one per stage) and tower: ``z -> logits [B, num_classes]``."""

    num_classes: int
    hidden: int = 0

    @nn.compact
    def __call__(self, z: StageFeatures, train: bool = False) -> jax.Array:
        att = None
        for i, (mid, out) in enumerate(z):
            inputs = mid if att is None else jnp.concatenate([mid, att], axis=-1)
            att = AttentionMask(out.shape[-1], name=f"attention{i}")(inputs, train) * out
            if i + 1 < len(z):
                next_channels = z[i + 1][1].shape[-1]
                att = ConvBNReLU(next_channels, name=f"block_att{i}")(att, train)
                att = _max_pool2(att)
        return ClassifierHead(self.num_classes, self.hidden, name="tower")(att.mean(axis=(1, 2)))


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    channels = tuple(int(c) for c in config.channels)
    if not channels:
        raise ValueError("mtan: channels must list at least one stage, e.g. (8, 16).")
    check_pools_fit("mtan", input_shape, len(channels) - 1)
    heads = {t.name: MTANHead(t.num_classes, int(config.head_hidden)) for t in tasks}
    return MultiTaskModel(MTANBackbone(channels), heads, tuple(tasks))
