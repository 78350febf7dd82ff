"""``small_resnet``: a small residual BatchNorm CNN, the CPU stand-in for Recon's ResNet-18.

Same building blocks as :mod:`experiments.models.resnet` (torchvision's BasicBlock: conv3x3 -> BN
-> ReLU -> conv3x3 -> BN, + shortcut (1x1 conv + BN when the shape changes), ReLU; no conv bias;
Kaiming-normal fan-out init; BN momentum 0.9 = PyTorch's 0.1), at widths a laptop CPU trains in
seconds, for 16x16 inputs (``digit_transforms``). The encoder is a sequence of five named blocks:

* ``stem``: ``conv`` 3x3/1 -> ``bn`` -> ReLU; ``[B, 16, 16, widths[0]]`` on a 16x16 input;
* ``block1``: BasicBlock(widths[0], strides[0]): ``conv1 bn1 conv2 bn2`` (+ ``downsample_0`` /
  ``downsample_1`` at stride 2); ``[B, 16, 16, widths[0]]`` at stride 1;
* ``block2``: BasicBlock(widths[1], strides[1]) with downsample; ``[B, 8, 8, widths[1]]``;
* ``block3``: BasicBlock(widths[2], strides[2]) with downsample; ``[B, 4, 4, widths[2]]``;
* ``neck``: global average pool -> ``fc`` Dense(feature_dim) -> ReLU; ``z: [B, feature_dim]``.

That is 19 groups in the encoder (9 convs including the 2 downsample convs, 9 BatchNorm layers,
each its own group, and the fc): 2 + 4 + 6 + 6 + 1. ``strides`` sets the strides of block1..3
(default ``(1, 2, 2)``); with ``(2, 2, 2)`` (``experiments/configs/conflict.py``, ~4x cheaper on
16x16 inputs) block1 also gets a downsample conv + BN: 21 groups (10 convs, 10 BN, the fc). Heads:
:class:`~experiments.models.base.ClassifierHead` per task (linear by default, as Recon's).

Block sequence (for supernets that branch between blocks, e.g. CoNAL): :func:`encoder_blocks`
returns the five blocks as unbound Linen modules, in order, each named as above and called as
``block(x, train) -> x``; :class:`SmallResNetEncoder` applies exactly that sequence (the same
constructor, :func:`make_blocks`, called inside its compact method), so the encoder's variables
are ``{"stem": ..., "block1": ..., ..., "neck": ...}`` and a block's variables can be moved
between the two.

Flax NNX: :class:`NNXSmallResNet` is the same network (same module names, parameter shapes and
initializers; other random draws) as an ``nnx.Module``: ``model(x) -> {task: logits}``, with ``model.train()`` /
``model.eval()`` switching BatchNorm between batch and running statistics, and
``model.encoder.blocks`` the ordered block list. Its ``nnx.Param`` state groups under
``mtl.gramian.by_module`` into the same encoder modules (paths without the ``params/`` prefix); with
the Linen weights copied in it gives the same outputs (``tests/test_models.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from flax import nnx

from experiments.models.base import (
    BN_EPSILON,
    BN_MOMENTUM,
    ClassifierHead,
    MultiTaskModel,
    torch_default_init,
)
from experiments.models.resnet import BasicBlock, _conv
from experiments.tasks import TaskSpec

__all__ = [
    "BLOCK_NAMES",
    "DEFAULTS",
    "NNXSmallResNet",
    "SmallResNetEncoder",
    "build",
    "encoder_blocks",
    "make_blocks",
    "make_nnx_model",
]

DEFAULTS = {
    "widths": (8, 16, 32),  # channels of block1, block2, block3 (the stem has widths[0])
    "strides": (1, 2, 2),  # strides of block1, block2, block3
    "feature_dim": 32,  # shared fc after the pool (+ ReLU)
    "head_hidden": 0,  # per-task hidden width; 0 = linear head (Recon's)
    "bn_momentum": BN_MOMENTUM,
    "bn_epsilon": BN_EPSILON,
}
TASK_KINDS = ("classification",)
BLOCK_NAMES = ("stem", "block1", "block2", "block3", "neck")

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming_normal_(fan_out)


class Stem(nn.Module):
    """``conv`` 3x3/1 (no bias) -> ``bn`` -> ReLU."""

    features: int
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = _conv(self.features, 3, 1, "conv")(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon, name="bn"
        )(x)
        return nn.relu(x)


class Neck(nn.Module):
    """Global average pool -> ``fc`` Dense(features) -> ReLU: ``[B, H, W, C] -> [B, features]``."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        x = x.mean(axis=(1, 2))
        return nn.relu(nn.Dense(self.features, kernel_init=torch_default_init(), name="fc")(x))


