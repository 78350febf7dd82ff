"""The experiment config: defaults, method strings, and validation with errors that list valid names.

A config file is a Python module whose ``get_config(arg)`` returns an ``ml_collections.ConfigDict``
(big_vision / Flax-examples style), normally built from :func:`base_config`. The argument is the
text after the file's ``:`` on the command line: ``--config FILE:SETUP,dataset=NAME,model=NAME``
picks one of the file's setups and switches the data set or model section to that entry's
defaults (:func:`section_arguments`; ``--config.dataset.<key>=...`` then sets its keys). Top-level
keys:

* ``study``: the study to run (``experiments.studies``; ``"compare"``, every method x every seed,
  is the default); ``python -m experiments.run --list`` lists them.
* ``seeds``: tuple of ints; every method runs on the same seeds.
* ``methods``: tuple of method strings ``"name"`` or ``"name:key=value,key=value"`` (e.g.
  ``"cagrad:c=0.4"``); names are keys of the library's catalogue, ``mtl.METHODS``. ``method_kwargs.<name>`` adds
  hyper-parameters from config files.
* ``single_task``: also train one single-task model per task (references for Δm).
* ``dataset``, ``model``: their ``name`` and builder keys (``experiments.data`` / ``experiments.models``).
* ``train``: optimizer and loop settings (:func:`train_defaults`); ``train.objectives``:
  ``"tasks"`` (one objective per task) or ``"instances"`` (every (sample, task) pair of the batch,
  IWRM / instance-wise MTL; :func:`check_objectives`).
* ``conflict``: the tracker's ``granularity`` (``global`` | ``module`` | ``leaf``), Recon's
  ``severity`` S, the incidence ``threshold`` and ``every``: the conflict probe (a program of its
  own that forms the encoder Jacobian, :func:`experiments.train.make_conflict_probe`) runs before
  every ``every``-th step, on that step's batch; ``1`` measures every step; ``0`` (the default)
  picks the largest period that still probes 2,500 steps of the run
  (:func:`experiments.train.probe_period`: a standard error of at most 1 point on p%).
* ``eval``: evaluation options (:func:`eval_defaults`): ``recompute_bn_batches`` (int >= 0;
  0 = off): before the final evaluation, recompute the BatchNorm statistics on that many
  training batches per task stream (:func:`mtl_jax.batchnorm.recompute_statistics`).
* ``parallel``: the devices and hosts a run uses (:func:`parallel_defaults`,
  :mod:`experiments.parallel`): every visible device by default, the batch sharded over them.
* a study's own section (``sparse`` for ``sparse_training``, ``combinations`` for
  ``leaf_combinations``, ...): owned, defaulted and validated by the study module
  (``experiments.studies.<name>``); this module knows no study.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

import mtl_jax as mtl
from experiments import data as data_lib
from experiments import models as models_lib
from experiments.optim import OPTIMIZERS, SCHEDULES

#: The keys every config has; a study adds its own section (``experiments.studies``).
BASE_KEYS = (
    "study",
    "seeds",
    "methods",
    "method_kwargs",
    "single_task",
    "dataset",
    "model",
    "train",
    "conflict",
    "report",
    "parallel",
    "eval",
)
GRANULARITIES = ("global", "module", "leaf")


class ConfigError(ValueError):
    """An unknown key, method, dataset, model or option in an experiment config."""


def train_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "epochs": 10,
            "batch_size": 128,
            "eval_batch_size": 512,
            "optimizer": "adam",
            "lr": 1e-3,
            "weight_decay": 0.0,
            "momentum": 0.9,
            "lr_schedule": "constant",
            "lr_boundaries": (),
            "lr_decay": 0.1,
            "grad_clip": 0.0,
            "log_every_steps": 10,
            "checkpoint_every_steps": 0,  # 0: only at epoch ends (checkpoint_every_epochs)
            "checkpoint_every_epochs": 1,
            "eval_every_epochs": 1,
            "task_map": "vmap",  # or "unroll" (faster for conv nets on CPU) / "scan"
            # a method whose weights need no Jacobian runs one backward pass of its weighted
            # loss; False: every method combines the Jacobian rows (the runs before issue 22)
            "weights_first": True,
            # "tasks": one objective per task (the loss vector); "instances": every (sample,
            # task) pair of the batch is one (K = batch_size x tasks; IWRM with one task), run
            # by the Gramian engine (check_objectives)
            "objectives": "tasks",
        }
    )


def conflict_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "granularity": "global",
            "severity": 0.0,
            "threshold": 0.0,
            "every": DEFAULT_PROBE_EVERY,
        }
    )


#: The conflict probe's default period: 0 = from the run's length (BUILD.md, "Conflict probe").
DEFAULT_PROBE_EVERY = 0


def parallel_defaults() -> ml_collections.ConfigDict:
    """``config.parallel``: data-parallel / FSDP training (:mod:`experiments.parallel`)."""
    return ml_collections.ConfigDict(
        {
            "devices": 0,  # 0: every visible device (of every host); n: the first n
            "fsdp": False,  # shard large parameters and their optimizer state over the devices
            "fsdp_min_size": 2**14,  # leaves with fewer elements stay replicated under FSDP
            "distributed": False,  # jax.distributed.initialize() first (multi-host; env-driven)
        }
    )


def eval_defaults() -> ml_collections.ConfigDict:
    """``config.eval``: evaluation options.

    ``recompute_bn_batches``: 0 (off) or the number of training batches on which the model's
    BatchNorm statistics are recomputed, per task stream, before the final evaluation and the
    ``final`` artifact (precise BN; a model without BatchNorm is unchanged)."""
    return ml_collections.ConfigDict({"recompute_bn_batches": 0})


def check_eval(section: ml_collections.ConfigDict) -> None:
    """Checks ``config.eval``: known keys, ``recompute_bn_batches`` a non-negative int."""
    check_keys(section, eval_defaults().keys(), "config.eval")
    value = section.recompute_bn_batches
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"config.eval.recompute_bn_batches={value!r}; use a non-negative integer (0 = off, "
            "N > 0 = recompute the BatchNorm statistics on N training batches per stream)."
        )


#: ``config.train.objectives``: one objective per task, or per (sample, task) pair of the batch.
OBJECTIVES = ("tasks", "instances")

#: Gram-space weightings with no per-objective hyper-parameter: what ``objectives="instances"``
#: runs (``linear``'s weights are one per objective, B x T of them, tied to the batch size).
INSTANCE_WISE_METHODS = tuple(
    name for name in mtl.weighting.registry.WEIGHTINGS if name not in ("linear",)
)


def objectives(config: ml_collections.ConfigDict) -> str:
    """``config.train.objectives`` (``"tasks"`` for a config written before the key existed)."""
    return str(config.train.get("objectives", "tasks"))


def check_objectives(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.train.objectives``; with ``"instances"`` (every (sample, task) pair of the
    batch is an objective, run by the Gramian engine, ``experiments.train.InstanceWise``): the
    ``compare`` study, and every method a Gram-space weighting (``mtl.weighting.get_weighting``
    names) without ``granularity``. The model's BatchNorm is checked once it is built
    (``experiments.train.check_objectives_with_model``).

    Raises:
      ValueError: naming the key, the method or study, and the fix.
    """
    value = objectives(config)
    if value not in OBJECTIVES:
        raise ValueError(
            f"config.train.objectives={value!r}; use 'tasks' (one objective per task) or "
            "'instances' (every (sample, task) pair of the batch: IWRM, instance-wise MTL)."
        )
    if value != "instances":
        return
    if config.study != "compare":
        raise ValueError(
            f"config.train.objectives='instances' runs the 'compare' study only; study "
            f"{config.study!r} changes the encoder per task (masks, copies, branches), which the "
            "Gramian engine's per-sample objectives do not express. Use --config.study=compare "
            "or config.train.objectives='tasks'."
        )
    for method in config.get("methods", ()):
        name, kwargs = parse_method(method, config.method_kwargs.get(method.partition(":")[0]))
        if name not in INSTANCE_WISE_METHODS:
            raise ValueError(
                f"config.methods has {method!r}, which config.train.objectives='instances' cannot "
                "run: instance-wise objectives are weighed in Gram space by the Gramian engine, "
                f"so the method must be one of {list(INSTANCE_WISE_METHODS)} (loss-only, "
                "representation, cross-batch, GradDrop, <weighting>_ub and per-objective-weight "
                "methods are not). Choose one of those, or config.train.objectives='tasks'."
            )
        if kwargs.get("granularity", "global") != "global":
            raise ValueError(
                f"config.methods has {method!r}: with config.train.objectives='instances' the "
                "weighting runs on one global Gram matrix; drop granularity= (or use "
                "config.train.objectives='tasks')."
            )


