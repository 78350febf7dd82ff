"""Multi-task models for the experiments: a shared encoder and a dict of per-task heads.

``make_model(config, tasks, input_shape)`` builds a :class:`MultiTaskModel` from an
``ml_collections.ConfigDict`` whose ``name`` is one of :data:`MODELS`; every other key is one of
that model's hyper-parameters (``default_model_config(name)`` lists them with their defaults)::

    config = default_model_config("resnet18")          # name="resnet18", stem="imagenet", ...
    model = make_model(config, tasks, input_shape=(36, 36, 1))
    variables = model.init(jax.random.PRNGKey(0), (36, 36, 1))
    params, state = model.split(variables)

================  ==========================================================  ======================
name              architecture (source)                                       task kinds
================  ==========================================================  ======================
``mlp``           flatten -> shared MLP -> per-task MLP heads (CPU default)   classification
``lenet``         Sener & Koltun's MultiLeNet (Multi-MNIST)                   classification
``resnet18``      Recon's ResNet-18 + fc 512->100 + ReLU, heads 100->10       classification
``small_cnn``     small BatchNorm CNN (plant_leaves)                          classification
``small_resnet``  residual BN CNN, 5 named blocks, 19 modules (CPU ResNet)  classification
``segnet``        MTAN's SegNet encoder-decoder, per-pixel heads (NYUv2)      segmentation, depth,
                                                                              normals
``mmoe``          MMoE: shared MLP experts, per-task softmax gate + tower     classification
``cgc``           CGC: shared + per-task experts, per-task gates              classification
``ple``           PLE: stacked CGC levels with shared gates                   classification
``dselect_k``     DSelect-k: k-sparse binary-code expert selection per task   classification
``cross_stitch``  K CNN columns mixed by learned K x K cross-stitch units     classification
``mtan``          MTAN: shared CNN + per-task attention modules and towers    classification
``ltb``           Learning to Branch: Gumbel-softmax parent choice per node   classification
================  ==========================================================  ======================

Expert-and-gate models (``mmoe``, ``cgc``, ``ple``, ``dselect_k``): the encoder's output ``z`` is
a dict holding the shared experts' outputs and the flattened input the gates read; each task's
gate (and its own experts) sits in its head, so those leaves get only their task's gradient.
``cross_stitch``'s columns all receive every task's gradient through the units (the encoder, ``z:
[B, K, D]``, head k reads column k); ``mtan``'s attention modules are in the heads, reading every
stage of the shared backbone (``z``: the stages' features); ``ltb``'s branching layers are the
encoder and each task's last node its head. MTAN and LTB heads carry state (BatchNorm statistics,
LTB's step counter), which Recon's per-task branching does not take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from experiments.models import (
    cross_stitch,
    dselect_k,
    lenet,
    ltb,
    mlp,
    mmoe,
    mtan,
    ple,
    resnet,
    segnet,
    small_cnn,
    small_resnet,
)
from experiments.models.base import ClassifierHead, DenseHead, MultiTaskModel
from experiments.tasks import TaskSpec

__all__ = [
    "MODELS",
    "ClassifierHead",
    "DenseHead",
    "ModelEntry",
    "MultiTaskModel",
    "default_model_config",
    "make_model",
]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered model: its hyper-parameters with defaults, the task kinds it serves, a builder."""

    defaults: Mapping[str, Any]
    task_kinds: tuple[str, ...]
    build: Callable[
        [ml_collections.ConfigDict, Sequence[TaskSpec], tuple[int, ...]], MultiTaskModel
    ]
    description: str


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(mlp.DEFAULTS, mlp.TASK_KINDS, mlp.build, "shared MLP trunk + MLP heads"),
    "lenet": ModelEntry(lenet.DEFAULTS, lenet.TASK_KINDS, lenet.build, "MultiLeNet (Multi-MNIST)"),
    "resnet18": ModelEntry(
        resnet.DEFAULTS, resnet.TASK_KINDS, resnet.build, "Recon's ResNet-18 (Multi-Fashion+MNIST)"
    ),
    "small_cnn": ModelEntry(
        small_cnn.DEFAULTS, small_cnn.TASK_KINDS, small_cnn.build, "small BN CNN (plant_leaves)"
    ),
    "small_resnet": ModelEntry(
        small_resnet.DEFAULTS,
        small_resnet.TASK_KINDS,
        small_resnet.build,
        "small residual BN CNN, 5 named blocks (CPU stand-in for ResNet-18)",
    ),
    "segnet": ModelEntry(
        segnet.DEFAULTS, segnet.TASK_KINDS, segnet.build, "MTAN's SegNet (dense tasks)"
    ),
    "mmoe": ModelEntry(
        mmoe.DEFAULTS,
        mmoe.TASK_KINDS,
        mmoe.build,
        "MMoE: shared experts, per-task softmax gates (Ma et al. 2018)",
    ),
    "cgc": ModelEntry(
        ple.CGC_DEFAULTS,
        ple.TASK_KINDS,
        ple.build_cgc,
        "CGC: shared + per-task experts, per-task gates (Tang et al. 2020)",
    ),
    "ple": ModelEntry(
        ple.DEFAULTS,
        ple.TASK_KINDS,
        ple.build,
        "PLE: stacked CGC levels with shared gates (Tang et al. 2020)",
    ),
    "dselect_k": ModelEntry(
        dselect_k.DEFAULTS,
        dselect_k.TASK_KINDS,
        dselect_k.build,
        "DSelect-k: k-sparse expert selection (Hazimeh et al. 2021)",
    ),
    "cross_stitch": ModelEntry(
        cross_stitch.DEFAULTS,
        cross_stitch.TASK_KINDS,
        cross_stitch.build,
        "Cross-stitch: K CNN columns mixed by learned K x K units (Misra et al. 2016)",
    ),
    "mtan": ModelEntry(
        mtan.DEFAULTS,
        mtan.TASK_KINDS,
        mtan.build,
        "MTAN: shared CNN + per-task attention modules and towers (Liu et al. 2019)",
    ),
    "ltb": ModelEntry(
        ltb.DEFAULTS,
        ltb.TASK_KINDS,
        ltb.build,
        "Learning to Branch: Gumbel-softmax parent choice per node (Guo et al. 2020)",
    ),
}

