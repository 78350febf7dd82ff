"""A Gramian engine: ``G = J J^T`` from per-layer activations and cotangents, never the
``K x P`` Jacobian; then any Gram-space weighting and the update (issue 24).

``mtl.autogram.engine_value_and_grads(loss_fn, GramianWeighting("upgrad"))`` is the engine's
step; ``value_and_gramian`` only the Gram matrix. Instance-wise objectives (IWRM: every sample
an objective) with ``GramianWeighting(..., instance_wise=True)``. Details: ``docs/autogram.md``.
"""

from mtl_jax.autogram.engine import (
    EnginePlan,
    GramianWeighting,
    LeafPlan,
    engine_value_and_grads,
    value_and_gramian,
)

__all__ = [
    "EnginePlan",
    "GramianWeighting",
    "LeafPlan",
    "engine_value_and_grads",
    "value_and_gramian",
]