def report_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"plots": True, "progress": True})


def base_config(dataset: str, model: str) -> ml_collections.ConfigDict:
    """A complete config with every base key at its default, for ``dataset`` and ``model``.

    It knows no study: ``experiments.studies.study_config(name, dataset, model)`` adds a study's
    own section (e.g. ``config.sparse``) and sets ``config.study``.
    """
    config = ml_collections.ConfigDict()
    config.study = "compare"
    config.seeds = (0,)
    config.methods = ("mean", "pcgrad")
    config.method_kwargs = ml_collections.ConfigDict()
    config.single_task = False
    config.dataset = data_lib.default_dataset_config(dataset)
    config.model = models_lib.default_model_config(model)
    config.train = train_defaults()
    config.conflict = conflict_defaults()
    config.report = report_defaults()
    config.eval = eval_defaults()
    config.parallel = parallel_defaults()
    return config


#: The sections a config argument switches (``FILE:dataset=arrays``), and their default configs.
SWITCHABLE = {
    "dataset": data_lib.default_dataset_config,
    "model": models_lib.default_model_config,
}


def parse_config_arg(arg: str | None) -> tuple[str | None, dict[str, str]]:
    """``"setup,dataset=arrays,model=mlp"`` -> ``("setup", {"dataset": "arrays", "model":
    "mlp"})``; the setup (at most one item without ``=``) may be absent.

    Raises:
      ConfigError: two setups, or a key that is not a switchable section (lists them).
    """
    setups, options = [], {}
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq:
            setups.append(item.strip())
            continue
        if key.strip() not in SWITCHABLE:
            raise ConfigError(
                f"Unknown config argument {key.strip()!r} in {arg!r}; a config file takes its "
                f"setup and {sorted(SWITCHABLE)}: FILE:SETUP,dataset=NAME,model=NAME."
            )
        options[key.strip()] = value.strip()
    if len(setups) > 1:
        raise ConfigError(f"Config argument {arg!r} names {len(setups)} setups {setups}; give one.")
    return (setups[0] if setups else None), options


