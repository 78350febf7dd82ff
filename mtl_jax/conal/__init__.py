"""CoNAL: conflict-noticed architecture learning (Yue, Zhang & Liang, AAAI 2023), and CoNAL-Pro.

A backbone cut into B blocks (:mod:`.blocks`) becomes a supernet in which every task chooses a
branch point (:mod:`.supernet`); an alternating search learns the choice with conflict noticing
on the shared blocks (:mod:`.search`); the argmax gives a discrete tree (:mod:`.architecture`),
retrained from scratch with per-task gradient rows (:mod:`.retrain`: the ONE retrain model).
CoNAL-Pro decides tasks progressively and ties task groups (:mod:`.pro`). Departures are listed in
each module; the whole story, with the search's cost and the stream mixing's derivation:
``docs/recipes/conal.md``.
"""

from .architecture import (
    Architecture,
    architecture_text,
    block_param_counts,
    discretise,
    param_counts,
)
from .blocks import Block, linen_block, nnx_block
from .pro import pro_architecture, pro_decide, pro_restrict, search_pro, split_by_conflict
from .retrain import (
    Retrain,
    RetrainState,
    TreeModel,
    inherit_params,
    make_retrain,
    random_block_init,
    recompute_tree_statistics,
    tree_init,
    tree_value_and_grads,
    unit_aggregation,
)
from .search import (
    Search,
    SearchConfig,
    SearchState,
    block_grouping,
    default_arch_optimizer,
    default_weight_optimizer,
    make_search,
)
from .supernet import MIXINGS, TASK_MAPS, Supernet, branch_weights

__all__ = [
    "MIXINGS",
    "TASK_MAPS",
    "Architecture",
    "Block",
    "Retrain",
    "RetrainState",
    "Search",
    "SearchConfig",
    "SearchState",
    "Supernet",
    "TreeModel",
    "architecture_text",
    "block_grouping",
    "block_param_counts",
    "branch_weights",
    "default_arch_optimizer",
    "default_weight_optimizer",
    "discretise",
    "inherit_params",
    "linen_block",
    "make_retrain",
    "make_search",
    "nnx_block",
    "param_counts",
    "pro_architecture",
    "pro_decide",
    "pro_restrict",
    "random_block_init",
    "recompute_tree_statistics",
    "search_pro",
    "split_by_conflict",
    "tree_init",
    "tree_value_and_grads",
    "unit_aggregation",
]
