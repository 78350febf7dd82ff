"""``lenet``: the LeNet-style shared trunk with per-task heads used on Multi-MNIST.

Source: Sener & Koltun (2018), ``MultiLeNetR`` / ``MultiLeNetO`` in isl-org/MultiObjectiveOptimization
(copied by Pytorch-PCGrad and Nash-MTL):

* trunk: ``Conv5x5(10) -> MaxPool2 -> ReLU -> Conv5x5(20) -> MaxPool2 -> ReLU -> flatten ->
  Dense(50) -> ReLU`` (valid convolutions; 28x28 input -> 320 features before the Dense);
* head per task: ``Dense(50) -> ReLU -> Dense(num_classes)``.

Departures: no dropout (the original multiplies conv2's output by an unscaled Bernoulli(0.5)
channel mask shared by the tasks in training only; a deterministic trunk keeps the encoder a pure
``(params, x)`` function); any input size with at least one pixel left after the two conv/pool
stages (16x16 -> 1x1x20, 28x28 -> 4x4x20, 36x36 -> 6x6x20); weights use PyTorch's default init,
biases zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from experiments.models.base import ClassifierHead, MultiTaskModel, torch_default_init
from experiments.tasks import TaskSpec

DEFAULTS = {
    "conv_features": (10, 20),  # channels of the two 5x5 convolutions
    "kernel_size": 5,
    "latent_dim": 50,  # width of the shared representation z
    "head_hidden": 50,  # per-task hidden width; 0 = linear head
}
TASK_KINDS = ("classification",)


class LeNetEncoder(nn.Module):
    """``x [B, H, W, C] -> z [B, latent_dim]`` (modules ``conv{i}`` and ``fc``)."""

    conv_features: Sequence[int]
    kernel_size: int
    latent_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        k = self.kernel_size
        for i, f in enumerate(self.conv_features):
            x = nn.Conv(
                f, (k, k), padding="VALID", kernel_init=torch_default_init(), name=f"conv{i}"
            )(x)
            x = nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)))
        x = x.reshape((x.shape[0], -1))
        return nn.relu(nn.Dense(self.latent_dim, kernel_init=torch_default_init(), name="fc")(x))


def _spatial_after(size: int, stages: int, kernel: int) -> int:
    for _ in range(stages):
        size = (size - kernel + 1) // 2
    return size


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    features = tuple(int(f) for f in config.conv_features)
    k = int(config.kernel_size)
    h, w = input_shape[0], input_shape[1]
    if min(_spatial_after(h, len(features), k), _spatial_after(w, len(features), k)) < 1:
        raise ValueError(
            f"lenet: input {h}x{w} is too small for {len(features)} valid {k}x{k} conv + 2x2 pool "
            "stages; use a larger input, fewer conv_features or a smaller kernel_size."
        )
    encoder = LeNetEncoder(features, k, int(config.latent_dim))
    heads = {t.name: ClassifierHead(t.num_classes, int(config.head_hidden)) for t in tasks}
    return MultiTaskModel(encoder, heads, tuple(tasks))
