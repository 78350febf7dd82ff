"""The train loop: one jitted step per method at its own cost, a conflict probe beside it,
evaluation, checkpoints.

Step (``make_train_step``), for a shared encoder and per-task heads::

    losses[K], encoder Jacobian, head gradients  <- mtl.value_and_grads(mtl.TrunkAndHeads(...))
      (a weights-first method -- loss-only, <weighting>_ub, mean/sum -- instead: the weights
       from Method.weigh, then ONE backward pass of the weighted loss, WeightedBackward)
    encoder update   <- aggregator -> [mask] -> optimizer -> [mask again, so frozen weights stay
                                                               bit-identical]
    head updates     <- optimizer on each head's own gradient

With ``config.train.objectives = "instances"`` (:class:`InstanceWise`) every (sample, task) pair
of the batch is an objective (IWRM with one task)::

    losses[B, T], G [B T, B T], w, sum w_bt grad L_bt  <- the Gramian engine (instance_wise=True)
    encoder and head updates <- optimizer (encoder chain after the method's place, heads_tx)

Probe (``make_conflict_probe``, a second jitted program run before every ``conflict.every``-th
step on that step's batch, :class:`ProbedStep`)::

    encoder Jacobian -> mtl.ConflictTracker (masked by the sparse-training mask, if any)

With a sharing spec (``RunSpec.sharing_fn``: per-task copies such as modulation scales, per-task
masks such as LaSS's; ``RunSpec.branch_fn``: Recon's branched layers, BatchNorm statistics
included), the encoder runs through ``mtl.per_task`` (the shared prefix once, then one stream per
task), one gradient tree comes from ``mtl.value_and_grads`` of a ``mtl.PerTaskLosses`` (Jacobian rows for the shared leaves,
each copy's and each head's own task's gradient), the aggregator sees the shared leaves through
``mtl.aggregation.shared_rows``, and the tracker measures the remaining shared leaves only. A per-task
encoder keeps per-task BatchNorm statistics everywhere (:func:`per_task_state`: every state leaf
``[K, ...]``, COPIED, also after a shared layer; rows before the branch stay identical), fixed at
the run's start, so each stream is evaluated with the statistics it was trained with -- never
with the streams' average.

With ``config.eval.recompute_bn_batches = N > 0`` a finished run recomputes its BatchNorm
statistics on N training batches per stream (:func:`mtl_jax.batchnorm.recompute_statistics`,
precise BN) before its final evaluation and its ``final`` artifact (:func:`recompute_bn`).

The run's summary gives the method's median step (``seconds_per_step``) and the probe's
(``probe_seconds``) apart (``benchmarks/runner_cost.py``).

Runs are resumable: the whole :class:`TrainState` (parameters, BatchNorm statistics, optimizer
and aggregator state, conflict counters, step) is checkpointed with orbax, which writes to a
temporary directory and renames it (atomic). The loop itself is :func:`experiments.loop.run_loop`
(generic: any step function and state); the batches of an epoch are a deterministic function of
``(seed, epoch)``, and a resumed run starts inside an epoch at the right batch, so a killed run
finishes bit-identical to an uninterrupted one on CPU. Log records written after the restored
checkpoint are dropped from ``metrics.jsonl`` on resume. A run is a phase of its study
(:mod:`experiments.phases`): its checkpoints live in the phase directory, and a finished run saves
its final parameters as the artifact ``final``, from which later phases start (``init_from``).

A run is laid out on every visible device (:mod:`experiments.parallel`, ``config.parallel``): the
step is jitted with in/out shardings -- the batch split along the mesh axis ``"data"``, the
parameters and optimizer moments replicated or FSDP-sharded, every other leaf of the state
replicated -- and on one device this is the plain single-device step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import mtl_jax as mtl
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import lifecycle, optim
from experiments import losses as losses_lib
from experiments import metrics as metrics_lib
from experiments import parallel as parallel_lib
from experiments.logs import JsonlLog
from experiments.phases import Artifacts
from experiments.tasks import TaskSpec
from mtl_jax import autogram
from mtl_jax import lass as lass_lib
from mtl_jax import recon as recon_lib
from mtl_jax import sharing as sharing_lib
from mtl_jax import sparse as sparse_lib

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """A task loss became NaN or inf; the run stops without writing a checkpoint of that state."""


@dataclasses.dataclass(frozen=True, eq=False)
class RunSpec:
    """One training run of a study.

    Attributes:
      label: display name, unique within a study (e.g. ``"pcgrad"``, ``"pcgrad+st"``).
      method: a method name of the library's catalogue (``mtl.METHODS``, built by
        ``mtl.get_method``).
      method_kwargs: its hyper-parameters.
      seed: seeds the initialisation, the data order and the aggregator's PRNG key.
      tasks: the tasks whose losses are trained (single-task references, per-task fine-tuning);
        ``None`` = all tasks of the data set.
      encoder_mask_fn: ``encoder params -> mask`` (bool pytree, ``True`` = trainable), computed
        once from the run's initial encoder parameters (sparse training). The mask is applied to
        the combined update (after the aggregator) and again after the optimizer.
      measure_masked: with a mask, measure conflicts on the task gradients restricted to the
        trainable coordinates (``True``) or on the full encoder Jacobian (``False``).
      sharing_fn: ``encoder params -> sharing spec`` (``mtl_jax.sharing``), computed from the run's
        initial encoder parameters; the encoder then runs through ``mtl.per_task``.
      branch_fn: ``() -> layer names`` (Recon): these encoder layers get per-task copies of their
        parameters and BatchNorm statistics (:func:`mtl_jax.recon.branch`) at the start of the
        run; called once, when the run starts (it may read an earlier phase's artifact).
      branch_init: ``"copy"`` (every copy starts from the layer's initial value; the paper) or
        ``"fresh"`` (copy t from the model initialised with another key; the official code).
      conflict_every: the conflict probe's period for this run (``None``: ``config.conflict.every``);
        Recon's search sets 1, since its S-conflict scores select the layers.
      init_from: the ``run_id`` (phase name) of a finished run of the same work dir whose final
        parameters (and BatchNorm statistics), its ``final`` artifact, this run starts from; its
        optimizer starts fresh.
      epochs: overrides ``config.train.epochs`` for this run.
      model: overrides the study's model for this run (e.g. the variant with modulation).
      info: free-form facts about the run, copied into its start and summary records.
    """

    label: str
    method: str = "mean"
    method_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    tasks: tuple[str, ...] | None = None
    encoder_mask_fn: Callable[[PyTree], PyTree] | None = None
    measure_masked: bool = True
    sharing_fn: Callable[[PyTree], PyTree] | None = None
    branch_fn: Callable[[], Sequence[str]] | None = None
    branch_init: str = "copy"
    init_from: str | None = None
    epochs: int | None = None
    model: Any = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    conflict_every: int | None = None

    @property
    def run_id(self) -> str:
        return f"{self.label}__seed{self.seed}"


class TrainState(NamedTuple):
    """Everything a resumed run needs (a pytree of arrays, checkpointed as one item)."""

    step: jax.Array  # int32 []
    params: dict[str, PyTree]  # {"encoder": ..., "heads": {task: ...}}
    model_state: dict[str, PyTree]  # non-parameter collections (BatchNorm statistics)
    opt_state: tuple[PyTree, PyTree]  # (encoder chain, heads) states
    conflict: mtl.conflict.ConflictState
    first_nonfinite: jax.Array  # int32 []: step of the first non-finite loss, -1 if none


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """The static pieces of a run: tasks, model, transforms, tracker, sharing spec."""

    tasks: tuple[TaskSpec, ...]  # the trained tasks (their losses form the loss vector)
    streams: tuple[TaskSpec, ...]  # all tasks of the model (the per-task streams)
    model: Any
    encoder_tx: optax.GradientTransformation  # aggregator -> optimizer -> post transforms
    heads_tx: optax.GradientTransformation
    tracker: mtl.ConflictTracker
    method: mtl.Method  # from the library's catalogue: its transform is inside encoder_tx
    task_map: str = "vmap"
    sharing: PyTree | None = None  # encoder sharing spec (per-task mode) or None
    state_sharing: PyTree | None = None  # spec of the encoder's state (Recon: branched BN stats)
    measure_mask: PyTree | None = None  # conflicts measured on the Jacobian masked by it (ST)
    layout: parallel_lib.Layout | None = None  # mesh and parameter sharding (None: one device)
    # encoder_tx without its first transform (the method's): the optimizer chain a
    # weights-first method's one gradient goes through (its state: opt_state[0][1:])
    encoder_rest_tx: optax.GradientTransformation | None = None
    conflict_every: int = 1  # the conflict probe runs every this many steps
    allow_weights_first: bool = True  # config.train.weights_first
    lookahead_lr: float = 0.0  # the model's learning rate: Auto-Lambda's virtual step
    # config.train.objectives = "instances": the Gramian engine's (sample, task) objectives
    instance_wise: InstanceWise | None = None

    @property
    def weights_first(self) -> bool:
        """The method's weights need no Jacobian (``Method.weigh``), the encoder is one shared
        trunk and ``config.train.weights_first`` allows it: the step runs ONE backward pass of
        the weighted loss."""
        return (
            self.allow_weights_first
            and self.method.weigh is not None
            and self.sharing is None
            and self.instance_wise is None
        )


@dataclasses.dataclass(frozen=True)
class InstanceWise:
    """``config.train.objectives = "instances"``: every (sample, task) pair of the batch is an
    objective, ``K = batch_size x T`` in the order ``b T + t`` (IWRM with one task; Quinton &
    Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, Section 5), weighed in Gram
    space by the Gramian engine (:func:`mtl_jax.autogram.engine_value_and_grads`,
    ``instance_wise=True``) and applied by ONE weighted backward pass (:func:`_instance_wise_grads`).

    ``gramian``: the engine option holding the method's weighting; ``num_objectives``: K (the
    size of a stateful weighting's state); ``seed``: the randomised weightings' key (folded with
    the step)."""

    gramian: autogram.GramianWeighting
    num_objectives: int
    seed: int


class StepMasks(NamedTuple):
    """A run's masks as arrays: arguments of the jitted step and prediction, laid out on the
    mesh like the parameters they mask, instead of constants baked into the compiled program.

    ``sharing``: the masks of the sharing spec's ``Masked`` leaves (LaSS), split off it by
    ``mtl.sharing.split_masks`` (leaves ``[K, *param.shape]``, ``None`` at unmasked leaves; the Problem
    holds the spec's structure). ``measure``: the sparse-training mask conflicts are measured on
    (shaped like the encoder parameters), or None."""

    sharing: PyTree | None = None
    measure: PyTree | None = None


def _masks_or_constants(problem: Problem, masks: StepMasks | None) -> StepMasks:
    """The masks a step uses: the given arrays, or the Problem's own (a spec holding its masks,
    the measure mask) when called without them."""
    return StepMasks(None, problem.measure_mask) if masks is None else masks


def split_sharing_masks(sharing: PyTree | None) -> tuple[PyTree | None, PyTree | None]:
    """``(spec structure, masks)`` of a sharing spec with ``Masked`` leaves
    (``mtl.sharing.split_masks``); ``(sharing, None)`` for a spec without masks (or no spec)."""
    is_masked = lambda m: isinstance(m, sharing_lib.Masked)
    if sharing is None or not any(
        is_masked(m) for m in jax.tree.leaves(sharing, is_leaf=is_masked)
    ):
        return sharing, None
    return mtl.sharing.split_masks(sharing)


def step_mask_shardings(
    masks: StepMasks, enc_params: PyTree, layout: parallel_lib.Layout
) -> StepMasks:
    """The masks' layout: a sharing mask ``[K, *shape]`` as its parameter's Jacobian rows, the
    measure mask as its parameter (replicated without FSDP)."""
    by_path = {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(enc_params)[0]
    }
    sharing = None
    if masks.sharing is not None:
        sharing = jax.tree_util.tree_map_with_path(
            lambda p, m: jax.sharding.NamedSharding(
                layout.mesh,
                parallel_lib.jacobian_spec(m, by_path[jax.tree_util.keystr(p)], layout),
            ),
            masks.sharing,
        )
    measure = None
    if masks.measure is not None:
        measure = parallel_lib.param_shardings(masks.measure, layout)
    return StepMasks(sharing, measure)


# ---------------------------------------------------------------------------------------------
# Model application.


def _split_variables(variables: Mapping[str, Any]) -> tuple[PyTree, dict[str, Any]]:
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    return params, state


def apply_module(module, params, state, x, train: bool):
    """Applies a Linen module; with mutable collections in ``state`` and ``train``, updates them."""
    variables = {"params": params, **state}
    if train and state:
        out, new_state = module.apply(variables, x, train=True, mutable=list(state))
        return out, dict(new_state)
    return module.apply(variables, x, train=train), state


def init_params(model, tasks, input_shape, key) -> tuple[dict, dict]:
    """Initial ``params`` and ``model_state`` as ``{"encoder": ..., "heads": {task: ...}}``."""
    variables = model.init(key, input_shape)
    enc_params, enc_state = _split_variables(variables["encoder"])
    heads_params, heads_state = {}, {}
    for task in tasks:
        heads_params[task.name], heads_state[task.name] = _split_variables(
            variables["heads"][task.name]
        )
    return (
        {"encoder": enc_params, "heads": heads_params},
        {"encoder": enc_state, "heads": heads_state},
    )


def shared_view(tree: PyTree, spec: PyTree | None) -> PyTree:
    """``tree`` with the spec's COPIED leaves hidden (``optax.MaskedNode``): the shared parameters,
    on which conflicts are measured."""
    return tree if spec is None else mtl.sharing.shared_view(tree, spec)


def _mask_rows(jac: PyTree, mask: PyTree) -> PyTree:
    """The task Jacobian with the masked coordinates of every row set to 0."""
    return jax.tree.map(
        lambda g, m: jnp.where(jnp.asarray(m, bool)[None], g, jnp.zeros((), g.dtype)), jac, mask
    )


def per_task_state(state: PyTree, template: PyTree, num_streams: int) -> tuple[PyTree, PyTree]:
    """``(state, spec)``: every leaf of a per-task encoder's state (BatchNorm statistics) with a
    task axis ``[K, ...]`` and :data:`~mtl_jax.COPIED` in ``spec``.

    ``template``: the un-branched state (arrays or ``jax.ShapeDtypeStruct``). A leaf shaped like
    its template leaf is repeated K times (identical rows: a layer before the branch, or a shared
    layer after it, whose streams then keep their own statistics); a leaf already ``[K,
    *template shape]`` (a branched layer, a per-task run's ``final``) is kept. Departure from
    :func:`mtl_jax.per_task`'s default (shared statistics averaged over the streams): the
    average is the statistics of no stream, so a per-task encoder is evaluated with it wrongly.
    """

    markers = task_axis_markers(state, template, num_streams, "State")
    state = jax.tree.map(
        lambda x, m: (
            x if m is sharing_lib.COPIED else jnp.repeat(jnp.asarray(x)[None], num_streams, 0)
        ),
        state,
        markers,
    )
    return state, jax.tree.map(lambda _: sharing_lib.COPIED, state)


def task_axis_markers(tree: PyTree, template: PyTree, num_streams: int, what: str) -> PyTree:
    """Per leaf of ``tree``, from its shape against the un-branched ``template`` leaf's:
    :data:`~mtl_jax.SHARED` for the template's shape, :data:`~mtl_jax.COPIED` for ``[K, *shape]``.

    Raises:
      ValueError: naming a leaf (``what``: "State", "Parameter") of any other shape.
    """

    def one(path, x, t):
        shape, base = tuple(np.shape(x)), tuple(t.shape)
        if shape == base:
            return sharing_lib.SHARED
        if shape == (num_streams, *base):
            return sharing_lib.COPIED
        raise ValueError(
            f"{what} leaf {jax.tree_util.keystr(path)} has shape {shape}; a per-task encoder "
            f"with {num_streams} streams needs {base} (shared) or {(num_streams, *base)} (per "
            "task). Check that the run's model matches the state (init_from artifact)."
        )

    return jax.tree_util.tree_map_with_path(one, tree, template)


def init_shapes(model, streams, input_shape) -> tuple[PyTree, PyTree]:
    """The un-branched model's ``(params, model_state)`` shapes (``jax.ShapeDtypeStruct``;
    nothing computed)."""
    key = jax.random.key(0, impl="rbg")
    return jax.eval_shape(lambda: init_params(model, streams, input_shape, key))


def _stream_state_spec(problem: Problem, enc_state: PyTree) -> PyTree:
    """The per-task encoder's state spec: ``problem.state_sharing``; an empty state needs none."""
    if problem.state_sharing is not None:
        return problem.state_sharing
    if jax.tree.leaves(enc_state):
        raise ValueError(
            "A per-task (sharing / branched) encoder with BatchNorm statistics needs per-task "
            "statistics: give build_problem state_sharing from train.per_task_state(state, "
            "template, K) (averaging the streams' statistics is not supported)."
        )
    return jax.tree.map(lambda _: sharing_lib.SHARED, enc_state)


def _encoder_forward(
    problem: Problem, enc_state: dict, train: bool, sharing_masks: PyTree | None = None
) -> Callable:
    """``(encoder params, x) -> (z, new_state)``; with a sharing spec, ``z`` has a task axis.

    In per-task mode the parameters *and* the state go through ``mtl.per_task`` with their specs:
    every BatchNorm's statistics are ``[K, ...]`` and COPIED in ``problem.state_sharing``
    (:func:`per_task_state`), so each task stream trains and evaluates with its own row; a
    per-task encoder with state but no state spec is an error (no silent averaging).
    ``sharing_masks``: the masks of the spec's mask slots (:class:`StepMasks`)."""
    model = problem.model

    def apply(p, x):
        return apply_module(model.encoder, p, enc_state, x, train)

    if problem.sharing is None:
        return apply
    state_spec = _stream_state_spec(problem, enc_state)
    forward = sharing_lib.per_task(
        lambda v, x: apply_module(
            model.encoder, v["params"], {k: v[k] for k in v if k != "params"}, x, train
        ),
        {"params": problem.sharing, **state_spec},
        len(problem.streams),
        has_state=True,
    )
    kw = {} if sharing_masks is None else {"masks": {"params": sharing_masks}}
    return lambda p, x: forward({"params": p, **enc_state}, x, **kw)


# ---------------------------------------------------------------------------------------------
# The jitted step and prediction.


def _structured_grads(
    problem: Problem,
    state: TrainState,
    x,
    targets,
    sharing_masks=None,
    representation: bool | mtl.gradients.WeightedBackward | None = None,
):
    """Encoder + heads: :class:`mtl.TrunkAndHeads` (encoder rows, heads' own gradients, and
    ``d loss_k / d z`` for a representation method). ``representation``: the option of
    :func:`mtl.value_and_grads` (default: ``d loss_k / d z`` when the method reads them); a
    :class:`mtl.gradients.WeightedBackward` gives the encoder ONE gradient (weights-first
    methods), its ``aux["weigh"]`` returned last instead of the representation gradients."""
    model, head_states = problem.model, state.model_state["heads"]
    if representation is None:
        representation = "rep_grads" in problem.method.inputs

    def head_loss_fn(task: TaskSpec) -> Callable:
        def fn(hp, z, y):
            pred, new_state = apply_module(
                model.heads[task.name], hp, head_states[task.name], z, True
            )
            return losses_lib.task_loss(task, pred, y), new_state

        return fn

    grad_fn = mtl.value_and_grads(
        mtl.TrunkAndHeads(
            _encoder_forward(problem, state.model_state["encoder"], True, sharing_masks),
            {t.name: head_loss_fn(t) for t in problem.tasks},
        ),
        has_aux=True,
        task_map=problem.task_map,
        representation=representation,
    )
    heads = {t.name: state.params["heads"][t.name] for t in problem.tasks}
    (losses, aux), grads = grad_fn({"trunk": state.params["encoder"], "heads": heads}, x, targets)
    head_grads = {**jax.tree.map(jnp.zeros_like, state.params["heads"]), **grads["heads"]}
    new_heads = {**head_states, **aux["heads"]}
    last = aux["weigh"] if "weigh" in aux else aux.get("rep_grads")
    return losses, grads["trunk"], head_grads, aux["trunk"], new_heads, last


def _per_task_losses_grads(problem: Problem, state: TrainState, x, targets, sharing_masks=None):
    """Sharing spec: per-task encoder streams and ONE gradient tree from
    a :class:`mtl_jax.PerTaskLosses` (``task_map="unroll"``): each task's loss is differentiated inside its own stream
    (unrolled over the tasks, whose heads differ), so the shared (and masked) encoder leaves get
    their Jacobian rows, each copied leaf and each head its own task's gradient, and nothing is
    ever K x K -- neither the leaves nor the activations after the branch.

    Streams of tasks the run does not train (single-task fine-tuning of a shared model) give no
    loss and no rows. Heads must have no mutable state in this mode."""
    model = problem.model
    trained = [i for i, t in enumerate(problem.streams) if t in problem.tasks]
    if any(jax.tree.leaves(state.model_state["heads"])):
        raise ValueError("Per-task (sharing) runs need heads without mutable state.")

    def task_loss(view, enc_state_t, t, x, targets):
        task = problem.streams[t]
        z, new_state = apply_module(model.encoder, view["encoder"], enc_state_t, x, True)
        if task not in problem.tasks:
            return jnp.zeros((), jnp.float32), new_state
        pred, _ = apply_module(model.heads[task.name], view["heads"][task.name], {}, z, True)
        return losses_lib.task_loss(task, pred, targets[task.name]), new_state

    enc_state = state.model_state["encoder"]
    state_spec = _stream_state_spec(problem, enc_state)
    spec = {
        "encoder": problem.sharing,
        "heads": jax.tree.map(lambda _: sharing_lib.SHARED, state.params["heads"]),
    }
    grad_fn = mtl.value_and_grads(
        mtl.PerTaskLosses(
            task_loss, spec, len(problem.streams), has_state=True, state_spec=state_spec
        ),
        task_specific={"encoder": False, "heads": True},
        task_map="unroll",
    )
    kw = {} if sharing_masks is None else {"masks": {"encoder": sharing_masks}}
    (losses, new_enc_state), grads = grad_fn(state.params, enc_state, x, targets, **kw)
    enc_grads = grads["encoder"]
    if len(trained) < len(problem.streams):  # rows of the trained tasks only
        index = jnp.asarray(trained)
        copied = sharing_lib.spec_task_specific(problem.sharing)  # a prefix of the encoder tree
        enc_grads = jax.tree.map(
            lambda c, sub: sub if c else jax.tree.map(lambda g: g[index], sub), copied, enc_grads
        )
        losses = losses[index]
    return losses, enc_grads, grads["heads"], new_enc_state, state.model_state["heads"], None


def _scale_head_grads(problem: Problem, head_grads: dict, weights: jax.Array) -> dict:
    """Head k's gradient times task k's weight (heads of untrained tasks keep their zeros)."""
    index = {t.name: k for k, t in enumerate(problem.tasks)}
    return {
        name: jax.tree.map(lambda g, k=index[name]: g * weights[k].astype(g.dtype), grads)
        if name in index
        else grads
        for name, grads in head_grads.items()
    }


def loss_vector_fn(problem: Problem, state: TrainState, sharing_masks=None) -> Callable:
    """``fn(params, x, targets) -> losses [K]``: the trained tasks' losses at any parameters
    (train mode; the model state is ``state``'s and is not updated), differentiable: FAMO's
    post-step losses, Auto-Lambda's look-ahead."""
    model, head_states = problem.model, state.model_state["heads"]
    stream = {t.name: i for i, t in enumerate(problem.streams)}
    forward = _encoder_forward(problem, state.model_state["encoder"], True, sharing_masks)

    def fn(params, x, targets) -> jax.Array:
        z, _ = forward(params["encoder"], x)
        losses = []
        for task in problem.tasks:
            z_t = z
            if problem.sharing is not None:
                z_t = jax.tree.map(lambda a, i=stream[task.name]: a[i], z)
            pred, _ = apply_module(
                model.heads[task.name],
                params["heads"][task.name],
                head_states[task.name],
                z_t,
                True,
            )
            losses.append(losses_lib.task_loss(task, pred, targets[task.name]))
        return jnp.stack(losses)

    return fn


def grads_fn_losses(
    problem: Problem, state: TrainState, x, targets, sharing_masks=None
) -> jax.Array:
    """The task losses at ``state.params`` (train mode, statistics not updated), for FAMO."""
    losses = loss_vector_fn(problem, state, sharing_masks)(state.params, x, targets)
    return jax.lax.stop_gradient(losses)


def _lambda_grad(problem: Problem, state: TrainState, x, targets, masks: StepMasks) -> jax.Array:
    """Auto-Lambda's hypergradient (:func:`mtl.scalarization.auto_lambda_grad`) at the current
    weights, with the model's learning rate as the look-ahead's: the virtual step on the first
    half of the batch, the validation loss on the second (the runner has no validation loader;
    the paper draws a validation batch from a held-out part of the training set)."""
    both = mtl.aggregation.split_in_halves((x, targets), 0)  # leaves [2, B/2, ...]
    train, val = (jax.tree.map(lambda v, i=i: v[i], both) for i in (0, 1))
    weights = mtl.scalarization.auto_lambda_weights(state.opt_state[0])
    return mtl.scalarization.auto_lambda_grad(
        loss_vector_fn(problem, state, masks.sharing),
        state.params,
        weights,
        train,
        val,
        lookahead_lr=problem.lookahead_lr,
    )


def _encoder_jacobian(
    problem: Problem, state: TrainState, x, targets, masks: StepMasks, paired: bool = False
):
    """``(losses, encoder Jacobian rows, head gradients, encoder state, head states,
    rep_grads)`` at ``state``: the K-row path of the run's model shape.

    ``paired`` (a cross-batch method, ``Method.batches == 2``): the batch is cut in two halves
    (:func:`mtl.aggregation.split_in_halves`), the same path runs on both under one ``vmap``
    (one forward over the batch, the same backward work), and the last entry is the encoder's
    ``paired_rows`` (leaves ``[2, K, ...]``) instead of ``rep_grads``; everything else is the
    mean over the halves. With BatchNorm each half is normalised with its own statistics, as two
    independent mini-batches are; the running statistics are the mean of the two updates."""
    grads_fn = _structured_grads if problem.sharing is None else _per_task_losses_grads
    if paired:
        halves = lambda tree: mtl.aggregation.split_in_halves(tree, 0)
        out = jax.vmap(lambda xh, th: grads_fn(problem, state, xh, th, masks.sharing)[:5])(
            halves(x), halves(targets)
        )
        mean = lambda t: jax.tree.map(lambda v: jnp.mean(v, axis=0).astype(v.dtype), t)
        losses, enc_jac, head_grads, enc_state, head_states = map(mean, out)
        last = out[1]
    else:
        losses, enc_jac, head_grads, enc_state, head_states, last = grads_fn(
            problem, state, x, targets, masks.sharing
        )
    # FSDP: the Jacobian's rows follow their parameter's sharding (no-op otherwise)
    enc_jac = parallel_lib.constrain_jacobian(enc_jac, state.params["encoder"], problem.layout)
    return losses, enc_jac, head_grads, enc_state, head_states, last


def make_conflict_probe(problem: Problem) -> Callable[..., mtl.conflict.ConflictState]:
    """``(state, batch, masks=None) -> conflict state``: the conflict probe, a program of its
    own run every ``conflict.every`` steps on the step's batch and parameters before the step.

    It forms the encoder Jacobian (whatever the method needs) and updates the tracker with it:
    on the Jacobian restricted to the sparse-training mask's trainable coordinates (the ST
    paper's Fig. 2 subspace; ``RunSpec.measure_masked``) or on all of it, on the shared leaves
    only (a sharing spec's copies are not compared). Nothing else of the state changes: the
    BatchNorm statistics are those the step then updates."""
    names = [t.name for t in problem.tasks]

    def probe(
        state: TrainState, batch: dict[str, jax.Array], masks: StepMasks | None = None
    ) -> mtl.conflict.ConflictState:
        masks = _masks_or_constants(problem, masks)
        targets = {n: batch[n] for n in names}
        enc_jac = _encoder_jacobian(problem, state, batch["image"], targets, masks)[1]
        measured = enc_jac if masks.measure is None else _mask_rows(enc_jac, masks.measure)
        return problem.tracker.update(state.conflict, shared_view(measured, problem.sharing))

    return probe


def _weights_first_grads(
    problem: Problem, state: TrainState, x, targets, masks: StepMasks, lambda_grad=None
):
    """ONE backward pass of ``sum_k w_k L_k``: the method's ``weigh`` runs on the losses (and
    ``d L_k / d z`` for a representation method) before the trunk's single backward pass and
    updates the method's own state (the first of the encoder chain's states)."""
    method = problem.method
    method_state = state.opt_state[0][0]
    known = {} if lambda_grad is None else {"lambda_grad": lambda_grad}

    def weigh(losses, rep_grads):
        inputs = {"rep_grads": rep_grads} if "rep_grads" in method.inputs else {}
        return method.weigh(method_state, losses, **inputs, **known)

    option = mtl.gradients.WeightedBackward(weigh, scale_heads=method.scales_heads)
    return _structured_grads(problem, state, x, targets, masks.sharing, representation=option)


def _sample_losses_fn(problem: Problem, state: TrainState) -> Callable:
    """``fn(params, x, targets) -> losses[T]`` for ONE sample (``x: [*input_shape]``, ``targets:
    {task: [...]}`` without the batch axis): the model on a batch of one, each trained task's
    loss on it (train mode; the model state is ``state``'s, which has no statistics here:
    :func:`check_objectives_with_model`). ``params``: ``{"encoder": ..., "heads": {task: ...}}``
    (the trained tasks' heads)."""
    model, head_states = problem.model, state.model_state["heads"]
    enc_state = state.model_state["encoder"]

    def fn(params, x, targets) -> jax.Array:
        z, _ = apply_module(model.encoder, params["encoder"], enc_state, x[None], True)
        losses = []
        for task in problem.tasks:
            pred, _ = apply_module(
                model.heads[task.name], params["heads"][task.name], head_states[task.name], z, True
            )
            losses.append(losses_lib.task_loss(task, pred, targets[task.name][None]))
        return jnp.stack(losses)

    return fn


def _instance_wise_grads(problem: Problem, state: TrainState, x, targets):
    """``(losses [T], encoder gradient, head gradients, per-task weight totals [T], weighting
    state)``: the instance-wise step (``config.train.objectives = "instances"``).

    The Gramian engine (``instance_wise=True``) runs the per-sample losses
    (:func:`_sample_losses_fn`) over the batch, forms the ``[B T, B T]`` Gram matrix of the
    (sample, task) objectives' gradients on ALL parameters, encoder and heads, without the
    Jacobian, weighs it with the method's weighting, and returns ``sum_{b,t} w_{bt} grad
    L_{bt}`` from one weighted backward pass: head t gets ``sum_b w_{bt} grad L_{bt}``.

    Why the heads are in G with the pair weights (not their own gradient as in the task path):
    in IWRM (Quinton & Rey 2024, Section 5) Jacobian descent runs on the whole parameter vector,
    and UPGrad's guarantee -- no objective's loss increases to first order, ``<d, g_bt> >= 0``
    -- holds for the update ``d`` of every parameter only if every parameter moves along the
    aggregated direction; a head's own unweighted gradient would also scale with B (a sum over
    the samples). With ``mean`` the whole update is the gradient of the mean of ``L_bt`` over
    samples and tasks (tests/test_instance_wise_runner.py). Departure from the task path: there
    the heads are task-specific and not in G.

    ``losses``: each task's mean over the batch of the per-sample losses (the batch loss for a
    loss that is a mean over samples). The weights are logged as their per-task totals
    ``sum_b w_{bt}`` (a B T vector per step would not fit a log record)."""
    inst = problem.instance_wise
    engine = autogram.engine_value_and_grads(_sample_losses_fn(problem, state), inst.gramian)
    params = {
        "encoder": state.params["encoder"],
        "heads": {t.name: state.params["heads"][t.name] for t in problem.tasks},
    }
    key = jax.random.fold_in(jax.random.key(inst.seed), state.step)
    (losses, aux), grads = engine(
        params, x, targets, weighting_state=state.opt_state[0][0], key=key
    )  # losses [B, T]; aux["weights"] [B T], order b T + t
    head_grads = {**jax.tree.map(jnp.zeros_like, state.params["heads"]), **grads["heads"]}
    num_tasks = len(problem.tasks)
    totals = jnp.sum(jnp.reshape(aux["weights"], (-1, num_tasks)), axis=0)
    return (
        jnp.mean(losses, axis=0),
        grads["encoder"],
        head_grads,
        totals,
        aux["weighting_state"],
    )


def _weighting_state_holder(weighting: mtl.weighting.Weighting, num_objectives: int):
    """The first transform of an instance-wise run's encoder chain: it only holds the
    weighting's state (sized for ``num_objectives``), which :func:`_instance_wise_grads` reads
    and the step replaces; its update is the identity."""
    return optax.GradientTransformation(
        lambda params: weighting.init(num_objectives),
        lambda updates, state, params=None: (updates, state),
    )


def instance_wise_option(
    spec: RunSpec, num_tasks: int, batch_size: int
) -> tuple[InstanceWise, mtl.weighting.Weighting]:
    """The :class:`InstanceWise` option of a run's method (a Gram-space weighting name with its
    hyper-parameters; ``seed`` becomes the key's seed) for ``batch_size x num_tasks``
    objectives, and the weighting."""
    kwargs = dict(spec.method_kwargs)
    seed = int(kwargs.pop("seed", spec.seed))
    kwargs.pop("granularity", None)  # "global" only (config.check_objectives)
    weighting = mtl.weighting.get_weighting(spec.method, **kwargs)
    gramian = autogram.GramianWeighting(weighting, instance_wise=True)
    return InstanceWise(gramian, batch_size * num_tasks, seed), weighting


def check_objectives_with_model(config: ml_collections.ConfigDict, data: Any, model: Any) -> None:
    """With ``config.train.objectives = "instances"``, the model must treat samples
    independently: no BatchNorm statistics (or any mutable state) in training mode, since the
    engine runs the model per sample.

    Raises:
      ValueError: naming the key, the model's state collections and the fixes.
    """
    if config_lib.objectives(config) != "instances":
        return
    state = init_shapes(model, tuple(data.tasks), data.input_shape)[1]
    parts = [state["encoder"], *state["heads"].values()]  # {collection: tree} each
    collections = sorted({k for part in parts for k, v in part.items() if jax.tree.leaves(v)})
    if collections:
        raise ValueError(
            f"config.train.objectives='instances' needs a model that treats every sample on its "
            f"own, but model {config.model.name!r} keeps state {collections} (BatchNorm in "
            "training mode mixes the samples of a batch, so a sample's loss is no objective of "
            "its own). Use a model without BatchNorm (e.g. --config.model.batch_norm=False where "
            "the model has that key, or model=mlp), or config.train.objectives='tasks'."
        )


def make_train_step(problem: Problem) -> Callable[..., tuple[TrainState, dict]]:
    """``(state, batch, masks=None) -> (state, outputs)``; outputs: losses, the last probe's
    incidence and mean cosine, weights. ``masks``: the run's :class:`StepMasks` (needed when
    ``problem.sharing`` has mask slots; without them the Problem's own masks are constants of
    the program).

    The step runs the method at its own cost: a weights-first method (``Problem.weights_first``:
    loss-only methods, ``<weighting>_ub``, ``mean``/``sum``) one backward pass of the weighted
    loss; every other method the encoder's K-row Jacobian; instance-wise objectives
    (``Problem.instance_wise``) the Gramian engine on the (sample, task) pairs, one update of
    encoder and heads (:func:`_instance_wise_grads`; ``outputs["weights"]``: the per-task totals
    of the pair weights). Conflicts are not measured here (:func:`make_conflict_probe`: still
    the task-level conflicts of the encoder)."""
    names = [t.name for t in problem.tasks]

    def step(
        state: TrainState, batch: dict[str, jax.Array], masks: StepMasks | None = None
    ) -> tuple[TrainState, dict]:
        masks = _masks_or_constants(problem, masks)
        targets = {n: batch[n] for n in names}
        method = problem.method
        enc_opt, head_opt = state.opt_state
        inputs = {}  # the method's inputs known before its gradients
        if "lambda_grad" in method.inputs:  # Auto-Lambda: the look-ahead's hypergradient
            inputs["lambda_grad"] = _lambda_grad(problem, state, batch["image"], targets, masks)
        weights = None
        if problem.instance_wise is not None:  # every (sample, task) pair an objective
            losses, enc_grad, head_grads, weights, weighting_state = _instance_wise_grads(
                problem, state, batch["image"], targets
            )
            enc_state, head_states = state.model_state["encoder"], state.model_state["heads"]
            enc_updates, rest = problem.encoder_rest_tx.update(
                enc_grad, tuple(enc_opt[1:]), state.params["encoder"]
            )
            enc_opt = (weighting_state, *rest)
        elif problem.weights_first:
            losses, enc_grad, head_grads, enc_state, head_states, method_state = (
                _weights_first_grads(problem, state, batch["image"], targets, masks, **inputs)
            )
            enc_updates, rest = problem.encoder_rest_tx.update(
                enc_grad, tuple(enc_opt[1:]), state.params["encoder"]
            )
            enc_opt = (method_state, *rest)
        else:
            losses, enc_jac, head_grads, enc_state, head_states, last = _encoder_jacobian(
                problem, state, batch["image"], targets, masks, paired=method.batches == 2
            )
            extra = {name: last for name in ("rep_grads", "paired_rows") if name in method.inputs}
            extra.update(inputs)
            enc_updates, enc_opt = problem.encoder_tx.update(
                enc_jac, enc_opt, state.params["encoder"], task_losses=losses, **extra
            )
        if problem.instance_wise is None:
            weights = mtl.aggregation.weights(enc_opt)
        if method.scales_heads and not problem.weights_first and problem.instance_wise is None:
            head_grads = _scale_head_grads(problem, head_grads, weights)
        head_updates, head_opt = problem.heads_tx.update(
            head_grads, head_opt, state.params["heads"]
        )
        params = {
            "encoder": optax.apply_updates(state.params["encoder"], enc_updates),
            "heads": optax.apply_updates(state.params["heads"], head_updates),
        }
        if method.post_step is not None:  # FAMO: the losses after the step, on the same batch
            new_losses = grads_fn_losses(
                problem, state._replace(params=params), batch["image"], targets, masks.sharing
            )
            enc_opt = method.post_step(enc_opt, new_losses)
        finite = jnp.all(jnp.isfinite(losses))
        first_nonfinite = jnp.where(
            (state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite
        )
        outputs = {
            "losses": losses,
            "incidence": state.conflict.last_incidence["global"],
            "mean_cos": state.conflict.last_mean_cos["global"],
            "weights": weights if weights is not None else jnp.zeros((0,)),
        }
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            model_state={"encoder": enc_state, "heads": dict(head_states)},
            opt_state=(enc_opt, head_opt),
            conflict=state.conflict,
            first_nonfinite=first_nonfinite,
        )
        return new_state, outputs

    return step


@dataclasses.dataclass
class ProbedStep:
    """The ``step_fn`` of :func:`experiments.loop.run_loop`: the method's jitted step, preceded
    every ``every`` steps by the jitted conflict probe on the same batch and parameters, the two
    timed apart (wall seconds per call, blocking on each result: compile calls included; the
    medians drop them).

    ``next_step`` is the state's step at the first call (a resumed run's restored step): the
    probe runs before steps 0, every, 2 every, ... wherever the run resumes."""

    step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    probe: Callable[[TrainState, dict], mtl.conflict.ConflictState]
    every: int
    next_step: int
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    probe_seconds: list[float] = dataclasses.field(default_factory=list)

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if self.next_step % self.every == 0:
            jax.block_until_ready(state)
            began = time.perf_counter()
            conflict = jax.block_until_ready(self.probe(state, batch))
            self.probe_seconds.append(time.perf_counter() - began)
            state = state._replace(conflict=conflict)
        began = time.perf_counter()
        state, outputs = self.step(state, batch)
        jax.block_until_ready(outputs)
        self.step_seconds.append(time.perf_counter() - began)
        self.next_step += 1
        return state, outputs

    def medians(self) -> dict[str, float]:
        """Median seconds of a step and of a probe (each program's first call, its compile,
        left out when there are more)."""
        median = lambda xs: float(np.median(xs[1:] if len(xs) > 1 else xs)) if xs else math.nan
        return {
            "seconds_per_step": median(self.step_seconds),
            "probe_seconds": median(self.probe_seconds),
            "probe_every": self.every,
        }


def make_predict(problem: Problem, train: bool = False) -> Callable[..., dict[str, jax.Array]]:
    """``(params, model_state, x, masks=None) -> {task: prediction}`` in evaluation mode
    (``masks`` as in :func:`make_train_step`); ``train=True``: in train mode, BatchNorm with the
    batch's own statistics (per stream), the running statistics unused (``experiments.bn_check``).
    """
    model = problem.model
    stream = {t.name: i for i, t in enumerate(problem.streams)}

    def predict(params, model_state, x, masks: StepMasks | None = None):
        sharing_masks = _masks_or_constants(problem, masks).sharing
        forward = _encoder_forward(problem, model_state["encoder"], train, sharing_masks)
        z, _ = forward(params["encoder"], x)
        out = {}
        for t in problem.tasks:
            z_t = (
                z if problem.sharing is None else jax.tree.map(lambda a, i=stream[t.name]: a[i], z)
            )
            out[t.name] = apply_module(
                model.heads[t.name],
                params["heads"][t.name],
                model_state["heads"][t.name],
                z_t,
                train,
            )[0]
        return out

    return predict


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics: recomputed on training batches (precise BN).


def has_model_state(model_state: PyTree) -> bool:
    """Whether the model has non-parameter state (BatchNorm statistics) to recompute."""
    return bool(jax.tree.leaves(model_state))


def make_statistics_update(problem: Problem, params: PyTree, sharing_masks=None) -> Callable:
    """``(model_state, x) -> model_state``: one train-mode forward of the encoder and the trained
    tasks' heads, returning the updated running statistics (per stream for a per-task encoder:
    each stream's own rows) -- the ``update_fn`` of
    :func:`mtl_jax.batchnorm.recompute_statistics`. ``x: [B, *input_shape]``."""
    model = problem.model
    stream = {t.name: i for i, t in enumerate(problem.streams)}

    def update(model_state: PyTree, x: jax.Array) -> PyTree:
        forward = _encoder_forward(problem, model_state["encoder"], True, sharing_masks)
        z, enc_state = forward(params["encoder"], x)
        heads = dict(model_state["heads"])
        for t in problem.tasks:
            if not jax.tree.leaves(heads[t.name]):
                continue
            z_t = (
                z if problem.sharing is None else jax.tree.map(lambda a, i=stream[t.name]: a[i], z)
            )
            _, heads[t.name] = apply_module(
                model.heads[t.name], params["heads"][t.name], heads[t.name], z_t, True
            )
        return {"encoder": enc_state, "heads": heads}

    return update


def recompute_bn(
    problem: Problem, params: PyTree, model_state: PyTree, images, sharing_masks=None
) -> PyTree:
    """``model_state`` with its BatchNorm statistics recomputed on ``images`` (an iterable of
    ``x: [B, ...]`` training batches) by :func:`mtl_jax.batchnorm.recompute_statistics`, per task
    stream for a per-task encoder; a model without state is returned as it is."""
    if not has_model_state(model_state):
        return model_state
    from mtl_jax import batchnorm as batchnorm_lib

    update = jax.jit(make_statistics_update(problem, params, sharing_masks))
    return batchnorm_lib.recompute_statistics(update, model_state, images)


def recompute_bn_batches(config: ml_collections.ConfigDict) -> int:
    """``config.eval.recompute_bn_batches`` (0 = off; 0 for a config without an ``eval``
    section, e.g. one written before the option existed)."""
    section = config.get("eval")
    return int(section.get("recompute_bn_batches", 0)) if section is not None else 0


def training_images(data: Any, batch_size: int, seed: int, first_epoch: int, count: int):
    """``count`` training batches' images (shuffled with ``seed``, from epoch ``first_epoch`` on,
    as many epochs as needed): the batches BatchNorm statistics are recomputed on."""
    if data_lib.num_batches(data.train, batch_size, drop_remainder=True) < 1:
        raise ValueError(
            f"The training split has fewer than batch_size={batch_size} examples: no batch to "
            "recompute BatchNorm statistics on; lower train.batch_size."
        )
    epoch, left = first_epoch, count
    while left > 0:
        for batch in data_lib.batches(data.train, batch_size, seed=seed, epoch=epoch, shuffle=True):
            if left == 0:
                return
            left -= 1
            yield batch["image"]
        epoch += 1


def objectives_note(config: ml_collections.ConfigDict, num_tasks: int) -> str:
    """The report's line saying the runs were instance-wise (empty for ``"tasks"``)."""
    if config_lib.objectives(config) != "instances":
        return ""
    batch = int(config.train.batch_size)
    return (
        f"Instance-wise objectives (`train.objectives = 'instances'`): every (sample, task) pair "
        f"of a batch is an objective, {batch} x {num_tasks} = {batch * num_tasks} per step "
        f"({batch} for a single-task run), weighed in Gram space by the Gramian engine; the "
        "weights plotted are each task's total weight. p% and mean cos are the probe's "
        "task-level conflicts on the encoder, as for task objectives."
    )


def bn_recompute_note(config: ml_collections.ConfigDict) -> str:
    """The report's line saying how evaluation used BatchNorm statistics (empty when off)."""
    n = recompute_bn_batches(config)
    if n <= 0:
        return ""
    return (
        f"BatchNorm statistics recomputed on {n} training batches per stream before the final "
        "evaluation (`eval.recompute_bn_batches`; models without BatchNorm unchanged)."
    )


# ---------------------------------------------------------------------------------------------
# Building a run.


def build_problem(
    config: ml_collections.ConfigDict,
    tasks,
    streams,
    model: Any,
    spec: RunSpec,
    steps_per_epoch: int,
    *,
    mask: PyTree | None = None,
    sharing: PyTree | None = None,
    state_sharing: PyTree | None = None,
    layout: parallel_lib.Layout | None = None,
) -> Problem:
    """The transforms for the encoder and heads and the conflict tracker of one run; ``layout``:
    the mesh the run's step is laid out on (:mod:`experiments.parallel`)."""
    num_tasks = len(tasks)
    method = get_method(spec.method, spec.method_kwargs, num_tasks, steps_per_epoch, spec.seed)
    aggregator = method.transform
    instance_wise = None
    if config_lib.objectives(config) == "instances":
        if sharing is not None or mask is not None:
            raise ValueError(
                f"Run {spec.run_id}: config.train.objectives='instances' takes one shared "
                "encoder without masks or per-task copies; use config.train.objectives='tasks'."
            )
        instance_wise, weighting = instance_wise_option(
            spec, num_tasks, int(config.train.batch_size)
        )
        # the chain's first state is the weighting's (K = B T objectives), not the aggregator's
        aggregator = _weighting_state_holder(weighting, instance_wise.num_objectives)
    if method.cost == "representation" and sharing is not None:
        raise ValueError(
            f"{spec.method}: representation-gradient methods need one shared representation; a "
            "sharing spec gives every task its own stream."
        )
    if sharing is not None:  # copied leaves (Recon's copies, modulation) get their own gradient
        aggregator = mtl.aggregation.shared_rows(
            aggregator, sharing_lib.spec_task_specific(sharing)
        )
    masks = () if mask is None else (sparse_lib.apply_mask(mask),)
    opt = optim.optimizer(config.train, steps_per_epoch)
    heads_tx = opt
    granularity = {"global": "global", "module": mtl.gramian.by_module, "leaf": "leaf"}[
        config.conflict.granularity
    ]
    after = (*masks, opt, *masks)  # the chain after the method's transform
    tracker = mtl.ConflictTracker(
        num_tasks=num_tasks,
        granularity=granularity,
        severity=float(config.conflict.severity),
        threshold=float(config.conflict.threshold),
    )
    return Problem(
        tasks=tuple(tasks),
        streams=tuple(streams),
        model=model,
        # Sparse training: theta <- theta - lr * M * d -- the mask on the combined update (after
        # the aggregator, so the gradient manipulation sees the full task gradients, as in the ST
        # paper), and again after the optimizer so frozen weights stay bit-identical.
        encoder_tx=optax.chain(aggregator, *after),
        encoder_rest_tx=optax.chain(*after),
        allow_weights_first=bool(config.train.weights_first),
        lookahead_lr=float(config.train.lr),
        conflict_every=probe_period(
            int(config.conflict.every if spec.conflict_every is None else spec.conflict_every),
            steps_per_epoch * int(spec.epochs if spec.epochs is not None else config.train.epochs),
        ),
        heads_tx=heads_tx,
        tracker=tracker,
        method=method,
        task_map=config.train.task_map,
        sharing=sharing,
        state_sharing=state_sharing,
        measure_mask=mask if spec.measure_masked else None,
        layout=layout,
        instance_wise=instance_wise,
    )


#: Probes per run of ``conflict.every = 0``: p% is a share of (step, pair) events, so its
#: standard error over n probed steps is at most 50 / sqrt(n) points (p = 50%, independent
#: steps); 2,500 probes keep it at or under 1 point.
PROBES_PER_RUN = 2500


def probe_period(every: int, total_steps: int) -> int:
    """The conflict probe's period: ``every`` if >= 1, else the largest period that still
    probes :data:`PROBES_PER_RUN` steps of a ``total_steps`` run (1 for runs under 5,000
    steps: every embedded CPU config measures every step)."""
    if every >= 1:
        return every
    return max(1, total_steps // PROBES_PER_RUN)


def get_method(
    method: str,
    kwargs: Mapping[str, Any],
    num_tasks: int,
    steps_per_epoch: int = 1,
    seed: int | None = None,
) -> mtl.Method:
    """The method of a config's method name from the library's catalogue
    (:func:`mtl_jax.get_method`), with its hyper-parameters ``kwargs`` (method string and
    ``method_kwargs``); ``seed`` (the run's seed) seeds the method's PRNG key unless ``kwargs``
    sets ``seed``: every seed of a study draws its own sequence, and a rerun of one seed the
    same one."""
    kwargs = dict(kwargs)
    if "seed" in kwargs:  # an explicit seed is a hyper-parameter (checked like the others)
        method = f"{method}:seed={int(kwargs.pop('seed'))}"
    return mtl.get_method(
        method, num_tasks=num_tasks, seed=seed, steps_per_epoch=steps_per_epoch, **kwargs
    )


def init_state(problem: Problem, params: PyTree, model_state: PyTree) -> TrainState:
    """The state at step 0 from initial parameters."""

    def make(params, model_state) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=(
                problem.encoder_tx.init(params["encoder"]),
                problem.heads_tx.init(params["heads"]),
            ),
            conflict=problem.tracker.init(shared_view(params["encoder"], problem.sharing)),
            first_nonfinite=jnp.full((), -1, jnp.int32),
        )

    return jax.jit(make)(params, model_state)


def train_state_shardings(state: TrainState, layout: parallel_lib.Layout) -> TrainState:
    """One ``NamedSharding`` per leaf of ``state``: parameters and the optimizer's moments
    replicated or FSDP-sharded (``layout.fsdp``); the aggregator's and mask's states, the
    conflict counters, BatchNorm statistics and the counters replicated."""
    replicated = functools.partial(parallel_lib.replicated_shardings, layout=layout)
    return TrainState(
        step=layout.replicated,
        params=parallel_lib.param_shardings(state.params, layout),
        model_state=replicated(state.model_state),
        opt_state=parallel_lib.optimizer_state_shardings(state.opt_state, layout),
        conflict=replicated(state.conflict),
        first_nonfinite=layout.replicated,
    )


@functools.cache
def _compiled_init(model, streams: tuple, input_shape: tuple) -> Callable:
    return jax.jit(lambda key: init_params(model, streams, input_shape, key))


def initial_params(model, streams, input_shape, seed: int) -> tuple[dict, dict]:
    """The seed's initial parameters.

    Drawn with JAX's ``rbg`` PRNG: on CPU, compiling a conv net's initialisers with the default
    (partitionable threefry) PRNG takes ~4x longer. The parameters are a deterministic function of
    the seed on a given backend.
    """
    init = _compiled_init(model, tuple(streams), tuple(input_shape))
    return init(jax.random.key(seed, impl="rbg"))


# ---------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_split(
    predict_fn: Callable,
    tasks: Sequence[TaskSpec],
    state,
    source,
    batch_size: int,
    layout: parallel_lib.Layout | None = None,
) -> dict[str, dict]:
    """Task metrics over a whole split (``experiments.metrics`` accumulators) of any model whose
    ``predict_fn(params, model_state, x)`` returns one prediction per task; ``state`` has
    ``params`` and ``model_state``; the batches are laid out on ``layout`` (None: one device)."""
    accumulators = {t.name: metrics_lib.make_task_metric(t) for t in tasks}
    for batch in data_lib.batches(
        source, batch_size, seed=0, epoch=0, shuffle=False, drop_remainder=False
    ):
        x = parallel_lib.shard_batch(batch["image"], layout)
        preds = predict_fn(state.params, state.model_state, x)
        for t in tasks:
            accumulators[t.name].update(np.asarray(preds[t.name]), np.asarray(batch[t.name]))
    return {name: acc.result() for name, acc in accumulators.items()}


def evaluate(
    problem: Problem, predict_fn, state: TrainState, source, batch_size: int
) -> dict[str, dict]:
    """Task metrics over a whole split, laid out on the problem's mesh."""
    return evaluate_split(predict_fn, problem.tasks, state, source, batch_size, problem.layout)


# ---------------------------------------------------------------------------------------------
# Final parameters (a run's artifact).

FINAL = "final"  # the artifact name of a finished run's parameters and model state


def save_final_params(artifacts: Artifacts, run_id: str, state: TrainState) -> None:
    """The finished run's parameters and BatchNorm statistics (atomic), for ``init_from``."""
    artifacts.save_arrays(run_id, FINAL, {"params": state.params, "model_state": state.model_state})


def load_final_params(artifacts: Artifacts, run_id: str) -> tuple[dict, dict]:
    """``(params, model_state)`` of a finished run (phase) of the work dir."""
    restored = artifacts.load_arrays(run_id, FINAL)
    return restored["params"], restored["model_state"]


# ---------------------------------------------------------------------------------------------
# The run: the standard step in the generic loop (experiments.loop).


def _check_finite(state: TrainState, problem: Problem, outputs: dict, has_checkpoint: bool) -> None:
    first = int(state.first_nonfinite)
    if first >= 0:
        losses = np.asarray(outputs["losses"])
        bad = [t.name for t, v in zip(problem.tasks, losses, strict=True) if not np.isfinite(v)]
        where = (
            "its last checkpoint holds the state before the failure"
            if has_checkpoint
            else "no checkpoint was written"
        )
        raise NonFiniteLossError(
            f"Non-finite task loss at step {first} (now step {int(state.step)}; tasks with "
            f"non-finite loss at the last step: {bad or 'none'}). The run stops; {where}. "
            "Lower the learning rate or check the data."
        )


def _train_record(spec: RunSpec, problem: Problem, step: int, epoch: int, outputs: dict) -> dict:
    losses = np.asarray(outputs["losses"])
    weights = outputs["weights"]
    if isinstance(weights, dict):
        weights = {g: np.asarray(w).tolist() for g, w in weights.items()}
    else:
        weights = np.asarray(weights).tolist()
    return {
        "kind": "train",
        "run": spec.label,
        "seed": spec.seed,
        "step": step,
        "epoch": epoch,
        "loss": {t.name: float(v) for t, v in zip(problem.tasks, losses, strict=True)},
        "incidence": float(outputs["incidence"]),
        "mean_cos": float(outputs["mean_cos"]),
        "weights": weights,
    }


def _conflict_record(spec: RunSpec, state: TrainState, epoch: int, wall: float) -> dict:
    """The cumulative conflict statistics at an epoch end: every field of the tracker's state
    except the last step's values (``{group: value}`` dicts and arrays as lists)."""
    c = state.conflict
    fields = {
        k: v
        for k, v in c._asdict().items()
        if k != "steps" and not k.startswith("last_") and isinstance(v, dict)
    }
    return {
        "kind": "conflict",
        "run": spec.label,
        "seed": spec.seed,
        "step": int(state.step),
        "epoch": epoch,
        "steps": int(c.steps),
        **{k: {g: np.asarray(x).tolist() for g, x in v.items()} for k, v in fields.items()},
        "wall_seconds": wall,
    }


def count_params(tree: PyTree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _frozen_unchanged(mask: PyTree, before: PyTree, after: PyTree) -> bool:
    """Whether every coordinate outside ``mask`` is bit-identical before and after training."""
    same = jax.tree.map(
        lambda m, a, b: bool(np.all((np.asarray(a) == np.asarray(b)) | np.asarray(m, bool))),
        mask,
        before,
        after,
    )
    return all(jax.tree.leaves(same))


def run_tasks(data: Any, spec: RunSpec) -> tuple[tuple[TaskSpec, ...], tuple[TaskSpec, ...]]:
    """``(trained tasks, all task streams)`` of a run."""
    streams = tuple(data.tasks)
    tasks = streams if spec.tasks is None else tuple(t for t in streams if t.name in spec.tasks)
    if spec.tasks is not None and len(tasks) != len(spec.tasks):
        raise ValueError(
            f"Run {spec.run_id}: unknown task(s) in {spec.tasks}; the data set has {[t.name for t in streams]}."
        )
    return tasks, streams


def _sharing_info(sharing_masks: PyTree | None, mask: PyTree | None) -> dict:
    """``sharing_masks``: the masks split off the sharing spec (``split_sharing_masks``)."""
    info: dict[str, Any] = {}
    if sharing_masks is not None:
        sizes = lass_lib.subnetwork_sizes(sharing_masks)  # LaSS: the per-task sub-networks
        info["subnetwork"] = {
            "kept": [int(v) for v in sizes["kept"]],
            "total": sizes["total"],
            "fraction": [float(v) for v in sizes["fraction"]],
            "shared_by_all": sizes["shared_by_all"],
            "union": sizes["union"],
        }
    if mask is not None:
        stats = sparse_lib.mask_stats(mask)
        info["trainable_encoder_params"] = int(stats["trainable"])
        info["trainable_encoder_fraction"] = float(stats["fraction"])
    return info


def branch_encoder(model, streams, input_shape, spec: RunSpec, params: dict, model_state: dict):
    """Recon's re-architecture of the run's initial encoder: ``spec.branch_fn()``'s layers get
    per-task copies (parameters and BatchNorm statistics); every other BatchNorm layer gets
    per-task statistics too (:func:`per_task_state`; identical rows at the start).

    Returns ``(params, model_state, param spec, state spec, info)``; the state spec is COPIED at
    every leaf; ``info`` names the branched layers and the parameter increase (absolute and % of
    the un-branched encoder; statistics are not parameters)."""
    layers = list(spec.branch_fn())
    num = len(streams)
    variables = {"params": params["encoder"], **model_state["encoder"]}
    fresh = None
    if spec.branch_init == "fresh":  # copy t from the model initialised with another key
        fresh = []
        for t in range(num):
            p, s = initial_params(model, streams, input_shape, 1_000_003 * (spec.seed + 1) + t)
            fresh.append({"params": p["encoder"], **s["encoder"]})
    branched, full_spec = recon_lib.branch(
        variables, layers, num, init=spec.branch_init, fresh_variables=fresh
    )
    increase = recon_lib.parameter_increase(variables["params"], branched["params"])
    params = {**params, "encoder": branched["params"]}
    enc_state, state_spec = per_task_state(
        {k: v for k, v in branched.items() if k != "params"}, model_state["encoder"], num
    )
    model_state = {**model_state, "encoder": enc_state}
    info = {"branched_layers": layers, "parameter_increase": increase}
    return params, model_state, full_spec["params"], state_spec, info


def train_run(
    config: ml_collections.ConfigDict,
    data: Any,
    model: Any,
    spec: RunSpec,
    workdir: str,
    log: JsonlLog,
    *,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Trains one run (the phase ``spec.run_id``), resuming from its latest checkpoint; returns
    the summary record (:func:`experiments.lifecycle.run_lifecycle`: a finished run -- one with a
    summary record -- is returned as is).

    The run's checkpoints live in its phase directory; when it finishes it saves its final
    parameters and model state as the artifact ``final`` (and its sparse-training mask as
    ``mask``), from which later phases start (``init_from``). ``stop_after_steps`` ends the
    process-local loop early (as a kill would) -- for tests.

    The run uses the mesh of ``config.parallel`` (:mod:`experiments.parallel`; by default every
    visible device): the batch is sharded, the parameters and optimizer state replicated or
    FSDP-sharded, everything else replicated; its ``start`` record names the mesh.
    """
    artifacts = Artifacts(workdir)
    key = run_key(spec)
    return lifecycle.run_lifecycle(
        key,
        log,
        artifacts,
        lambda: _standard_run(config, data, model, spec, key, artifacts, log, progress),
        stop_after_steps=stop_after_steps,
    )


def run_key(spec: RunSpec) -> lifecycle.RunKey:
    """The run's records (``run``, ``seed``) and phase directory."""
    return lifecycle.RunKey(spec.label, spec.seed, spec.run_id)


def _standard_run(
    config: ml_collections.ConfigDict,
    data: Any,
    model: Any,
    spec: RunSpec,
    key: lifecycle.RunKey,
    artifacts: Artifacts,
    log: JsonlLog,
    progress: bool,
) -> lifecycle.RunParts:
    """The standard run's parts of the lifecycle: its initial parameters (the seed's or a
    finished run's; mask, sharing spec, Recon branches), the jitted step with the conflict probe
    beside it (:class:`ProbedStep`), its records and its summary."""
    model = spec.model if spec.model is not None else model
    tasks, streams = run_tasks(data, spec)
    batch_size = int(config.train.batch_size)
    layout = parallel_lib.layout_from_config(config.get("parallel"))
    parallel_lib.check_batch_size(batch_size, layout.num_devices)
    progress = progress and parallel_lib.is_primary()
    steps_per_epoch = data_lib.num_batches(data.train, batch_size, drop_remainder=True)
    epochs = int(spec.epochs if spec.epochs is not None else config.train.epochs)
    total_steps = epochs * steps_per_epoch

    # Initial parameters: the seed's, or a finished run's; then the mask and the sharing spec.
    if spec.init_from is None:
        params, model_state = initial_params(model, streams, data.input_shape, spec.seed)
    else:
        # on the host: the artifact may carry the sharding of the run that saved it
        params, model_state = parallel_lib.to_host(load_final_params(artifacts, spec.init_from))
    mask = None if spec.encoder_mask_fn is None else spec.encoder_mask_fn(params["encoder"])
    sharing = None if spec.sharing_fn is None else spec.sharing_fn(params["encoder"])
    state_sharing, branch_info = None, {}
    if sharing is not None:
        if spec.init_from is None:
            params["encoder"] = sharing_lib.copy_per_task(params["encoder"], sharing, len(streams))
        # per-task statistics from the start: the checkpointed state's structure is fixed here
        template = init_shapes(model, streams, data.input_shape)[1]["encoder"]
        model_state["encoder"], state_sharing = per_task_state(
            model_state["encoder"], template, len(streams)
        )
    if spec.branch_fn is not None:
        if sharing is not None or spec.init_from is not None:
            raise ValueError(f"Run {spec.run_id}: branch_fn excludes sharing_fn and init_from.")
        params, model_state, sharing, state_sharing, branch_info = branch_encoder(
            model, streams, data.input_shape, spec, params, model_state
        )
    initial_encoder = params["encoder"]
    # LaSS's masks as arrays (step arguments), not constants of the compiled step
    sharing, sharing_masks = split_sharing_masks(sharing)

    problem = build_problem(
        config,
        tasks,
        streams,
        model,
        spec,
        steps_per_epoch,
        mask=mask,
        sharing=sharing,
        state_sharing=state_sharing,
        layout=layout,
    )
    template = init_state(problem, params, model_state)
    shardings = train_state_shardings(template, layout)
    template = parallel_lib.place(template, shardings)  # restored into the same layout
    info = {**dict(spec.info), **_sharing_info(sharing_masks, mask), **branch_info}
    if problem.instance_wise is not None:  # start and summary records say so
        info["objectives"] = {
            "mode": "instances",
            "count": problem.instance_wise.num_objectives,
            "samples": batch_size,
            "tasks": len(tasks),
        }
    bn_batches = recompute_bn_batches(config) if has_model_state(model_state) else 0
    if bn_batches:
        info["recompute_bn_batches"] = bn_batches
    if mask is not None:
        artifacts.save_arrays(
            spec.run_id,
            "mask",
            parallel_lib.place(mask, parallel_lib.replicated_shardings(mask, layout)),
        )

    step_masks = StepMasks(sharing_masks, problem.measure_mask)
    mask_shardings = step_mask_shardings(step_masks, template.params["encoder"], layout)
    step_masks = parallel_lib.place(step_masks, mask_shardings)
    jitted_predict = jax.jit(make_predict(problem), out_shardings=layout.replicated)

    def predict_fn(params, model_state, x):
        return jitted_predict(params, model_state, x, step_masks)

    jitted_step = jax.jit(  # the masks are a positional argument: jit's in_shardings take no kwargs
        make_train_step(problem),
        donate_argnums=0,
        in_shardings=(shardings, layout.batch, mask_shardings),
        out_shardings=(shardings, layout.replicated),
    )
    jitted_probe = jax.jit(
        make_conflict_probe(problem),
        in_shardings=(shardings, layout.batch, mask_shardings),
        out_shardings=shardings.conflict,
    )
    probed_step = ProbedStep(
        step=lambda state, batch: jitted_step(state, batch, step_masks),
        probe=lambda state, batch: jitted_probe(state, batch, step_masks),
        every=problem.conflict_every,
        next_step=0,  # the restored step: on_restore
    )

    columns = ["image", *[t.name for t in tasks]]
    eval_batch_size = int(config.train.eval_batch_size)

    def batches(epoch: int, start_batch: int):
        for batch in data_lib.batches(
            data.train,
            batch_size,
            seed=spec.seed,
            epoch=epoch,
            shuffle=True,
            start_batch=start_batch,
        ):
            yield parallel_lib.shard_batch({k: batch[k] for k in columns}, layout)

    def start_fields(state: TrainState) -> dict:
        return {
            "method": spec.method,
            "method_kwargs": dict(spec.method_kwargs),
            "tasks": [t.name for t in tasks],
            "init_from": spec.init_from,
            "encoder_params": count_params(state.params["encoder"]),
            "head_params": count_params(state.params["heads"]),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "mesh": parallel_lib.mesh_record(
                layout, parallel_lib.count_sharded((shardings.params, shardings.opt_state))
            ),
            "info": info,
        }

    def on_restore(step: int) -> None:
        probed_step.next_step = step

    def check(state: TrainState, outputs: dict, has_checkpoint: bool) -> None:
        _check_finite(state, problem, outputs, has_checkpoint)

    def on_log(state: TrainState, step: int, epoch: int, outputs: dict) -> None:
        log.write(_train_record(spec, problem, step, epoch, outputs))

    def on_epoch_end(state: TrainState, epoch: int, wall: float) -> None:
        log.write(_conflict_record(spec, state, epoch + 1, wall))

    def evaluate_test(state: TrainState) -> dict:
        return evaluate(problem, predict_fn, state, data.test, eval_batch_size)

    def finalize(state: TrainState) -> TrainState:
        """Precise BN (``eval.recompute_bn_batches``) before the final evaluation and artifact."""
        if not bn_batches:
            return state
        images = (
            parallel_lib.shard_batch(x, layout)
            for x in training_images(data, batch_size, spec.seed, 0, bn_batches)
        )
        model_state = recompute_bn(
            problem, state.params, state.model_state, images, step_masks.sharing
        )
        state = state._replace(model_state=model_state)
        metrics = evaluate_test(state)
        log.write(
            lifecycle.eval_record(
                key, total_steps, epochs, metrics, recompute_bn_batches=bn_batches
            )
        )
        return state

    def on_finish(finish: lifecycle.Finish) -> dict:
        state, tracker = finish.state, problem.tracker
        summary_info = dict(info)
        if mask is not None:
            summary_info["frozen_unchanged"] = _frozen_unchanged(
                mask, initial_encoder, parallel_lib.to_host(state.params["encoder"])
            )
        epoch_records = finish.records("conflict")
        return lifecycle.summary_record(
            finish,
            method=spec.method,
            tasks=[t.name for t in tasks],
            incidence_all={g: float(v) for g, v in tracker.mean_incidence(state.conflict).items()},
            incidence_last_half=_last_half_incidence(epoch_records, tracker.num_pairs, epochs),
            s_scores=tracker.s_scores(state.conflict),
            encoder_params=count_params(state.params["encoder"]),
            head_params=count_params(state.params["heads"]),
            info=summary_info,
        )

    return lifecycle.RunParts(
        step_fn=probed_step,
        template=template,
        batches=batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        on_finish=on_finish,
        loop=lifecycle.loop_settings(config.train, progress=progress, desc=spec.run_id),
        start_fields=start_fields,
        on_log=on_log,
        check=check,
        on_epoch_end=on_epoch_end,
        evaluate=evaluate_test,
        eval_every_epochs=int(config.train.eval_every_epochs),
        on_restore=on_restore,
        finalize=finalize,
        timer=probed_step,
    )


def _last_half_incidence(
    epoch_records: list[dict], num_pairs: int, epochs: int
) -> dict[str, float]:
    """Mean p% over the last half of the epochs (the sparse-training paper's second column),
    from the cumulative conflict counts logged at every epoch end."""
    by_epoch = {r["epoch"]: r for r in epoch_records}
    if not by_epoch or num_pairs == 0:
        return {}
    end = by_epoch[max(by_epoch)]
    half = by_epoch.get(epochs // 2)
    base_steps = half["steps"] if half else 0
    out = {}
    for group, total in end["conflicts"].items():
        base = half["conflicts"][group] if half else 0
        steps = end["steps"] - base_steps
        out[group] = 100.0 * (total - base) / (steps * num_pairs) if steps > 0 else math.nan
    return out
