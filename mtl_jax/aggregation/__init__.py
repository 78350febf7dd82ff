"""Aggregators: optax transforms that turn task gradient rows into one update.

``update`` takes rows ``[K, *param.shape]`` per shared leaf (``task_losses=`` as an extra
argument) and returns a gradient shaped like the parameters, so an aggregator chains in front of
any optax optimizer, inside :func:`shared_rows` for models with task-specific leaves::

  tx = optax.chain(mtl.shared_rows(mtl.aggregation.pcgrad(seed=0), is_head), optax.adam(1e-3))

One concept per module: :mod:`.gramspace` (the Gram-space adapter), :mod:`.table` (the Gram-space
methods as data, the registry), :mod:`.graddrop` and :mod:`.excess_mtl` (the two elementwise
methods), :mod:`.representation` (MGDA-UB weights), :mod:`.rows` (the adapter for a gradient
tree), :mod:`.state` (reading the last weights and Gram matrices), :mod:`.finite` (skipping
non-finite steps). The long story: ``docs/methods.md``, "Aggregators as optax transforms".
"""

from .excess_mtl import excess_mtl
from .finite import skip_nonfinite
from .graddrop import GradDropState, graddrop, graddrop_leaf
from .gramspace import (
    AggregatorState,
    batched_weighting,
    from_weighting,
    from_weights_fn,
    guarded_weigh,
)
from .representation import from_representation
from .rows import shared_rows
from .state import aggregator_state, gram, weights
from .table import (
    AGGREGATORS,
    GRAM_METHODS,
    GramMethod,
    aligned_mtl,
    cagrad,
    conflict_free,
    dualproj,
    ema_weights,
    fairgrad,
    gradvac,
    imtl_g,
    linear,
    mean,
    mgda,
    nash_mtl,
    nocl,
    pcgrad,
    random_weighting,
    sum_,
    upgrad,
)

__all__ = [
    "AGGREGATORS",
    "GRAM_METHODS",
    "AggregatorState",
    "GradDropState",
    "GramMethod",
    "aggregator_state",
    "aligned_mtl",
    "batched_weighting",
    "cagrad",
    "conflict_free",
    "dualproj",
    "ema_weights",
    "excess_mtl",
    "fairgrad",
    "from_representation",
    "from_weighting",
    "from_weights_fn",
    "graddrop",
    "graddrop_leaf",
    "gradvac",
    "gram",
    "guarded_weigh",
    "imtl_g",
    "linear",
    "mean",
    "mgda",
    "nash_mtl",
    "nocl",
    "pcgrad",
    "random_weighting",
    "shared_rows",
    "skip_nonfinite",
    "sum_",
    "upgrad",
    "weights",
]
