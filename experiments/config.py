"""The experiment config: defaults, method strings, and validation with errors that list valid names.

A config file is a Python module whose ``get_config()`` returns an ``ml_collections.ConfigDict``
(big_vision / Flax-examples style), normally built from :func:`base_config`. Top-level keys:

* ``study``: ``"compare"`` (every method x every seed; the default) -- other studies register in
  ``experiments.studies``.
* ``seeds``: tuple of ints; every method runs on the same seeds.
* ``methods``: tuple of method strings ``"name"`` or ``"name:key=value,key=value"`` (e.g.
  ``"cagrad:c=0.4"``); names are ``mtl.AGGREGATORS`` keys. ``method_kwargs.<name>`` adds
  hyper-parameters from config files.
* ``single_task``: also train one single-task model per task (references for Δm).
* ``dataset``, ``model``: their ``name`` and builder keys (``experiments.data`` / ``experiments.models``).
* ``train``: optimizer and loop settings (:func:`train_defaults`).
* ``conflict``: the tracker's ``granularity`` (``global`` | ``module`` | ``leaf``), Recon's
  ``severity`` S and the incidence ``threshold``.
* ``sparse``, ``combinations``: the options of the ``sparse_training`` and ``leaf_combinations``
  studies (``experiments.studies``); other studies ignore them.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

import ml_collections

import mtl_jax as mtl
from experiments import data as data_lib
from experiments import models as models_lib
from experiments.optim import OPTIMIZERS, SCHEDULES

TOP_LEVEL_KEYS = (
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
    "sparse",
    "combinations",
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
            "jacobian_strategy": "vmap",  # or "unroll" (faster for conv nets on CPU) / "scan"
        }
    )


def conflict_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"granularity": "global", "severity": 0.0, "threshold": 0.0})


def report_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"plots": True, "progress": True})


def base_config(dataset: str, model: str) -> ml_collections.ConfigDict:
    """A complete config with every key at its default, for ``dataset`` and ``model``."""
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
    from experiments import studies

    config.sparse = studies.sparse_defaults()
    config.combinations = studies.combinations_defaults()
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_method(method: str, extra: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``"cagrad:c=0.4,rescale=True"`` -> ``("cagrad", {"c": 0.4, "rescale": True})``."""
    name, _, rest = method.partition(":")
    name = name.strip()
    kwargs = dict(extra or {})
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Bad method string {method!r}: expected 'name:key=value,...'.")
        kwargs[key.strip()] = _parse_value(value.strip())
    return name, kwargs


def _check_keys(section: ml_collections.ConfigDict, valid, where: str) -> None:
    unknown = sorted(set(section.keys()) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown config key(s) {unknown} in {where}; valid keys: {sorted(valid)}."
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming an unknown key, method, dataset, model or option."""
    try:
        _validate(config)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(str(e)) from e


def _validate(config: ml_collections.ConfigDict) -> None:
    from experiments import studies
    from experiments.train import make_aggregator

    _check_keys(config, TOP_LEVEL_KEYS, "the config")
    if config.study not in studies.STUDIES:
        raise ValueError(
            f"Unknown study {config.study!r}; valid studies: {sorted(studies.STUDIES)}."
        )
    _check_keys(config.train, train_defaults().keys(), "config.train")
    _check_keys(config.conflict, conflict_defaults().keys(), "config.conflict")
    _check_keys(config.report, report_defaults().keys(), "config.report")
    _check_keys(config.sparse, studies.sparse_defaults().keys(), "config.sparse")
    _check_keys(config.combinations, studies.combinations_defaults().keys(), "config.combinations")
    if config.study == "sparse_training":
        for method in config.sparse.methods:
            name, kwargs = parse_method(method, config.method_kwargs.get(method.partition(":")[0]))
            make_aggregator(name, kwargs, num_tasks=2)
        bad = sorted(set(config.sparse.controls) - set(studies.SELECTIONS))
        if bad:
            raise ValueError(
                f"Unknown sparse.controls {bad}; valid selections: {list(studies.SELECTIONS)}."
            )
        if config.sparse.measure_on not in ("masked", "full"):
            raise ValueError(
                f"sparse.measure_on must be 'masked' or 'full'; got {config.sparse.measure_on!r}."
            )
        if config.sparse.other not in ("train", "freeze"):
            raise ValueError(
                f"sparse.other must be 'train' or 'freeze'; got {config.sparse.other!r}."
            )
    if config.study == "leaf_combinations" and "modulation" not in models_lib.default_model_config(
        config.model.name
    ):
        raise ValueError(
            f"leaf_combinations needs a model with a 'modulation' option (small_cnn); got {config.model.name!r}."
        )
    if config.train.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {config.train.optimizer!r}; valid: {OPTIMIZERS}.")
    if config.train.lr_schedule not in SCHEDULES:
        raise ValueError(f"Unknown lr_schedule {config.train.lr_schedule!r}; valid: {SCHEDULES}.")
    if config.train.jacobian_strategy not in mtl.jacobian.STRATEGIES:
        raise ValueError(
            f"Unknown jacobian_strategy {config.train.jacobian_strategy!r}; valid: {mtl.jacobian.STRATEGIES}."
        )
    if config.conflict.granularity not in GRANULARITIES:
        raise ValueError(
            f"Unknown conflict.granularity {config.conflict.granularity!r}; valid: {GRANULARITIES}."
        )
    if not config.seeds:
        raise ValueError("config.seeds is empty; give at least one seed.")
    for method in config.methods:
        name, kwargs = parse_method(method, config.method_kwargs.get(method.partition(":")[0]))
        make_aggregator(name, kwargs, num_tasks=2)  # unknown names / hyper-parameters raise
    if config.dataset.get("name") not in data_lib.DATASETS:
        raise ValueError(
            f"Unknown dataset {config.dataset.get('name')!r}; valid datasets: {sorted(data_lib.DATASETS)}."
        )
    _check_keys(
        config.dataset,
        data_lib.default_dataset_config(config.dataset.name).keys(),
        "config.dataset",
    )
    if config.model.get("name") not in models_lib.MODELS:
        raise ValueError(
            f"Unknown model {config.model.get('name')!r}; valid models: {sorted(models_lib.MODELS)}."
        )
    _check_keys(
        config.model, models_lib.default_model_config(config.model.name).keys(), "config.model"
    )
