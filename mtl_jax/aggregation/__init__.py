"""Aggregators: optax transforms that turn task gradient rows into one update.

``update`` takes rows ``[K, *param.shape]`` per shared leaf (``task_losses=`` as an extra
argument) and returns a gradient shaped like the parameters, so an aggregator chains in front of
any optax optimizer, inside :func:`shared_rows` for models with task-specific leaves::

  tx = optax.chain(mtl.shared_rows(mtl.aggregation.pcgrad(seed=0), is_head), optax.adam(1e-3))

One concept per module: :mod:`.gramspace` (the Gram-space adapter), :mod:`.table` (the Gram-space
methods as data, the registry), :mod:`.graddrop`, :mod:`.excess_mtl`, :mod:`.trimmed_mean`,
:mod:`.db_mtl` and :mod:`.moco` (the methods that work on the Jacobian's rows or coordinates;
the last three share :mod:`.tracked_rows`, the transform around a row-tracking step),
:mod:`.sdmgrad` and :mod:`.modo` (cross-batch methods: rows on two batches, :mod:`.cross_batch`),
:mod:`.representation` (MGDA-UB weights), :mod:`.rows` (the adapter for a gradient
tree), :mod:`.state` (reading the last weights and Gram matrices), :mod:`.finite` (skipping
non-finite steps). The long story: ``docs/methods.md``, "Aggregators as optax transforms".
"""

from .cross_batch import (
    CROSS_BATCH_AGGREGATORS,
    PAIRED_ROWS,
    split_in_halves,
    value_and_paired_grads,
)
from .db_mtl import DBMTLState, db_mtl
from .excess_mtl import excess_mtl
from .finite import skip_nonfinite
from .graddrop import GradDropState, graddrop, graddrop_leaf
from .gramspace import (
    AggregatorState,
    batched_weighting,
    from_weighting,
    from_weights_fn,
    guarded_weigh,
    weigh_first,
)
from .moco import MoCoState, moco
from .modo import MoDoState, modo
from .representation import from_representation, representation_weigh
from .rows import shared_rows
from .sdmgrad import SDMGradState, sdmgrad
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
    krum,
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
from .trimmed_mean import trimmed_mean

__all__ = [
    "AGGREGATORS",
    "CROSS_BATCH_AGGREGATORS",
    "GRAM_METHODS",
    "PAIRED_ROWS",
    "AggregatorState",
    "DBMTLState",
    "GradDropState",
    "GramMethod",
    "MoCoState",
    "MoDoState",
    "SDMGradState",
    "aggregator_state",
    "aligned_mtl",
    "batched_weighting",
    "cagrad",
    "conflict_free",
    "db_mtl",
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
    "krum",
    "linear",
    "mean",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "nocl",
    "pcgrad",
    "random_weighting",
    "representation_weigh",
    "sdmgrad",
    "shared_rows",
    "skip_nonfinite",
    "split_in_halves",
    "sum_",
    "trimmed_mean",
    "upgrad",
    "value_and_paired_grads",
    "weigh_first",
    "weights",
]
