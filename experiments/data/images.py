"""Image decoding and resizing without TensorFlow: Pillow, deterministic.

TFDS returns images either decoded (``uint8[H, W, C]``) or, with
``decoders={"image": tfds.decode.SkipDecoding()}``, as the stored encoded bytes. Encoded JPEGs
are decoded with Pillow's *draft* mode, which lets libjpeg decode directly at 1/2, 1/4 or 1/8 of
the full size when the target is much smaller: for the 6000x4000 plant_leaves photographs this is
tens of times faster than a full decode followed by a resize. The draft never goes below the
target size, so the final bilinear resize still sees at least as many pixels as it produces.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["decode_resized", "resize_uint8", "to_unit_float"]


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """``uint8[H, W, C]`` -> ``float32[H, W, C]`` in [0, 1]."""
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of ``uint8[H, W, C]`` to ``uint8[size[0], size[1], C]``.

    Pillow's bilinear filter widens its support when downsampling, so it averages over the source
    pixels rather than aliasing. A no-op when the image already has the size.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"resize_uint8 expects [H, W, C]; got shape {image.shape}.")
    height, width = size
    if image.shape[:2] == (height, width):
        return image.astype(np.uint8, copy=False)
    channels = image.shape[2]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image.astype(np.uint8))
    resized = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
    return resized.reshape(height, width, channels)


def _decode_bytes(data: bytes, size: tuple[int, int], channels: int) -> np.ndarray:
    pil = Image.open(io.BytesIO(data))
    mode = "L" if channels == 1 else "RGB"
    if pil.format == "JPEG":
        pil.draft(mode, (size[1], size[0]))  # (width, height); never smaller than requested
    pil = pil.convert(mode)
    image = np.asarray(pil).reshape(pil.height, pil.width, channels)
    return resize_uint8(image, size)


def decode_resized(
    image: np.ndarray | bytes, size: tuple[int, int], channels: int = 3
) -> np.ndarray:
    """An image as ``uint8[size[0], size[1], channels]``, from decoded pixels or encoded bytes.

    Args:
      image: ``uint8[H, W, C]`` pixels, or the encoded bytes (JPEG, PNG) TFDS keeps when the image
        feature is read with ``tfds.decode.SkipDecoding()``.
      size: ``(height, width)`` of the result.
      channels: 1 (grey) or 3 (RGB); decoded pixels must already have this many channels.
    """
    if isinstance(image, bytes | np.bytes_):
        return _decode_bytes(bytes(image), size, channels)
    image = np.asarray(image)
    if image.dtype.kind in "SO":  # a 0-d array holding the encoded bytes
        return _decode_bytes(image.item(), size, channels)
    if image.ndim != 3 or image.shape[2] != channels:
        raise ValueError(f"Expected a [H, W, {channels}] image; got shape {image.shape}.")
    return resize_uint8(image, size)
