"""Pure Gram-space solvers ``G[K, K] (+ state, key, losses) -> weights[K]`` (docs/design/DESIGN.md section 2)."""

from mtl_jax.weighting._minnorm import min_norm_weights
from mtl_jax.weighting._qp import project_weights
from mtl_jax.weighting.aligned_mtl import (
    aligned_mtl_weighting,
    aligned_mtl_weights,
    balance_transformation,
)
from mtl_jax.weighting.base import EmptyState, Weighting, stateless, stateless_random
from mtl_jax.weighting.basic import linear_weighting, mean_weighting, sum_weighting
from mtl_jax.weighting.cagrad import cagrad_dual_weights, cagrad_weighting, cagrad_weights
from mtl_jax.weighting.config import config_weighting, config_weights
from mtl_jax.weighting.dualproj import dualproj_weighting, dualproj_weights
from mtl_jax.weighting.ema import EmaState, ema_weighting
from mtl_jax.weighting.excess_mtl import ExcessMTLState, excess_mtl_step, excess_risks
from mtl_jax.weighting.fairgrad import fairgrad_weighting, fairgrad_weights
from mtl_jax.weighting.gradvac import GradVacState, gradvac_step, gradvac_weighting
from mtl_jax.weighting.imtl import imtl_g_weighting, imtl_g_weights
from mtl_jax.weighting.krum import krum_scores, krum_weighting, krum_weights
from mtl_jax.weighting.mgda import mgda_weighting, normalization_scales
from mtl_jax.weighting.nash_mtl import (
    NashState,
    nash_mtl_weighting,
    nash_mtl_weights,
    nash_solution,
)
from mtl_jax.weighting.nocl import nocl_weighting, nocl_weights
from mtl_jax.weighting.pcgrad import pcgrad_weighting, pcgrad_weights, visiting_orders
from mtl_jax.weighting.registry import WEIGHTINGS, ema_weights_weighting, get_weighting
from mtl_jax.weighting.rlw import random_weighting, random_weights
from mtl_jax.weighting.upgrad import upgrad_weighting, upgrad_weights

__all__ = [
    "WEIGHTINGS",
    "EmaState",
    "EmptyState",
    "ExcessMTLState",
    "GradVacState",
    "NashState",
    "Weighting",
    "aligned_mtl_weighting",
    "aligned_mtl_weights",
    "balance_transformation",
    "cagrad_dual_weights",
    "cagrad_weighting",
    "cagrad_weights",
    "config_weighting",
    "config_weights",
    "dualproj_weighting",
    "dualproj_weights",
    "ema_weighting",
    "ema_weights_weighting",
    "excess_mtl_step",
    "excess_risks",
    "fairgrad_weighting",
    "fairgrad_weights",
    "get_weighting",
    "gradvac_step",
    "gradvac_weighting",
    "imtl_g_weighting",
    "imtl_g_weights",
    "krum_scores",
    "krum_weighting",
    "krum_weights",
    "linear_weighting",
    "mean_weighting",
    "mgda_weighting",
    "min_norm_weights",
    "nash_mtl_weighting",
    "nash_mtl_weights",
    "nash_solution",
    "nocl_weighting",
    "nocl_weights",
    "normalization_scales",
    "pcgrad_weighting",
    "pcgrad_weights",
    "project_weights",
    "random_weighting",
    "random_weights",
    "stateless",
    "stateless_random",
    "sum_weighting",
    "upgrad_weighting",
    "upgrad_weights",
    "visiting_orders",
]
