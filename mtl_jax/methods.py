"""The method catalogue: one table of every method, and :func:`get_method`.

``mtl.get_method("cagrad:c=0.4", num_tasks=K, seed=s)`` returns a :class:`Method`: the optax
transform and everything a train loop must know to feed it (its cost class, its extra inputs,
whether heads are scaled, a post-step hook). The table is generated from the Gram-space
weightings (as Jacobian aggregators and as ``<name>_ub`` representation methods), the
element-wise aggregators and the loss-only scalarizers. ``docs/methods.md`` lists them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_jax.aggregation import (
    AGGREGATORS,
    CROSS_BATCH_AGGREGATORS,
    GRAM_METHODS,
    PAIRED_ROWS,
    from_representation,
    representation_weigh,
    weigh_first,
)
from mtl_jax.scalarization import (
    SCALARIZERS,
    from_scalarizer,
    post_step_in_state,
    scalarizer_weigh,
)
from mtl_jax.scalarization.auto_lambda import LAMBDA_GRAD, auto_lambda, auto_lambda_weigh
from mtl_jax.weighting.registry import WEIGHTINGS, check_hyperparams

PyTree = Any

__all__ = [
    "COSTS",
    "METHODS",
    "Method",
    "MethodEntry",
    "get_method",
    "method_names",
    "parse_method",
    "resolve_method",
]

#: What a method needs from the backward pass: the K-row Jacobian of the shared parameters;
#: the K gradients with respect to a shared representation (plus the trunk's rows or its one
#: backward pass); or only the task losses (the weights come from them; the update is the
#: weighted sum of the rows, i.e. one backward pass of the weighted loss).
COSTS = ("jacobian", "representation", "loss")

#: The keyword inputs a transform's ``update`` may need besides the gradient tree.
INPUTS = ("task_losses", "rep_grads", "paired_rows", "lambda_grad")
# paired_rows: the shared rows on two independent halves of the batch, leaves [2, K, ...]
# (mtl.aggregation.value_and_paired_grads; the cross-batch SDMGrad, MoDo: batches = 2).
# lambda_grad: Auto-Lambda's hypergradient [K] (mtl.scalarization.auto_lambda_grad).

UB_SUFFIX = "_ub"


@dataclasses.dataclass(frozen=True)
class Method:
    """A built method: its transform and how a loop feeds it.

    Attributes:
      name: the catalogue name (``"cagrad"``, ``"uw"``, ``"mgda_ub"``).
      hyperparams: the hyper-parameters it was built with (the seed included).
      cost: one of :data:`COSTS`.
      transform: ``update(grads, state, params, **inputs)`` takes the shared leaves' Jacobian
        rows (through :func:`mtl_jax.aggregation.shared_rows` when there are task-specific
        leaves) and returns a gradient shaped like the parameters.
      inputs: the keyword inputs ``update`` needs (:data:`INPUTS`): ``task_losses`` (always
        accepted), ``rep_grads`` (``d loss_k / d z``, from ``value_and_grads(...,
        representation=True)``).
      scales_heads: the method is the gradient of a weighted loss, so head k's own gradient is
        multiplied by ``w_k`` (loss-only methods; ``mtl.aggregation.weights`` reads ``w``).
      post_step: ``(opt_state, new_losses) -> opt_state`` to call after the optimizer step with
        the losses at the new parameters on the same batch (FAMO), or ``None``.
      batches: how many independent batches one update reads: 2 for the cross-batch methods
        (``sdmgrad``, ``modo``: their ``paired_rows`` input holds the rows on two halves of
        the batch, :func:`mtl_jax.aggregation.value_and_paired_grads`), 1 otherwise.
      weigh: for a method whose weights need no Jacobian (the loss-only methods but GradNorm,
        the representation methods, ``mean``/``sum``/``linear``): ``weigh(transform_state,
        task_losses, **inputs) -> (w[K], transform_state)``, the weights before the backward
        pass, leaving the state as ``transform.update`` would (the logged Jacobian Gram matrix
        aside). A loop then runs ONE backward pass with ``w`` as the losses' cotangent
        (``docs/custom_loop.md``, "Each method at its own cost"); ``None`` otherwise.
    """

    name: str
    hyperparams: Mapping[str, Any]
    cost: str
    transform: optax.GradientTransformationExtraArgs
    inputs: tuple[str, ...] = ("task_losses",)
    scales_heads: bool = False
    post_step: Callable[[PyTree, jax.Array], PyTree] | None = None
    batches: int = 1
    weigh: Callable[..., tuple[jax.Array, PyTree]] | None = None


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One row of the catalogue: the method's cost class and its builder.

    ``factory`` is the function whose signature lists the hyper-parameters (the aggregator,
    weighting or scalarizer factory); ``build(hyperparams, num_tasks, steps_per_epoch)``
    returns ``(transform, post_step, weigh)`` (:class:`Method`).
    """

    cost: str
    factory: Callable[..., Any]
    build: Callable[[dict[str, Any], int | None, int], tuple[Any, Any, Any]]
    inputs: tuple[str, ...] = ("task_losses",)
    scales_heads: bool = False
    required: tuple[str, ...] = ()

    def accepts(self, name: str) -> bool:
        return name in inspect.signature(self.factory).parameters


