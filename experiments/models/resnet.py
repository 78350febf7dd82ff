"""``resnet18``: ResNet-18 with BatchNorm, Recon's Multi-Fashion+MNIST model.

Source: moukamisama/Recon ``archs/resnet_recon_arch.py`` (``MnistResNet_recon``), itself
torchvision's ResNet-18 with a 1-channel stem:

* ``feature_extractor = resnet18(num_classes=100)``: ``conv1`` 7x7/2 pad 3 (no bias) -> ``bn1`` ->
  ReLU -> max-pool 3x3/2 pad 1 -> ``layer1..layer4`` (two BasicBlocks each, 64/128/256/512
  channels, stride 2 from layer2 on, 1x1-conv + BN ``downsample`` when the shape changes) ->
  global average pool -> ``fc`` Linear 512 -> 100;
* then ReLU, then one ``Linear(100, 10)`` per task (``pred``).

Here the encoder is everything up to and including the ReLU after ``fc`` (``z: [B, 100]``) and
each head is the per-task Linear 100 -> 10. No pre-training.

Stem. Recon's code keeps torchvision's ImageNet stem (7x7/2 conv + max-pool) on its 36x36
inputs: 36 -> 18 -> 9 -> 9 -> 5 -> 3 -> 2 spatially. That is the default here (``stem="imagenet"``).
``stem="cifar"`` swaps in the CIFAR-style stem (3x3/1 conv, no max-pool): 36 -> 36 -> 18 -> 9 -> 5,
about 16x the FLOPs; it is not what Recon ran.

Init as in torchvision/Recon: convolutions Kaiming-normal (fan_out, ReLU gain), BatchNorm scale 1
and bias 0, ``zero_init_residual=False``; the Linear layers use PyTorch's default weight init with
zero biases. BatchNorm momentum 0.9 (PyTorch 0.1) and eps 1e-5.

Module names follow the PyTorch ones (``conv1``, ``bn1``, ``layer2_0/conv1``,
``layer2_0/downsample_0`` (conv) and ``downsample_1`` (BN), ``fc``), so ``mtl.gramian.by_module`` groups
the encoder into Recon's layers: every conv, every BN (scale + bias) and the fc (kernel + bias) is
one group; 41 groups in the encoder.
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
    torch_default_init,
)
from experiments.tasks import TaskSpec

DEFAULTS = {
    "stem": "imagenet",  # "imagenet" (Recon's code: 7x7/2 conv + max-pool) or "cifar" (3x3/1, no pool)
    "width": 64,  # channels of layer1 (doubles at every stage)
    "stage_sizes": (2, 2, 2, 2),  # BasicBlocks per stage (ResNet-18)
    "feature_dim": 100,  # shared fc after the pool (+ ReLU); 0 = none, z is the pooled features
    "head_hidden": 0,  # per-task hidden width; 0 = Recon's linear head
    "bn_momentum": BN_MOMENTUM,
    "bn_epsilon": BN_EPSILON,
}
TASK_KINDS = ("classification",)
STEMS = ("imagenet", "cifar")

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming_normal_(fan_out)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    pad = (
        kernel - 1
    ) // 2  # PyTorch's symmetric padding (Flax "SAME" pads asymmetrically at stride 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_conv_init,
        name=name,
    )


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU."""

    features: int
    stride: int
    momentum: float
    epsilon: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda name: nn.BatchNorm(
            use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon, name=name
        )
        y = nn.relu(bn("bn1")(_conv(self.features, 3, self.stride, "conv1")(x)))
        y = bn("bn2")(_conv(self.features, 3, 1, "conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = bn("downsample_1")(_conv(self.features, 1, self.stride, "downsample_0")(x))
        return nn.relu(y + x)


class ResNetEncoder(nn.Module):
    """``x [B, H, W, C] -> z [B, feature_dim]`` (or ``[B, 8 * width]`` with ``feature_dim=0``)."""

    stem: str = "imagenet"
    width: int = 64
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    feature_dim: int = 100
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.stem == "imagenet":
            x = _conv(self.width, 7, 2, "conv1")(x)
        else:
            x = _conv(self.width, 3, 1, "conv1")(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon, name="bn1"
        )(x)
        x = nn.relu(x)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.stage_sizes):
            features = self.width * 2**stage
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                x = BasicBlock(
                    features, stride, self.momentum, self.epsilon, name=f"layer{stage + 1}_{b}"
                )(x, train)
        x = x.mean(axis=(1, 2))  # global average pool: [B, 8 * width]
        if self.feature_dim > 0:
            x = nn.Dense(self.feature_dim, kernel_init=torch_default_init(), name="fc")(x)
            x = nn.relu(x)
        return x


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    if config.stem not in STEMS:
        raise ValueError(f"resnet18: unknown stem {config.stem!r}; valid stems: {STEMS}.")
    encoder = ResNetEncoder(
        stem=config.stem,
        width=int(config.width),
        stage_sizes=tuple(int(s) for s in config.stage_sizes),
        feature_dim=int(config.feature_dim),
        momentum=float(config.bn_momentum),
        epsilon=float(config.bn_epsilon),
    )
    heads = {t.name: ClassifierHead(t.num_classes, int(config.head_hidden)) for t in tasks}
    return MultiTaskModel(encoder, heads, tuple(tasks))