def make_blocks(
    widths: Sequence[int],
    strides: Sequence[int],
    feature_dim: int,
    momentum: float = BN_MOMENTUM,
    epsilon: float = BN_EPSILON,
) -> list[nn.Module]:
    """The encoder as an ordered list of named Linen modules ``(x, train) -> x``.

    Called outside a module the blocks are unbound (:func:`encoder_blocks`); called inside a
    compact method they become that module's children (:class:`SmallResNetEncoder`).
    """
    w, s = tuple(widths), tuple(strides)
    return [
        Stem(w[0], momentum, epsilon, name="stem"),
        BasicBlock(w[0], s[0], momentum, epsilon, name="block1"),
        BasicBlock(w[1], s[1], momentum, epsilon, name="block2"),
        BasicBlock(w[2], s[2], momentum, epsilon, name="block3"),
        Neck(feature_dim, name="neck"),
    ]


class SmallResNetEncoder(nn.Module):
    """``x [B, H, W, C] -> z [B, feature_dim]``: the blocks of :func:`make_blocks`, in order."""

    widths: Sequence[int] = (8, 16, 32)
    feature_dim: int = 32
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    strides: Sequence[int] = (1, 2, 2)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        blocks = make_blocks(
            self.widths, self.strides, self.feature_dim, self.momentum, self.epsilon
        )
        for block in blocks:  # created inside compact: bound here as children
            x = block(x, train)
        return x