def _aggregator_entry(name: str) -> MethodEntry:
    factory = AGGREGATORS[name]

    def build(kwargs: dict[str, Any], num_tasks: int, steps_per_epoch: int) -> tuple[Any, ...]:
        del steps_per_epoch
        weigh = None
        if name in CONSTANT_WEIGHTS and num_tasks is not None:
            weigh = _constant_weigh(name, kwargs, num_tasks)
        return factory(**kwargs, num_tasks=num_tasks), None, weigh

    cross_batch = name in CROSS_BATCH_AGGREGATORS  # SDMGrad, MoDo: rows on two batches
    inputs = ("task_losses", PAIRED_ROWS) if cross_batch else ("task_losses",)
    return MethodEntry("jacobian", factory, build, inputs=inputs)


#: Aggregators whose weights do not depend on the Jacobian (the gradient of a fixed weighted
#: loss): a loop can run them as one backward pass (:attr:`Method.weigh`).
CONSTANT_WEIGHTS = ("mean", "sum", "linear")


def _constant_weigh(name: str, kwargs: dict[str, Any], num_tasks: int) -> Callable:
    """``weigh`` of ``mean``/``sum``/``linear``: their weighting on a K x K placeholder (they read
    only its size and dtype), through the same state step as every ``weigh``."""
    method = next(m for m in GRAM_METHODS if m.name == name)
    weighting = method.weighting(**{k: v for k, v in kwargs.items() if k != "seed"})

    def weights_fn(jac, gram, inner, key, task_losses, extra_args):
        del jac, gram, extra_args
        placeholder = jnp.zeros((num_tasks, num_tasks), jnp.zeros(()).dtype)
        return weighting.weigh(placeholder, inner, key, task_losses)

    return weigh_first(weights_fn, name=name)


def _with_keyword_params(
    factory: Callable[..., Any], extra: tuple[tuple[str, Any], ...]
) -> Callable[..., Any]:
    """``factory`` with the keyword-only parameters ``(name, default)`` of ``extra`` (those it
    lacks) added to its signature: what the catalogue checks a method's hyper-parameters
    against when its builder takes more than the factory (GradNorm's ``layer``, a
    representation method's ``sum_over_batch`` and ``seed``)."""

    def with_params(**kwargs: Any) -> Any:
        return factory(**kwargs)

    params = list(inspect.signature(factory).parameters.values())
    names = {p.name for p in params}
    params += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
        for n, d in extra
        if n not in names
    ]
    with_params.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return with_params


