"""Run a study in a work dir: what ``python -m experiments.run`` does once its flags are parsed
(Flax examples' ``train_and_evaluate(config, workdir)``).

:func:`run_study` validates the config, checks the work dir, builds the data and the model (so a
command refused for its input writes nothing), prepares the work dir, runs the study's phases
(skipping finished ones, resuming the interrupted one) and writes the report.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import ml_collections

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import parallel as parallel_lib
from experiments import reports, studies
from experiments.phases import run_phases
from experiments.workdir import check_workdir, prepare_workdir

__all__ = [
    "check_data_fits",
    "drop_other_study_sections",
    "enable_compilation_cache",
    "run_study",
    "write_study_report",
]


def drop_other_study_sections(config: ml_collections.ConfigDict) -> list[str]:
    """Removes the sections of studies other than ``config.study`` (``--config.study=compare`` on
    top of the recon config: its ``recon`` section means nothing to ``compare``); returns the
    removed section names. Sections of no study are left for validation to report."""
    own = studies.get_study(config.study).section
    others = {s.section for s in studies.STUDIES.values() if s.section and s.section != own}
    removed = sorted(key for key in config.keys() if key in others)
    if removed:
        with config.unlocked():
            for key in removed:
                del config[key]
    return removed


def run_study(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False) -> str:
    """Validates the config, runs the phases of its study (skipping finished ones, resuming the
    interrupted one) and writes the report."""
    dropped = drop_other_study_sections(config)
    if dropped:
        print(
            f"note: ignoring config.{', config.'.join(dropped)}: section(s) of another study, "
            f"not of {config.study!r}.",
            file=sys.stderr,
        )
    studies.with_study_section(config)
    studies.validate(config)
    # The work dir is checked, then the data and the model are built, and only then is anything
    # written: a command that fails on its input leaves the work dir as it was (a config.json
    # left behind would refuse the rerun with the input fixed as a change of config).
    if parallel_lib.is_primary():
        check_workdir(config, workdir, fresh)
    data = data_lib.make_dataset(config.dataset)
    check_data_fits(config, data)
    try:  # a model that cannot serve this data (input too small for its pools, ...)
        model = models_lib.make_model(config.model, data.tasks, data.input_shape)
    except ValueError as e:
        raise config_lib.ConfigError(
            f"model {config.model.name!r} on data set {config.dataset.name!r}: {e}"
        ) from e
    studies.validate_with_data(config, data, model)
    if parallel_lib.is_primary():  # multi-host: process 0 prepares the shared work dir
        added = prepare_workdir(config, workdir, fresh)
        if added:
            print(
                f"Adding seeds {added} to {workdir}: the finished seeds are kept; only the new "
                "seeds train.",
                file=sys.stderr,
            )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("prepare_workdir")
    log = parallel_lib.PrimaryLog(os.path.join(workdir, "metrics.jsonl"))  # process 0 writes
    if not any(r.get("kind") == "study" for r in log.records()):
        log.write(
            {
                "kind": "study",
                "study": config.study,
                "dataset": data.name,
                "info": data.info,
                "tasks": [dataclasses.asdict(t) for t in data.tasks],
            }
        )
    study = studies.get_study(config.study)
    ctx = studies.StudyContext(
        config=config,
        data=data,
        model=model,
        workdir=workdir,
        log=log,
        progress=bool(config.report.progress),
    )
    run_phases(study.phases(ctx), ctx.artifacts)
    if not parallel_lib.is_primary():
        return ""  # process 0 writes the report
    return write_study_report(study, list(log.records()), data.tasks, config, workdir)


def check_data_fits(config: ml_collections.ConfigDict, data: data_lib.MultiTaskData) -> None:
    """Raises :class:`~experiments.config.ConfigError` when the training split holds fewer
    examples than one batch (an epoch would have no step)."""
    size, batch = len(data.train), int(config.train.batch_size)
    if size < batch:
        raise config_lib.ConfigError(
            f"The training split of {data.name!r} has {size} examples, fewer than one batch "
            f"(config.train.batch_size={batch}); lower train.batch_size or raise "
            "dataset.max_train_examples."
        )


def write_study_report(study, records, tasks, config, workdir: str) -> str:
    """The base report (comparison table, plots) with the study's own section first."""
    title = f"{config.study}: {records[0].get('dataset', '')}, model {config.model.name}, seeds {list(config.seeds)}"
    sections = [study.report(records, tasks, config, workdir)] if study.report else []
    return reports.write_report(
        records, tasks, workdir, title, plots=bool(config.report.plots), sections=sections
    )


def enable_compilation_cache(directory: str | None = None) -> str:
    """Caches compiled XLA programs on disk, so the runs of a study that share a program (the
    same method on other seeds) and re-runs skip compilation."""
    directory = directory or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mtl_jax", "xla"
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
