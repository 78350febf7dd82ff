"""Weightings by name: what experiment configs and the representation (MGDA-UB) path select.

``get_weighting(name, **hyperparams)`` mirrors :func:`mtl_jax.get_method`: the same names for
the Gram-space methods, the same clear errors for unknown names and hyper-parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from mtl_jax.weighting.aligned_mtl import aligned_mtl_weighting
from mtl_jax.weighting.base import Weighting
from mtl_jax.weighting.basic import linear_weighting, mean_weighting, sum_weighting
from mtl_jax.weighting.cagrad import cagrad_weighting
from mtl_jax.weighting.config import config_weighting
from mtl_jax.weighting.dualproj import dualproj_weighting
from mtl_jax.weighting.ema import ema_weighting
from mtl_jax.weighting.fairgrad import fairgrad_weighting
from mtl_jax.weighting.gradvac import gradvac_weighting
from mtl_jax.weighting.imtl import imtl_g_weighting
from mtl_jax.weighting.krum import krum_weighting
from mtl_jax.weighting.mgda import mgda_weighting
from mtl_jax.weighting.nash_mtl import nash_mtl_weighting
from mtl_jax.weighting.nocl import nocl_weighting
from mtl_jax.weighting.pcgrad import pcgrad_weighting
from mtl_jax.weighting.rlw import random_weighting
from mtl_jax.weighting.upgrad import upgrad_weighting

__all__ = ["WEIGHTINGS", "check_hyperparams", "ema_weights_weighting", "get_weighting"]


def check_hyperparams(kind: str, name: str, factory: Callable, hyperparams: Mapping) -> None:
    """Raises a ``ValueError`` naming the unknown hyper-parameters and the accepted ones."""
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(hyperparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"Unknown hyper-parameter(s) {unknown} for {kind} {name!r}; it accepts "
            f"{sorted(accepted)}."
        )


def build(kind: str, registry: Mapping[str, Callable], name: str, hyperparams: Mapping) -> Any:
    """``registry[name](**hyperparams)``, with errors that list the valid names and parameters.

    The one lookup behind :func:`get_weighting`, ``mtl.get_method`` and ``mtl.scalarization.get_scalarizer``.
    """
    if name not in registry:
        raise ValueError(f"Unknown {kind} {name!r}; valid names: {sorted(registry)}.")
    factory = registry[name]
    check_hyperparams(kind, name, factory, hyperparams)
    return factory(**hyperparams)


def ema_weights_weighting(
    method: str = "mgda", alpha: float = 0.9, method_kwargs: Mapping[str, Any] | None = None
) -> Weighting:
    """The weighting registered as ``method`` (with ``method_kwargs``), smoothed by an EMA."""
    if method == "ema_weights":
        raise ValueError("ema_weights cannot wrap itself; choose another method.")
    return ema_weighting(get_weighting(method, **dict(method_kwargs or {})), alpha)


WEIGHTINGS: dict[str, Callable[..., Weighting]] = {
    "mean": mean_weighting,
    "sum": sum_weighting,
    "linear": linear_weighting,
    "pcgrad": pcgrad_weighting,
    "mgda": mgda_weighting,
    "cagrad": cagrad_weighting,
    "imtl_g": imtl_g_weighting,
    "gradvac": gradvac_weighting,
    "nash_mtl": nash_mtl_weighting,
    "aligned_mtl": aligned_mtl_weighting,
    "upgrad": upgrad_weighting,
    "dualproj": dualproj_weighting,
    "config": config_weighting,
    "random_weighting": random_weighting,
    "fairgrad": fairgrad_weighting,
    "nocl": nocl_weighting,
    "ema_weights": ema_weights_weighting,
    "krum": krum_weighting,
}


def get_weighting(name: str, **hyperparams: Any) -> Weighting:
    """Builds the Gram-space weighting registered as ``name``.

    Raises:
      ValueError: for an unknown name (listing the valid ones) or an unknown hyper-parameter
        (listing the method's).
    """
    return build("weighting", WEIGHTINGS, name, hyperparams)


def as_weighting(weighting: Weighting | str, what: str) -> Weighting:
    """``weighting`` itself, or the registered weighting of that name (no hyper-parameters).

    Raises:
      TypeError: naming ``what`` (the option that took it) when it is neither.
    """
    if isinstance(weighting, str):
        return get_weighting(weighting)
    if not isinstance(weighting, Weighting):
        raise TypeError(
            f"{what} must be a mtl_jax Weighting or a registered name "
            f"(mtl.weighting.WEIGHTINGS); got {type(weighting).__name__}."
        )
    return weighting
