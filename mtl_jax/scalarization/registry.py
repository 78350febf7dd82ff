"""Loss-only methods by name: what experiment configs select.

``get_scalarizer(name, **hyperparams)`` mirrors :func:`mtl_jax.get_method` and
:func:`mtl_jax.weighting.get_weighting`: the same lookup (:func:`mtl_jax.weighting.registry.build`),
the same clear errors for unknown names and hyper-parameters. See ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mtl_jax.weighting.registry import build

from .base import Scalarizer
from .cosmos import cosmos
from .dwa import dwa
from .equal import mean, sum_
from .famo import famo
from .gls import gls
from .gradnorm import gradnorm
from .imtl_l import imtl_l
from .pbi import pbi
from .rlw import rlw
from .stch import stch
from .uw import uw

__all__ = ["SCALARIZERS", "get_scalarizer"]

SCALARIZERS: dict[str, Callable[..., Scalarizer]] = {
    "mean": mean,
    "sum": sum_,
    "rlw": rlw,
    "uw": uw,
    "imtl_l": imtl_l,
    "dwa": dwa,
    "gls": gls,
    "stch": stch,
    "famo": famo,
    "gradnorm": gradnorm,
    "pbi": pbi,
    "cosmos": cosmos,
}


def get_scalarizer(name: str, **hyperparams: Any) -> Scalarizer:
    """Builds the loss-only method registered as ``name`` (experiment configs select by name).

    Raises:
      ValueError: for an unknown name (listing the valid ones) or an unknown hyper-parameter
        (listing the method's).
    """
    return build("scalarizer", SCALARIZERS, name, hyperparams)