def _scalarizer_entry(name: str) -> MethodEntry:
    factory = SCALARIZERS[name]

    def build(kwargs: dict[str, Any], num_tasks: int, steps_per_epoch: int) -> tuple[Any, ...]:
        kwargs = dict(kwargs)
        layer = kwargs.pop("layer", None)
        if name == "dwa":
            kwargs.setdefault("steps_per_epoch", steps_per_epoch)
        scalarizer = factory(**kwargs)
        transform = from_scalarizer(
            scalarizer, num_tasks=num_tasks, grad_norm_layer=layer, name=name
        )
        post_step = None
        if name == "famo":  # FAMO updates its logits from the losses after the step
            post_step = lambda opt_state, new_losses: post_step_in_state(
                opt_state, scalarizer, new_losses
            )
        # GradNorm's weights need the task-gradient norms of a layer: no weights-first path
        weigh = None if layer is not None else scalarizer_weigh(scalarizer, name=name)
        return transform, post_step, weigh

    # GradNorm balances the task-gradient norms of one shared layer: it needs layer=
    extra, required = ((("layer", None),), ("layer",)) if name == "gradnorm" else ((), ())
    signature = _with_keyword_params(factory, extra)
    return MethodEntry("loss", signature, build, scales_heads=True, required=required)


def _representation_entry(weighting_name: str) -> MethodEntry:
    factory = WEIGHTINGS[weighting_name]

    def build(kwargs: dict[str, Any], num_tasks: int, steps_per_epoch: int) -> tuple[Any, ...]:
        del steps_per_epoch
        kwargs = dict(kwargs)
        sum_over_batch = bool(kwargs.pop("sum_over_batch", False))
        seed = int(kwargs.pop("seed", 0))
        weighting, name = factory(**kwargs), weighting_name + UB_SUFFIX
        transform = from_representation(
            weighting, num_tasks=num_tasks, sum_over_batch=sum_over_batch, seed=seed, name=name
        )
        weigh = representation_weigh(weighting, sum_over_batch=sum_over_batch, name=name)
        return transform, None, weigh

    signature = _with_keyword_params(factory, (("sum_over_batch", False), ("seed", 0)))
    return MethodEntry("representation", signature, build, inputs=("task_losses", "rep_grads"))


def _catalogue() -> dict[str, MethodEntry]:
    table: dict[str, MethodEntry] = {name: _aggregator_entry(name) for name in AGGREGATORS}
    for name in SCALARIZERS:
        if name not in table:  # "mean", "sum": the aggregator (the same update)
            table[name] = _scalarizer_entry(name)
    for name in WEIGHTINGS:
        table[name + UB_SUFFIX] = _representation_entry(name)
    # Auto-Lambda: a loss method whose weights take a meta step on the hypergradient input
    table["auto_lambda"] = MethodEntry(
        "loss",
        auto_lambda,
        lambda kwargs, num_tasks, steps_per_epoch: (
            auto_lambda(**kwargs, num_tasks=num_tasks),
            None,
            auto_lambda_weigh(kwargs.get("meta_lr", 1e-4)),
        ),
        inputs=("task_losses", LAMBDA_GRAD),
        scales_heads=True,
    )
    return table


#: Every method by name (aggregators, loss-only methods, ``<weighting>_ub``, in that order):
#: the one table experiment configs and custom loops select from.
METHODS: Mapping[str, MethodEntry] = _catalogue()


