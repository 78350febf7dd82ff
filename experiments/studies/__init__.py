"""Studies: one module each, registered in :data:`STUDIES` (``config.study`` selects one).

* ``compare`` (:mod:`.compare`): every method x every seed (+ single-task references).
* ``sparse_training`` (:mod:`.sparse_training`): dense vs sparse training, selection controls.
* ``leaf_combinations`` (:mod:`.leaf_combinations`): PCGrad x Modulation x LaSS.
* ``recon`` (:mod:`.recon`): Recon's search -> select -> branch -> retrain, with RSL / RSP.
* ``conal`` (:mod:`.conal`): CoNAL's search -> discretise -> retrain, vs all-shared / all-private.

A study module defines ``STUDY`` (:class:`~experiments.studies.base.Study`): its config section
and defaults, validation, phases and report section. To add one, write the module and add it to
:data:`STUDIES`; a config file then starts from ``study_config("<name>", dataset, model)``.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments import config as config_lib
from experiments.studies import compare, conal, leaf_combinations, recon, sparse_training
from experiments.studies.base import Study, StudyContext, check_methods, train_phase
from experiments.train import check_objectives_with_model

STUDIES: dict[str, Study] = {
    m.STUDY.name: m.STUDY for m in (compare, sparse_training, leaf_combinations, recon, conal)
}

__all__ = [
    "STUDIES",
    "Study",
    "StudyContext",
    "get_study",
    "study_config",
    "train_phase",
    "validate",
    "validate_with_data",
    "with_study_section",
]


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise config_lib.ConfigError(f"Unknown study {name!r}; valid studies: {sorted(STUDIES)}.")
    return STUDIES[name]


def with_study_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the study's section with its defaults when the config lacks it (e.g. ``--config.study=
    sparse_training`` on the default config)."""
    study = get_study(config.study)
    if study.section and study.section not in config:
        with config.unlocked():
            config[study.section] = study.defaults()
    return config


def study_config(name: str, dataset: str, model: str) -> ml_collections.ConfigDict:
    """The base config for ``dataset`` and ``model`` with study ``name`` and its section."""
    config = config_lib.base_config(dataset, model)
    config.study = name
    return with_study_section(config)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`~experiments.config.ConfigError` naming an unknown key, study, method,
    data set, model or option (and listing the valid ones)."""
    try:
        study = get_study(config.get("study"))
        sections = (study.section,) if study.section else ()
        config_lib.validate_base(config, sections)
        if study.validate is not None:
            study.validate(config)
    except config_lib.ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise config_lib.ConfigError(str(e)) from e


def validate_with_data(config: ml_collections.ConfigDict, data: Any, model: Any) -> None:
    """After the data and model are built, before anything is written: every method of the
    study built for the data's K, and the study's own checks against the data and model.

    Raises:
      ConfigError: naming the method or setting and the fix.
    """
    study = get_study(config.study)
    try:
        if study.methods is not None:
            check_methods(config, study.methods(config), num_tasks=len(data.tasks))
        if study.check_inputs is not None:
            study.check_inputs(config, data, model)
        check_objectives_with_model(config, data, model)
    except config_lib.ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"On the {len(data.tasks)} tasks of {data.name!r}: {e}") from e
