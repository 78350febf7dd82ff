"""``segnet``: a SegNet-style encoder-decoder with per-pixel task heads, for dense tasks.

Source: lorenmt/mtan ``im2im_pred/model_segnet_split.py`` ("Split, standard"; the shared-trunk
SegNet that CAGrad, Nash-MTL and Recon use as the non-attention baseline on NYUv2/CityScapes):

* encoder: level ``i`` = ``encoder_block_i`` (Conv3x3 ``filters[i-1] -> filters[i]``, input
  channels for ``i = 0``) followed by ``conv_block_enc_i`` (one Conv3x3 at levels 0 and 1, two at
  the deeper levels: VGG-16's 2-2-3-3-3 layout), then 2x2 max-pool keeping the argmax;
* decoder, deepest level first: max-unpool with the stored argmax -> ``decoder_block_i``
  (Conv3x3 ``filters[i] -> filters[i-1]``; ``filters[0] -> filters[0]`` at level 0) ->
  ``conv_block_dec_i`` (one or two Conv3x3 at ``filters[i-1]``, mirrored);
* every Conv3x3 is ``Conv (bias) -> BN -> ReLU``; weights Xavier-normal, biases 0, BN 1/0;
* heads (:class:`~experiments.models.base.DenseHead`): ``Conv3x3(filters[0]) -> Conv1x1(out)``,
  no activation in between; segmentation logits (MTAN applies log-softmax in the model, here the
  loss does), depth ``[.., 1]``, normals ``[.., 3]`` L2-normalised per pixel.

The encoder output ``z: [B, H, W, filters[0]]`` is the decoder's last feature map (the whole
encoder-decoder is shared, as in MTAN's split model). Default ``filters`` are MTAN's standard
``(64, 128, 256, 512, 512)`` (a GPU config); ``filters=(16, 32, 64)`` is a small CPU variant. H and
W must be divisible by ``2 ** len(filters)``. Max-unpooling is exact: the argmax is the first
maximum of each 2x2 window in row-major order (PyTorch's ``MaxPool2d(return_indices=True)``), and
the pooling gradient goes to that position only.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.base import BN_EPSILON, BN_MOMENTUM, DenseHead, MultiTaskModel
from experiments.tasks import TaskSpec

DEFAULTS = {
    "filters": (64, 128, 256, 512, 512),  # MTAN's "standard" SegNet; one entry per level
}
TASK_KINDS = ("segmentation", "depth", "normals")
OUT_CHANNELS = {"depth": 1, "normals": 3}


def max_pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """2x2/2 max-pool that also returns the argmax: ``[B, H, W, C] -> ([B, H/2, W/2, C], mask)``.

    ``mask: [B, H/2, W/2, C, 4]`` is the one-hot position of the first maximum in each window
    (row-major). The pooled value is ``sum(window * mask)`` so the gradient reaches only that
    position, as in PyTorch.
    """
    b, h, w, c = x.shape
    windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    windows = windows.reshape(b, h // 2, w // 2, c, 4)
    mask = jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=x.dtype)
    return jnp.sum(windows * jax.lax.stop_gradient(mask), axis=-1), mask


def max_unpool(y: jax.Array, mask: jax.Array) -> jax.Array:
    """Inverse of :func:`max_pool_with_argmax`: ``[B, h, w, C]`` -> ``[B, 2h, 2w, C]``, zeros elsewhere."""
    b, h, w, c = y.shape
    out = (y[..., None] * jax.lax.stop_gradient(mask)).reshape(b, h, w, c, 2, 2)
    return out.transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c)


class ConvBNReLU(nn.Module):
    """MTAN's ``conv_layer``: ``Conv3x3 (bias) -> BN -> ReLU`` (modules ``conv``, ``bn``)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(
            self.features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            kernel_init=nn.initializers.xavier_normal(),
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name="bn"
        )(x)
        return nn.relu(x)


def _convs_per_level(level: int) -> int:
    return 1 if level < 2 else 2


class SegNetEncoder(nn.Module):
    """``x [B, H, W, C] -> z [B, H, W, filters[0]]`` (the shared SegNet encoder-decoder)."""

    filters: Sequence[int] = (64, 128, 256, 512, 512)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        f = self.filters
        masks = []
        for i in range(len(f)):
            x = ConvBNReLU(f[i], name=f"encoder_block_{i}")(x, train)
            for j in range(_convs_per_level(i)):
                x = ConvBNReLU(f[i], name=f"conv_block_enc_{i}_{j}")(x, train)
            x, mask = max_pool_with_argmax(x)
            masks.append(mask)
        for i in reversed(range(len(f))):
            out = f[max(i - 1, 0)]
            x = max_unpool(x, masks[i])
            x = ConvBNReLU(out, name=f"decoder_block_{i}")(x, train)
            for j in range(_convs_per_level(i)):
                x = ConvBNReLU(out, name=f"conv_block_dec_{i}_{j}")(x, train)
        return x


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    filters = tuple(int(c) for c in config.filters)
    if not filters:
        raise ValueError("segnet: filters must list at least one level.")
    h, w = input_shape[0], input_shape[1]
    div = 2 ** len(filters)
    if h % div or w % div:
        raise ValueError(
            f"segnet: input {h}x{w} must be divisible by 2**len(filters) = {div} "
            f"({len(filters)} max-pool/unpool levels); resize/crop the input or use fewer filters."
        )
    heads = {}
    for t in tasks:
        out = t.num_classes if t.kind == "segmentation" else OUT_CHANNELS[t.kind]
        heads[t.name] = DenseHead(out, filters[0], normalize=t.kind == "normals")
    return MultiTaskModel(SegNetEncoder(filters), heads, tuple(tasks))
