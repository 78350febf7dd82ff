"""Pure Gram-space solvers ``G[K, K] (+ state, key, losses) -> weights[K]`` (DESIGN.md section 2)."""

from mtl_jax.weighting._minnorm import min_norm_weights
from mtl_jax.weighting.base import EmptyState, Weighting, stateless, stateless_random
from mtl_jax.weighting.basic import linear_weighting, mean_weighting, sum_weighting
from mtl_jax.weighting.cagrad import cagrad_dual_weights, cagrad_weighting, cagrad_weights
from mtl_jax.weighting.imtl import imtl_g_weighting, imtl_g_weights
from mtl_jax.weighting.mgda import mgda_weighting
from mtl_jax.weighting.pcgrad import pcgrad_weighting, pcgrad_weights, visiting_orders

__all__ = [
    "EmptyState",
    "Weighting",
    "cagrad_dual_weights",
    "cagrad_weighting",
    "cagrad_weights",
    "imtl_g_weighting",
    "imtl_g_weights",
    "linear_weighting",
    "mean_weighting",
    "mgda_weighting",
    "min_norm_weights",
    "pcgrad_weighting",
    "pcgrad_weights",
    "stateless",
    "stateless_random",
    "sum_weighting",
    "visiting_orders",
]
