"""Task modulation: per-task, per-channel learnable scales on shared feature maps.

The modulation module of Zhao et al. ("A Modulation Module for Multi-task Learning with
Applications in Image Retrieval", ECCV 2018), as combined with PCGrad and LaSS by Alison,
Jonathan & Suhartono (CommIT 18(1), 2024; docs/design/METHODS.md section 3). Form chosen here
(the papers leave it UNVERIFIED): a per-channel scale ``s_t: [C]``, initialised to 1, multiplying
the last (channel) axis, ``y = x * s_t``; Zhao et al.'s ``C x C`` projection has it as its
diagonal. The module holds *one* scale (``task_scale``); :func:`modulation_spec` marks the
scales COPIED, :func:`~mtl_jax.sharing.copy_per_task` stacks K of them and
:func:`~mtl_jax.sharing.per_task` gives task t's stream row t. Called outside ``per_task`` with
stacked scales ``[K, C]`` the module raises. A runnable recipe: ``docs/recipes/modulation.md``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mtl_jax import _tree
from mtl_jax.sharing import COPIED, SHARED

PyTree = Any

PARAM_NAME = "task_scale"
"""Name of the scale parameter; :func:`modulation_spec` finds the modules by it."""

__all__ = ["PARAM_NAME", "NNXTaskModulation", "TaskModulation", "is_modulation", "modulation_spec"]


def _modulate(x: jax.Array, scale: jax.Array) -> jax.Array:
    if scale.ndim != 1 or scale.shape[0] != x.shape[-1]:
        raise ValueError(
            f"TaskModulation: scale of shape {scale.shape} for features with {x.shape[-1]} "
            "channels; a stacked [K, C] scale must go through mtl.per_task (one row per task)."
        )
    return x * scale.astype(x.dtype)


class TaskModulation(nn.Module):
    """Flax Linen per-channel modulation ``y = x * task_scale`` (``task_scale: [C]``, init 1).

    Attributes:
      param_dtype: dtype of the scale.
    """

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [..., C] -> [..., C]``."""
        scale = self.param(PARAM_NAME, nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return _modulate(x, scale)


class NNXTaskModulation(nnx.Module):
    """Flax NNX version of :class:`TaskModulation`: ``y = x * task_scale``, ``[C]``, init 1."""

    def __init__(self, num_features: int, *, param_dtype: Any = jnp.float32):
        setattr(self, PARAM_NAME, nnx.Param(jnp.ones((num_features,), param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [..., C] -> [..., C]``."""
        return _modulate(x, getattr(self, PARAM_NAME)[...])


def is_modulation(path: str) -> bool:
    """Whether a ``/``-joined leaf path is a modulation scale (Linen or NNX ``.../value``)."""
    parts = path.split("/")
    while len(parts) > 1 and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return parts[-1] == PARAM_NAME


def modulation_spec(params: PyTree) -> PyTree:
    """A sharing spec with every modulation scale :data:`COPIED` and everything else SHARED.

    Combine it with other specs (LaSS masks, Recon branches) with
    :func:`~mtl_jax.sharing.merge_specs`.

    Raises:
      ValueError: if ``params`` holds no modulation scale.
    """
    spec = jax.tree_util.tree_map_with_path(
        lambda p, _: COPIED if is_modulation(_tree.path_str(p)) else SHARED, params
    )
    if not any(m is COPIED for m in jax.tree.leaves(spec)):
        raise ValueError(
            f"modulation_spec: no parameter named {PARAM_NAME!r} in the parameters; does the "
            "model contain a TaskModulation?"
        )
    return spec
