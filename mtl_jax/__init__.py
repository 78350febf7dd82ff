"""mtl_jax: multi-task learning under gradient conflict, in JAX.

``import mtl_jax as mtl``. The names a first user needs are here: per-task gradients
(:func:`value_and_grads` and its model shapes), the method catalogue (:func:`get_method`),
the adapter into optax (:func:`shared_rows`), the conflict tracker and the per-task forward.
Everything else lives in its sub-package: :mod:`~mtl_jax.aggregation`,
:mod:`~mtl_jax.weighting`, :mod:`~mtl_jax.scalarization`, :mod:`~mtl_jax.conflict`,
:mod:`~mtl_jax.gramian`, :mod:`~mtl_jax.sharing`, :mod:`~mtl_jax.sparse`, :mod:`~mtl_jax.lass`,
:mod:`~mtl_jax.recon`, :mod:`~mtl_jax.conal`, :mod:`~mtl_jax.modules`, :mod:`~mtl_jax.batchnorm`,
:mod:`~mtl_jax.nnx`, :mod:`~mtl_jax.autogram` (the Gramian engine). The API map: ``docs/api.rst``; what changed: ``CHANGELOG.md``.
"""

from mtl_jax import (
    aggregation,
    autogram,
    batchnorm,
    conal,
    conflict,
    gradients,
    gramian,
    lass,
    methods,
    modules,
    recon,
    scalarization,
    sharing,
    sparse,
    weighting,
)
from mtl_jax.aggregation import shared_rows
from mtl_jax.autogram import GramianWeighting
from mtl_jax.conflict import ConflictTracker
from mtl_jax.gradients import PerTaskLosses, RepresentationWeighting, TrunkAndHeads, value_and_grads
from mtl_jax.methods import METHODS, Method, get_method, parse_method
from mtl_jax.sharing import COPIED, SHARED, per_task

__version__ = "0.1.0"

__all__ = [
    "COPIED",
    "METHODS",
    "SHARED",
    "ConflictTracker",
    "GramianWeighting",
    "Method",
    "PerTaskLosses",
    "RepresentationWeighting",
    "TrunkAndHeads",
    "aggregation",
    "autogram",
    "batchnorm",
    "conal",
    "conflict",
    "get_method",
    "gradients",
    "gramian",
    "lass",
    "methods",
    "modules",
    "parse_method",
    "per_task",
    "recon",
    "scalarization",
    "shared_rows",
    "sharing",
    "sparse",
    "value_and_grads",
    "weighting",
]
