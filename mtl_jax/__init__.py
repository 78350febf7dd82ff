"""mtl_jax: multi-task learning under gradient conflict, in JAX.

``import mtl_jax as mtl``. Per-task Jacobians (:mod:`mtl_jax.jacobian`), Gram matrices and
groupings (:mod:`mtl_jax.gramian`), aggregators as optax transforms (:mod:`mtl_jax.aggregate`),
conflict metrics (:mod:`mtl_jax.conflict`), and the Gram-space weightings they are built from
(:mod:`mtl_jax.weighting`).
"""

from mtl_jax import weighting
from mtl_jax.aggregate import (
    AGGREGATORS,
    AggregatorState,
    cagrad,
    from_weighting,
    get_aggregator,
    graddrop,
    imtl_g,
    last_gram,
    last_weights,
    linear,
    mean,
    mgda,
    multitask,
    pcgrad,
    sum,
    sum_rows,
)
from mtl_jax.conflict import (
    RECON_BINS,
    ConflictState,
    ConflictTracker,
    conflict_incidence,
    cosine_histogram,
    magnitude_similarity,
    mean_pairwise_cosine,
    pairwise_cosines,
)
from mtl_jax.gramian import (
    by_module,
    cosine_matrix,
    gramian,
    group_gramians,
    group_names,
    leaf_gramians,
    leaf_groups,
)
from mtl_jax.jacobian import mtl_value_and_grad, value_and_jacobian

__version__ = "0.1.0"

__all__ = [
    "AGGREGATORS",
    "RECON_BINS",
    "AggregatorState",
    "ConflictState",
    "ConflictTracker",
    "by_module",
    "cagrad",
    "conflict_incidence",
    "cosine_histogram",
    "cosine_matrix",
    "from_weighting",
    "get_aggregator",
    "graddrop",
    "gramian",
    "group_gramians",
    "group_names",
    "imtl_g",
    "last_gram",
    "last_weights",
    "leaf_gramians",
    "leaf_groups",
    "linear",
    "magnitude_similarity",
    "mean",
    "mean_pairwise_cosine",
    "mgda",
    "mtl_value_and_grad",
    "multitask",
    "pairwise_cosines",
    "pcgrad",
    "sum",
    "sum_rows",
    "value_and_jacobian",
    "weighting",
]