def parse_literal(text: str) -> Any:
    """A Python literal (``"0.4"`` -> ``0.4``, ``"True"``, ``"(1, 2)"``), or the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def method_names() -> str:
    """The catalogue's names by cost class, for error messages and listings."""
    by_cost = lambda cost: sorted(n for n, e in METHODS.items() if e.cost == cost)
    return (
        f"aggregators {by_cost('jacobian')}; loss-only methods {by_cost('loss')}; "
        f"representation methods {by_cost('representation')}"
    )


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cagrad:c=0.4,rescale=True"`` -> ``("cagrad", {"c": 0.4, "rescale": True})``.

    Raises:
      ValueError: for a part without ``=``.
    """
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Bad method string {spec!r}: expected 'name:key=value,...'.")
        kwargs[key.strip()] = parse_literal(value.strip())
    return name.strip(), kwargs


def _type_name(default: Any) -> str | None:
    """What a hyper-parameter with this default must be: "a bool", "a number", ... (None: any)."""
    if isinstance(default, bool):
        return "a bool (True / False)"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number (or one per task)"
    if isinstance(default, str):
        return "a string"
    return None


def _fits(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):  # a number, or one per task (FAMO's min_losses)
        number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
        per_task = isinstance(value, list | tuple) and all(number(v) for v in value)
        return number(value) or per_task or hasattr(value, "shape")
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def check_hyperparam_types(name: str, factory: Callable[..., Any], kwargs: Mapping) -> None:
    """Raises a ``ValueError`` naming a hyper-parameter whose value does not have the type of its
    default (``"cagrad:c=abc"``: ``c`` must be a number), before anything is built."""
    params = inspect.signature(factory).parameters
    for key, value in kwargs.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if default is inspect.Parameter.empty or default is None or _fits(value, default):
            continue
        raise ValueError(
            f"{name}: hyper-parameter {key!r} must be {_type_name(default)} (default "
            f"{default!r}); got {value!r} ({type(value).__name__}). E.g. '{name}:{key}="
            f"{default!r}'."
        )


def resolve_method(spec: str, **hyperparams: Any) -> tuple[str, MethodEntry, dict[str, Any]]:
    """``(name, catalogue entry, hyper-parameters)`` of a method string, checked as far as it
    can be without K: the name, the hyper-parameters' names and types, the required ones.
    :func:`get_method` builds it; a config check that does not know K yet stops here.

    Raises:
      ValueError: as :func:`get_method`, for everything but a K the method cannot take.
    """
    name, parsed = parse_method(spec)
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid names: {method_names()}.")
    entry = METHODS[name]
    kwargs = {**hyperparams, **parsed}
    check_hyperparams("method", name, entry.factory, kwargs)
    check_hyperparam_types(name, entry.factory, kwargs)
    missing = [k for k in entry.required if kwargs.get(k) is None]
    if missing:
        raise ValueError(
            f"{name} needs {missing}: e.g. '{name}:layer=Dense_1' (a path prefix of the shared "
            "layer whose task-gradient norms it balances)."
        )
    no_default = [
        p.name
        for p in inspect.signature(entry.factory).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in kwargs
    ]
    if no_default:
        raise ValueError(
            f"{name} needs the hyper-parameter(s) {no_default}, e.g. "
            f"mtl.get_method('{name}', num_tasks=K, {no_default[0]}=...)."
        )
    return name, entry, kwargs


def get_method(
    spec: str,
    *,
    num_tasks: int | None = None,
    seed: int | None = None,
    steps_per_epoch: int = 1,
    **hyperparams: Any,
) -> Method:
    """Builds a method from the catalogue.

    Args:
      spec: ``"name"`` or ``"name:key=value,..."`` (values are Python literals), a key of
        :data:`METHODS`.
      num_tasks: K. Every loss-only and representation method needs it; an aggregator built
        without it infers K at its first update but then logs no weights or Gram matrices.
      seed: seeds the method's PRNG key (PCGrad's orders, GradDrop's and RLW's draws) unless
        the spec sets ``seed=`` itself; a study gives each run its own seed.
      steps_per_epoch: the epoch length for methods that work per epoch (DWA).
      **hyperparams: more hyper-parameters (the spec's win on a clash).

    Raises:
      ValueError: for an unknown name (listing the catalogue), an unknown hyper-parameter
        (listing the method's), one of the wrong type (``"cagrad:c=abc"``) or a missing
        required one (GradNorm's ``layer``).
    """
    name, entry, kwargs = resolve_method(spec, **hyperparams)
    if num_tasks is None and entry.cost != "jacobian":
        raise ValueError(f"{name} ({entry.cost} method) needs num_tasks=K.")
    if seed is not None and "seed" not in kwargs and entry.accepts("seed"):
        kwargs["seed"] = int(seed)
    transform, post_step, weigh = entry.build(dict(kwargs), num_tasks, steps_per_epoch)
    return Method(
        name=name,
        hyperparams=kwargs,
        cost=entry.cost,
        transform=transform,
        inputs=entry.inputs,
        scales_heads=entry.scales_heads,
        post_step=post_step,
        batches=2 if PAIRED_ROWS in entry.inputs else 1,
        weigh=weigh,
    )