#: The models that serve classification, for error messages.
CLASSIFIERS = tuple(n for n, e in MODELS.items() if "classification" in e.task_kinds)


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid models: {sorted(MODELS)}.")
    return MODELS[name]


def default_model_config(name: str) -> ml_collections.ConfigDict:
    """``name=...`` plus every hyper-parameter the model accepts, at its default."""
    return ml_collections.ConfigDict({"name": name, **_entry(name).defaults})


def make_model(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    tasks: Sequence[TaskSpec],
    input_shape: Sequence[int],
) -> MultiTaskModel:
    """Builds the model named by ``config.name`` for ``tasks`` and inputs of ``input_shape``.

    Args:
      config: ``name`` plus any subset of the model's hyper-parameters (missing ones take the
        defaults of :func:`default_model_config`).
      tasks: one head per task, keyed by ``TaskSpec.name``, in this order.
      input_shape: one example's shape ``(H, W, C)`` (or ``(B, H, W, C)``; B is ignored).

    Raises:
      ValueError: unknown model name (lists the valid ones), unknown config key (names it and
        lists the valid keys), a task kind the model cannot serve, duplicate task names, no tasks,
        or an input shape the architecture cannot take.
    """
    cfg = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    if "name" not in cfg:
        raise ValueError(f"The model config needs a 'name'; valid models: {sorted(MODELS)}.")
    name = cfg.pop("name")
    entry = _entry(name)
    unknown = sorted(set(cfg) - set(entry.defaults))
    if unknown:
        raise ValueError(
            f"Unknown config key(s) {unknown} for model {name!r}; valid keys: "
            f"{['name', *sorted(entry.defaults)]}."
        )
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("make_model needs at least one task.")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"Task names must be unique; got {names}.")
    for t in tasks:
        if t.kind not in entry.task_kinds:
            raise ValueError(
                f"Model {name!r} cannot serve task {t.name!r} of kind {t.kind!r}; it serves "
                f"{entry.task_kinds}. "
                + (
                    "Use 'segnet' for dense tasks."
                    if t.kind != "classification"
                    else f"Use one of {list(CLASSIFIERS)} for classification."
                )
            )
    shape = tuple(int(d) for d in input_shape)
    shape = shape[1:] if len(shape) == 4 else shape
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"input_shape must be (H, W, C) or (B, H, W, C); got {tuple(input_shape)}."
        )
    full = ml_collections.ConfigDict({**entry.defaults, **cfg})
    return entry.build(full, tasks, shape)