def _check(config, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(widths, strides, feature_dim)`` of a valid config; ``ValueError`` naming the bad key."""
    widths = tuple(int(c) for c in config.widths)
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(
            f"small_resnet: widths must be three positive channel counts (block1..block3); "
            f"got {tuple(config.widths)}."
        )
    strides = tuple(int(s) for s in config.strides)
    if len(strides) != 3 or not set(strides) <= {1, 2}:
        raise ValueError(
            f"small_resnet: strides must be three values in {{1, 2}} (block1..block3); got "
            f"{tuple(config.strides)}."
        )
    if int(config.feature_dim) < 1:
        raise ValueError(f"small_resnet: feature_dim must be >= 1; got {config.feature_dim}.")
    need = 2 ** strides.count(2)
    if min(input_shape[0], input_shape[1]) < need:
        raise ValueError(
            f"small_resnet: input {input_shape[0]}x{input_shape[1]} is too small for "
            f"{strides.count(2)} stride-2 blocks; need at least {need} pixels per side."
        )
    return widths, strides, int(config.feature_dim)


def _encoder(config, input_shape: tuple[int, ...]) -> SmallResNetEncoder:
    widths, strides, feature_dim = _check(config, input_shape)
    return SmallResNetEncoder(
        widths, feature_dim, float(config.bn_momentum), float(config.bn_epsilon), strides
    )


def encoder_blocks(config, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """The encoder of ``config`` as its ordered block list (``stem, block1..3, neck``).

    Each block is an unbound Linen module called as ``block(x, train) -> x``; chaining them is
    the encoder. ``config`` holds the model's keys (:data:`DEFAULTS`).
    """
    widths, strides, feature_dim = _check(config, tuple(input_shape))
    return make_blocks(
        widths, strides, feature_dim, float(config.bn_momentum), float(config.bn_epsilon)
    )


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    encoder = _encoder(config, input_shape)
    heads = {t.name: ClassifierHead(t.num_classes, int(config.head_hidden)) for t in tasks}
    return MultiTaskModel(encoder, heads, tuple(tasks))


# ---------------------------------------------------------------------------------------------
# Flax NNX.


def _nnx_conv(cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    pad = (kernel - 1) // 2
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_conv_init,
        rngs=rngs,
    )


def _nnx_bn(features: int, momentum: float, epsilon: float, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=momentum, epsilon=epsilon, rngs=rngs)


class NNXStem(nnx.Module):
    def __init__(self, cin: int, features: int, momentum: float, epsilon: float, rngs: nnx.Rngs):
        self.conv = _nnx_conv(cin, features, 3, 1, rngs)
        self.bn = _nnx_bn(features, momentum, epsilon, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


class NNXBasicBlock(nnx.Module):
    """The BasicBlock of :mod:`experiments.models.resnet` in NNX (same names and shapes)."""

    def __init__(self, cin: int, features: int, stride: int, momentum: float, epsilon: float, rngs):
        self.conv1 = _nnx_conv(cin, features, 3, stride, rngs)
        self.bn1 = _nnx_bn(features, momentum, epsilon, rngs)
        self.conv2 = _nnx_conv(features, features, 3, 1, rngs)
        self.bn2 = _nnx_bn(features, momentum, epsilon, rngs)
        if stride != 1 or cin != features:
            self.downsample_0 = _nnx_conv(cin, features, 1, stride, rngs)
            self.downsample_1 = _nnx_bn(features, momentum, epsilon, rngs)
        else:
            self.downsample_0 = self.downsample_1 = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.downsample_0 is not None:
            x = self.downsample_1(self.downsample_0(x))
        return nnx.relu(y + x)


class NNXNeck(nnx.Module):
    def __init__(self, cin: int, features: int, rngs: nnx.Rngs):
        self.fc = nnx.Linear(cin, features, kernel_init=torch_default_init(), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.fc(x.mean(axis=(1, 2))))


class NNXEncoder(nnx.Module):
    def __init__(
        self, cin: int, widths, strides, feature_dim: int, momentum: float, epsilon: float, rngs
    ):
        w, s = tuple(widths), tuple(strides)
        self.stem = NNXStem(cin, w[0], momentum, epsilon, rngs)
        self.block1 = NNXBasicBlock(w[0], w[0], s[0], momentum, epsilon, rngs)
        self.block2 = NNXBasicBlock(w[0], w[1], s[1], momentum, epsilon, rngs)
        self.block3 = NNXBasicBlock(w[1], w[2], s[2], momentum, epsilon, rngs)
        self.neck = NNXNeck(w[2], feature_dim, rngs)

    @property
    def blocks(self) -> list[nnx.Module]:
        """The blocks in order: ``stem, block1, block2, block3, neck``."""
        return [getattr(self, name) for name in BLOCK_NAMES]

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class NNXHead(nnx.Module):
    """:class:`~experiments.models.base.ClassifierHead` in NNX (``fc1`` when hidden > 0, ``pred``)."""

    def __init__(self, cin: int, num_classes: int, hidden: int, rngs: nnx.Rngs):
        init = torch_default_init()
        self.fc1 = nnx.Linear(cin, hidden, kernel_init=init, rngs=rngs) if hidden > 0 else None
        self.pred = nnx.Linear(hidden or cin, num_classes, kernel_init=init, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        if self.fc1 is not None:
            z = nnx.relu(self.fc1(z))
        return self.pred(z)


class NNXSmallResNet(nnx.Module):
    """``small_resnet`` in Flax NNX: ``model(x [B, H, W, C]) -> {task: logits [B, classes]}``."""

    def __init__(self, config, tasks: Sequence[TaskSpec], input_shape, rngs: nnx.Rngs):
        widths, strides, feature_dim = _check(config, tuple(input_shape))
        momentum, epsilon = float(config.bn_momentum), float(config.bn_epsilon)
        self.encoder = NNXEncoder(
            int(input_shape[-1]), widths, strides, feature_dim, momentum, epsilon, rngs
        )
        self.heads = nnx.Dict(
            {
                t.name: NNXHead(feature_dim, t.num_classes, int(config.head_hidden), rngs)
                for t in tasks
            }
        )
        self.task_names = tuple(t.name for t in tasks)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        z = self.encoder(x)
        return {name: self.heads[name](z) for name in self.task_names}


def make_nnx_model(
    config, tasks: Sequence[TaskSpec], input_shape: Sequence[int], seed: int = 0
) -> NNXSmallResNet:
    """The NNX model for ``config`` (the model's keys, :data:`DEFAULTS`) and ``tasks``.

    ``input_shape`` is ``(H, W, C)``; the model starts in training mode (``model.eval()`` for
    running statistics).
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C); got {tuple(input_shape)}.")
    return NNXSmallResNet(config, tuple(tasks), shape, nnx.Rngs(seed))
