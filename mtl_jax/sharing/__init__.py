"""Per-task parameter views: shared, copied and masked parameters (docs/design/DESIGN.md section 5).

A model is written once, as a pure ``apply(params, *args)``; a *sharing spec*, a pytree of
markers shaped like the parameters, says which leaves are shared by every task, copied per task
(Recon, task modulation) or masked per task (LaSS). :func:`per_task` runs the K tasks' forwards
in one ``vmap``, the shared prefix once; ``mtl.value_and_grads(mtl.PerTaskLosses(...))`` gives
their losses and gradient tree with no task-by-task term (``grads``). One concept per module: ``markers`` (SHARED, COPIED, Masked),
``paths`` (path filters, layers), ``specs`` (check, build, merge, labels, copies), ``masks``
(masks as call-time arrays), ``views`` (a task's view), ``state`` (BatchNorm statistics),
``dependence`` (the data-flow pass behind the state errors), ``forward`` (:func:`per_task`),
``grads`` (the per-task gradients behind :class:`mtl_jax.PerTaskLosses`).

Semantics, examples and the BatchNorm rules: ``docs/custom_loop.md``, section "Sharing specs".
"""

from .forward import per_task
from .markers import COPIED, SHARED, Masked, Sharing
from .markers import Marker as Marker  # type alias
from .masks import spec_from_masks, split_masks, with_masks
from .paths import (
    COLLECTIONS,
    layer_key,
    layer_names,
    layer_spec,
    match_paths,
    path_filter,
)
from .paths import PathFilter as PathFilter  # type alias (mtl_jax.sparse, batchnorm, lass)
from .specs import (
    check_spec,
    copy_per_task,
    make_spec,
    merge_specs,
    shared_view,
    spec_task_specific,
    task_specific_leaves,
)
from .state import StateReduction as StateReduction  # type alias
from .state import _state_flags as _state_flags  # used by mtl_jax.recon
from .state import (
    copy_state_per_task,
    reduce_task_state,
    state_spec_per_task,
)
from .views import task_params

__all__ = [
    "COLLECTIONS",
    "COPIED",
    "SHARED",
    "Masked",
    "Sharing",
    "check_spec",
    "copy_per_task",
    "copy_state_per_task",
    "layer_key",
    "layer_names",
    "layer_spec",
    "make_spec",
    "match_paths",
    "merge_specs",
    "path_filter",
    "per_task",
    "reduce_task_state",
    "shared_view",
    "spec_from_masks",
    "spec_task_specific",
    "split_masks",
    "state_spec_per_task",
    "task_params",
    "task_specific_leaves",
    "with_masks",
]
