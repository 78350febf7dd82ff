"""The Gram-space aggregators as data: one :class:`GramMethod` row per method, factories generated.

Every row names the method's :class:`~mtl_jax.weighting.base.Weighting` factory from
:mod:`mtl_jax.weighting`; :func:`make_factory` turns it into the public factory
``name(*hyperparams, *, granularity=..., num_tasks=None)`` (the weighting's hyper-parameters, a
``seed`` for randomised methods, ``granularity`` where the method takes it) with a real
``inspect.Signature``, whose ``update`` is :func:`~mtl_jax.aggregation.gramspace.from_weighting`'s.
``num_tasks`` is inferred from a per-task vector (``linear``'s weights, a ``pref_vector``) when
given. :data:`AGGREGATORS` maps registry names to factories: the aggregator rows of the method
catalogue (:func:`mtl_jax.get_method` builds one by name). See ``docs/methods.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optax

from mtl_jax.gramian import GLOBAL
from mtl_jax.weighting.aligned_mtl import aligned_mtl_weighting
from mtl_jax.weighting.base import Weighting
from mtl_jax.weighting.basic import linear_weighting, mean_weighting, sum_weighting
from mtl_jax.weighting.cagrad import cagrad_weighting
from mtl_jax.weighting.config import config_weighting
from mtl_jax.weighting.dualproj import dualproj_weighting
from mtl_jax.weighting.fairgrad import fairgrad_weighting
from mtl_jax.weighting.gradvac import gradvac_weighting
from mtl_jax.weighting.imtl import imtl_g_weighting
from mtl_jax.weighting.krum import krum_weighting
from mtl_jax.weighting.mgda import mgda_weighting
from mtl_jax.weighting.nash_mtl import nash_mtl_weighting
from mtl_jax.weighting.nocl import nocl_weighting
from mtl_jax.weighting.pcgrad import pcgrad_weighting
from mtl_jax.weighting.registry import ema_weights_weighting
from mtl_jax.weighting.rlw import random_weighting as rlw_weighting
from mtl_jax.weighting.upgrad import upgrad_weighting

from .db_mtl import db_mtl
from .excess_mtl import excess_mtl
from .graddrop import graddrop
from .gramspace import from_weighting
from .moco import moco
from .modo import modo
from .sdmgrad import sdmgrad
from .trimmed_mean import trimmed_mean

__all__ = [
    "AGGREGATORS",
    "GRAM_METHODS",
    "GramMethod",
    "aligned_mtl",
    "cagrad",
    "conflict_free",
    "dualproj",
    "ema_weights",
    "fairgrad",
    "gradvac",
    "imtl_g",
    "infer_num_tasks",
    "krum",
    "linear",
    "make_factory",
    "mean",
    "mgda",
    "nash_mtl",
    "nocl",
    "pcgrad",
    "random_weighting",
    "sum_",
    "upgrad",
]

Transform = optax.GradientTransformationExtraArgs
_P = inspect.Parameter


@dataclass(frozen=True)
class GramMethod:
    """One Gram-space aggregator.

    Attributes:
      name: the registry key (:data:`AGGREGATORS`) and the name in error messages.
      weighting: the weighting factory; its parameters are the method's hyper-parameters.
      summary: the first paragraph of the factory's docstring.
      function: the Python name of the factory when the registry key is not a good one
        (``sum`` shadows a builtin; ``config`` is ConFIG, the conflict-free method).
      granular: whether the factory takes ``granularity`` (per-group weights).
      seed_at: position of ``seed`` among the positional hyper-parameters (randomised methods,
        and GradVac/EMA whose weightings shuffle or wrap a random one); ``None``: no seed.
      tasks_from: the hyper-parameter holding a per-task vector that gives ``num_tasks``.
      hidden: weighting parameters the aggregator does not expose.
      module: the module that documents the method (default: the weighting factory's).
    """

    name: str
    weighting: Callable[..., Weighting]
    summary: str
    function: str = ""
    granular: bool = True
    seed_at: int | None = None
    tasks_from: str | None = None
    hidden: tuple[str, ...] = ()
    module: str = ""


GRAM_METHODS: tuple[GramMethod, ...] = (
    GramMethod(
        "mean", mean_weighting, "The mean of the task gradients (equal weighting).", granular=False
    ),
    GramMethod(
        "sum",
        sum_weighting,
        "The sum of the task gradients (the gradient of the summed loss).",
        function="sum_",
        granular=False,
    ),
    GramMethod(
        "linear",
        linear_weighting,
        "A constant combination ``sum_k weights[k] g_k``.",
        granular=False,
        tasks_from="weights",
    ),
    GramMethod(
        "pcgrad",
        pcgrad_weighting,
        "PCGrad (Yu et al. 2020, Algorithm 1): the sum of the projected task gradients; every\n"
        "task visits the others in a fresh random order at every step (drawn from the key in the\n"
        "state); ``shuffle=False`` uses index order.",
        seed_at=0,
    ),
    GramMethod(
        "mgda",
        mgda_weighting,
        "MGDA (Sener & Koltun 2018): the exact min-norm point of the convex hull; ``normalization``\n"
        '(``"none"``, ``"l2"``, ``"loss"``, ``"loss+"``, the official code\'s options) solves the\n'
        "weights for ``g_k / n_k`` and applies them to the raw gradients, as the official code.",
        hidden=("max_iter",),
    ),
    GramMethod(
        "cagrad", cagrad_weighting, "CAGrad (Liu et al. 2021): ``g0 + c |g0| g_w / |g_w|``."
    ),
    GramMethod("imtl_g", imtl_g_weighting, "IMTL-G (Liu et al. 2021), closed form."),
    GramMethod(
        "gradvac",
        gradvac_weighting,
        "GradVac (Wang et al. 2021, Algorithm 1): every group keeps EMA targets of the pairwise\n"
        "cosines (rate ``beta``) and lifts each task gradient's cosine with the others up to its\n"
        "target; the update is the sum of the corrected gradients. Group as in the paper with\n"
        '``granularity``: ``"global"`` (whole model), :func:`mtl_jax.gramian.by_module` (per layer) or\n'
        '``"leaf"`` (per matrix). Needs ``num_tasks``.',
        seed_at=1,
    ),
    GramMethod(
        "nash_mtl",
        nash_mtl_weighting,
        "Nash-MTL (Navon et al. 2022): the bargaining solution ``G a = 1/a``, clipped to\n"
        "``max_norm``, solved exactly inside jit; ``update_weights_every > 1`` reuses the weights\n"
        "between updates and needs ``num_tasks``; ``max_norm = 0`` disables the clipping.",
    ),
    GramMethod(
        "aligned_mtl",
        aligned_mtl_weighting,
        "Aligned-MTL (Senushkin et al. 2023): ``J^T B pref``, B the balance transformation of G;\n"
        '``scale_mode``: ``"min"`` (paper), ``"median"`` or ``"rmse"``.',
        tasks_from="pref_vector",
    ),
    GramMethod(
        "upgrad",
        upgrad_weighting,
        "UPGrad (Quinton & Rey 2024): the mean of the task gradients projected onto the dual\n"
        "cone (exact projections); non-conflicting, linear under scaling.",
        tasks_from="pref_vector",
    ),
    GramMethod(
        "dualproj",
        dualproj_weighting,
        "DualProj (Quinton & Rey 2024): the mean gradient projected onto the dual cone (exact).",
        tasks_from="pref_vector",
    ),
    GramMethod(
        "config",
        config_weighting,
        "ConFIG, conflict-free inverse gradients (Liu, Chu & Thuerey 2024): the equal-cosine\n"
        "direction with projection length, expressed as a weighting of G.",
        function="conflict_free",
        tasks_from="pref_vector",
    ),
    GramMethod(
        "random_weighting",
        rlw_weighting,
        "RLW (Lin et al. 2022): ``softmax(z)`` weights, ``z ~ N(0, I)`` drawn at every step.",
        seed_at=0,
    ),
    GramMethod(
        "fairgrad",
        fairgrad_weighting,
        "FairGrad (Ban & Ji 2024): the alpha-fair allocation ``G w = w^(-1/alpha)``, exact; the\n"
        "update is homogeneous of degree ``(1 - alpha) / (1 + alpha)`` in the gradients.",
    ),
    GramMethod(
        "nocl",
        nocl_weighting,
        "CoNAL's rule: a group whose task gradients conflict (any ``g_i . g_j < 0``) gets no\n"
        "update, otherwise the mean. Pass the shared blocks as ``granularity`` (a grouping\n"
        "function, or :func:`mtl_jax.gramian.by_module`).",
    ),
    GramMethod(
        "ema_weights",
        ema_weights_weighting,
        "CR-MOGM-style smoothing: the EMA ``alpha w_{t-1} + (1 - alpha) w_t`` of a weighting's\n"
        "output; ``method`` names any weighting of :data:`mtl_jax.weighting.WEIGHTINGS` (built\n"
        "with ``method_kwargs``). Needs ``num_tasks``.",
        seed_at=3,
        module="mtl_jax.weighting.ema",
    ),
    GramMethod(
        "krum",
        krum_weighting,
        "Krum / Multi-Krum (Blanchard et al. 2017): the mean of the ``n_selected`` task gradients\n"
        "whose squared distances to their ``K - n_byzantine - 2`` nearest others sum least. Needs\n"
        "``K >= n_byzantine + 3`` and ``K >= n_selected`` (TorchJD's checks).",
    ),
)


def infer_num_tasks(num_tasks: int | None, vector: Any, name: str) -> int | None:
    """``num_tasks``, else the length of a per-task vector (weights, preference) when given."""
    if vector is None:
        return num_tasks
    length = len(vector)
    if num_tasks is not None and num_tasks != length:
        raise ValueError(f"{name}: num_tasks={num_tasks} but the per-task vector has {length}.")
    return length


def factory_signature(method: GramMethod) -> inspect.Signature:
    """The weighting's hyper-parameters (less ``hidden``), ``seed`` at ``seed_at``, then the
    keyword-only ``granularity`` (if ``granular``) and ``num_tasks``."""
    params = [
        p
        for p in inspect.signature(method.weighting).parameters.values()
        if p.name not in method.hidden
    ]
    if method.seed_at is not None:
        seed = _P("seed", _P.POSITIONAL_OR_KEYWORD, default=0, annotation="int")
        params.insert(method.seed_at, seed)
    if method.granular:
        params.append(_P("granularity", _P.KEYWORD_ONLY, default=GLOBAL, annotation="Granularity"))
    params.append(_P("num_tasks", _P.KEYWORD_ONLY, default=None, annotation="int | None"))
    return inspect.Signature(params, return_annotation="Transform")


def factory_doc(method: GramMethod) -> str:
    """``summary`` plus where the weighting and its paper, equations and departures live."""
    weighting = f"{method.weighting.__module__}.{method.weighting.__name__}"
    module = method.module or method.weighting.__module__
    inferred = (
        f" ``num_tasks`` defaults to the length of ``{method.tasks_from}``."
        if method.tasks_from
        else ""
    )
    return (
        f"{method.summary}\n\n"
        f":func:`~mtl_jax.aggregation.gramspace.from_weighting` of :func:`{weighting}`; the method, "
        f"its equations and departures from the paper: :mod:`{module}`.{inferred}\n"
    )


def make_factory(method: GramMethod) -> Callable[..., Transform]:
    """The public factory of ``method``: binds its signature, builds the weighting, adapts it."""
    signature = factory_signature(method)

    def factory(*args: Any, **kwargs: Any) -> Transform:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        hyperparams = dict(bound.arguments)
        seed = hyperparams.pop("seed", 0)
        granularity = hyperparams.pop("granularity", GLOBAL)
        num_tasks = hyperparams.pop("num_tasks")
        weighting = method.weighting(**hyperparams)
        if method.tasks_from is not None:
            num_tasks = infer_num_tasks(num_tasks, hyperparams[method.tasks_from], method.name)
        return from_weighting(
            weighting, granularity=granularity, seed=seed, num_tasks=num_tasks, name=method.name
        )

    factory.__name__ = factory.__qualname__ = method.function or method.name
    factory.__module__ = __name__
    factory.__doc__ = factory_doc(method)
    factory.__signature__ = signature  # type: ignore[attr-defined]
    return factory


_FACTORIES = {method.name: make_factory(method) for method in GRAM_METHODS}

mean = _FACTORIES["mean"]
sum_ = _FACTORIES["sum"]
linear = _FACTORIES["linear"]
pcgrad = _FACTORIES["pcgrad"]
mgda = _FACTORIES["mgda"]
cagrad = _FACTORIES["cagrad"]
imtl_g = _FACTORIES["imtl_g"]
gradvac = _FACTORIES["gradvac"]
nash_mtl = _FACTORIES["nash_mtl"]
aligned_mtl = _FACTORIES["aligned_mtl"]
upgrad = _FACTORIES["upgrad"]
dualproj = _FACTORIES["dualproj"]
conflict_free = _FACTORIES["config"]
random_weighting = _FACTORIES["random_weighting"]
fairgrad = _FACTORIES["fairgrad"]
nocl = _FACTORIES["nocl"]
ema_weights = _FACTORIES["ema_weights"]
krum = _FACTORIES["krum"]

# every table row, then the methods that work on the Jacobian's rows or coordinates
AGGREGATORS: dict[str, Callable[..., Transform]] = {
    **_FACTORIES,
    "graddrop": graddrop,
    "excess_mtl": excess_mtl,
    "trimmed_mean": trimmed_mean,
    "db_mtl": db_mtl,
    "moco": moco,
    "sdmgrad": sdmgrad,
    "modo": modo,
}
