"""``mlp``: flatten -> a shared MLP trunk -> per-task MLP heads (the CPU default model).

The default model of the main command on the embedded two-digit benchmark (16x16-ish grayscale
images, 2 tasks x 10 classes). XLA's CPU convolutions are several times slower than PyTorch's on
small conv nets, so the CPU defaults use this MLP; the conv models are GPU configs.

Encoder: ``x [B, H, W, C] -> flatten [B, H*W*C] -> (Dense(h) -> ReLU) for h in hidden_sizes ->
z [B, hidden_sizes[-1]]``. Heads: :class:`~experiments.models.base.ClassifierHead` (``head_hidden``
> 0 adds one hidden layer). Weights use PyTorch's default init, biases zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from experiments.models.base import ClassifierHead, MultiTaskModel, torch_default_init
from experiments.tasks import TaskSpec

DEFAULTS = {
    "hidden_sizes": (128, 128),  # shared trunk widths
    "head_hidden": 64,  # per-task hidden width; 0 = linear head
}
TASK_KINDS = ("classification",)


class MLPEncoder(nn.Module):
    """``[B, ...] -> [B, hidden_sizes[-1]]``; every layer is ``Dense -> ReLU`` (``fc{i}``)."""

    hidden_sizes: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = x.reshape((x.shape[0], -1))
        for i, h in enumerate(self.hidden_sizes):
            x = nn.relu(nn.Dense(h, kernel_init=torch_default_init(), name=f"fc{i}")(x))
        return x


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    hidden = tuple(int(h) for h in config.hidden_sizes)
    if not hidden or min(hidden) < 1:
        raise ValueError(
            f"mlp: hidden_sizes must be a non-empty tuple of positive ints; got {hidden}."
        )
    heads = {t.name: ClassifierHead(t.num_classes, int(config.head_hidden)) for t in tasks}
    return MultiTaskModel(MLPEncoder(hidden), heads, tuple(tasks))