def select_sections(
    config: ml_collections.ConfigDict, options: Mapping[str, str]
) -> ml_collections.ConfigDict:
    """Replaces each section named in ``options`` by the defaults of its new entry (the old
    entry's keys do not stay: another data set has other keys).

    Raises:
      ConfigError: an unknown data set or model (lists the valid ones).
    """
    for section, name in options.items():
        try:
            fresh = SWITCHABLE[section](name)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        with config.unlocked():
            config[section] = fresh
    return config


def section_arguments(
    get_config: Callable[..., ml_collections.ConfigDict],
) -> Callable[[str | None], ml_collections.ConfigDict]:
    """Decorates a config file's ``get_config(setup=...)`` so that its argument may also switch
    sections: ``FILE:SETUP,dataset=NAME,model=NAME`` (each part optional)."""

    @functools.wraps(get_config)
    def wrapped(arg: str | None = None) -> ml_collections.ConfigDict:
        setup, options = parse_config_arg(arg)
        config = get_config() if setup is None else get_config(setup)
        return select_sections(config, options)

    return wrapped


def load_config(path: str) -> ml_collections.ConfigDict:
    """Runs the config file ``FILE[:ARG]`` (``get_config(ARG)``) as ``--config`` does.

    Raises:
      FileNotFoundError: there is no such file.
    """
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"Config file {file!r} does not exist.")
    spec = importlib.util.spec_from_file_location("_experiment_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


_parse_value = mtl.methods.parse_literal  # a Python literal, or the text itself


def parse_method(method: str, extra: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``"cagrad:c=0.4,rescale=True"`` -> ``("cagrad", {"c": 0.4, "rescale": True})``
    (:func:`mtl_jax.parse_method`), over the config's ``extra`` hyper-parameters."""
    name, kwargs = mtl.parse_method(method)
    return name, {**dict(extra or {}), **kwargs}


def check_keys(section: ml_collections.ConfigDict, valid, where: str, hint: str = "") -> None:
    """Raises ``ValueError`` naming the unknown keys of ``section`` and the valid ones."""
    unknown = sorted(set(section.keys()) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown config key(s) {unknown} in {where}; valid keys: {sorted(valid)}.{hint}"
        )


def switch_hint(section: str) -> str:
    """How to switch ``section`` (``dataset``/``model``) to another entry, for error messages."""
    return (
        f" (Setting config.{section}.name keeps the old {section}'s keys; switch {section}s in "
        f"the config argument instead: --config=FILE:{section}=NAME.)"
    )


def check_distinct(values: Any, where: str, what: str) -> None:
    """Raises ``ValueError`` naming the repeated entries of ``values`` (each run is keyed by its
    seed and method: a repeat would be the same run twice)."""
    seen, repeated = set(), []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    if repeated:
        raise ValueError(
            f"{where}={tuple(values)} repeats {repeated}; give each {what} once (a repeated "
            f"{what} would train the same run twice)."
        )


def validate_base(config: ml_collections.ConfigDict, study_sections: tuple[str, ...] = ()) -> None:
    """Checks the base keys (``ValueError`` naming an unknown key, data set, model or option);
    ``study_sections`` are the top-level sections the config's study owns."""
    check_keys(config, (*BASE_KEYS, *study_sections), "the config")
    check_keys(config.train, train_defaults().keys(), "config.train")
    check_keys(config.conflict, conflict_defaults().keys(), "config.conflict")
    check_keys(config.report, report_defaults().keys(), "config.report")
    if "eval" in config:
        check_eval(config.eval)
    if "parallel" in config:
        check_keys(config.parallel, parallel_defaults().keys(), "config.parallel")
        if int(config.parallel.devices) < 0:
            raise ValueError(
                f"config.parallel.devices={config.parallel.devices}; use 0 (every visible "
                "device) or a positive number."
            )
        if int(config.parallel.fsdp_min_size) < 1:
            raise ValueError(
                f"config.parallel.fsdp_min_size={config.parallel.fsdp_min_size}; use a "
                "positive number of elements."
            )
    if not float(config.train.lr) > 0:
        raise ValueError(
            f"config.train.lr={config.train.lr}; the learning rate must be > 0 (e.g. 1e-3)."
        )
    if int(config.train.epochs) < 1:
        raise ValueError(f"config.train.epochs={config.train.epochs}; train at least 1 epoch.")
    if not isinstance(config.train.batch_size, int) or config.train.batch_size < 1:
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size!r}; use a positive integer "
            "(e.g. 256)."
        )
    if config.train.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {config.train.optimizer!r}; valid: {OPTIMIZERS}.")
    if config.train.lr_schedule not in SCHEDULES:
        raise ValueError(f"Unknown lr_schedule {config.train.lr_schedule!r}; valid: {SCHEDULES}.")
    if config.train.task_map not in mtl.gradients.TASK_MAPS:
        raise ValueError(
            f"Unknown task_map {config.train.task_map!r}; valid: {mtl.gradients.TASK_MAPS}."
        )
    check_objectives(config)
    if config.conflict.granularity not in GRANULARITIES:
        raise ValueError(
            f"Unknown conflict.granularity {config.conflict.granularity!r}; valid: {GRANULARITIES}."
        )
    every = config.conflict.every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(
            f"config.conflict.every={every!r}; the conflict probe's period is an integer >= 1 "
            "(1: every step), or 0 to pick it from the run's length."
        )
    if not config.seeds:
        raise ValueError("config.seeds is empty; give at least one seed.")
    check_distinct(config.seeds, "config.seeds", "seed")
    if "methods" in config:
        check_distinct(config.methods, "config.methods", "method")
    if config.dataset.get("name") not in data_lib.DATASETS:
        raise ValueError(
            f"Unknown dataset {config.dataset.get('name')!r}; valid datasets: {sorted(data_lib.DATASETS)}."
        )
    check_keys(
        config.dataset,
        data_lib.default_dataset_config(config.dataset.name).keys(),
        "config.dataset",
        switch_hint("dataset"),
    )
    if config.model.get("name") not in models_lib.MODELS:
        raise ValueError(
            f"Unknown model {config.model.get('name')!r}; valid models: {sorted(models_lib.MODELS)}."
        )
    check_keys(
        config.model,
        models_lib.default_model_config(config.model.name).keys(),
        "config.model",
        switch_hint("model"),
    )
