"""Run an experiment: ``python -m experiments.run [--config FILE] [--config.key=value ...] [--workdir DIR]``.

With no ``--config`` this runs ``experiments/configs/default.py``: the embedded two-digit
benchmark (no download), ``mean`` vs ``pcgrad`` on the same seeds (about two minutes on a 2-core
CPU). The work dir (default ``workdirs/<config name>``, plus ``-<hash>`` of the ``--config.*``
overrides when there are any) receives ``config.json``, ``metrics.jsonl``, one directory per
phase of the study under ``phases/`` (orbax checkpoints, artifacts), ``plots/*.png`` and
``report.md``; the comparison table is also printed. Re-running the same command resumes:
finished phases are skipped, an interrupted run continues from its last checkpoint and ends
bit-identical to an uninterrupted one. Seeds may be added to a work dir (``--config.seeds`` with
the old seeds and new ones, the same ``--workdir``): the finished seeds are kept and only the new
ones train. A work dir holding any other config (a removed seed included) is refused, naming the
changed keys (use another ``--workdir`` or ``--fresh``). ``--config.study=<other>`` on top of a
study's config drops that study's own section (e.g. ``recon``), with a note. Mistakes (an unknown
key, a work dir that is a file, data that is not downloaded, a non-finite loss, Ctrl-C) end with
one message and exit status 2; ``--verbose`` adds the traceback. ``--list`` lists the studies, data sets, models and methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import mtl_jax as mtl
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import parallel as parallel_lib
from experiments import reports, studies
from experiments.data.tfds_io import DataUnavailableError
from experiments.logs import atomic_write_text
from experiments.phases import run_phases
from experiments.train import NonFiniteLossError

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

_FLAGS: dict[str, Any] = {}


def define_flags() -> None:
    """Defines the command-line flags (at ``entry()``, not at import: ml_collections parses the
    ``--config.*`` overrides of the default config when the flag is defined)."""
    if _FLAGS:
        return
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Experiment config file."
    )
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir",
        None,
        "Work dir (default: workdirs/<config name>, plus a hash of the --config.* overrides).",
    )
    _FLAGS["fresh"] = flags.DEFINE_bool("fresh", False, "Delete the work dir before running.")
    _FLAGS["list"] = flags.DEFINE_bool(
        "list", False, "List the studies, data sets, models and methods."
    )
    _FLAGS["verbose"] = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")


class WorkdirError(ValueError):
    """The work dir cannot be used (e.g. it is a file)."""


def default_workdir(argv: list[str]) -> str:
    """``workdirs/<config name>``; with ``--config.*`` overrides, ``workdirs/<config name>-<hash
    of the overrides>``, so a command with other settings never collides with the plain one."""
    name = os.path.splitext(os.path.basename(_config_path(argv).partition(":")[0]))[0]
    overrides = sorted(a for a in argv if a.startswith("--config."))
    if not overrides:
        return os.path.join("workdirs", name)
    digest = hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
    return os.path.join("workdirs", f"{name}-{digest}")


class ConfigMismatchError(ValueError):
    """The work dir holds results of a different config."""


#: Sections that do not change results: plots / progress bars, and the devices a run is laid out
#: on (equal up to float rounding; a run may resume on another number of devices).
RESULT_NEUTRAL = ("report", "parallel")


def _comparable(config: ml_collections.ConfigDict | dict) -> dict:
    as_dict = dict(config) if isinstance(config, dict) else json.loads(config.to_json_best_effort())
    return {k: v for k, v in as_dict.items() if k not in RESULT_NEUTRAL}


def config_differences(previous: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like configs (sorted; a key only one of
    them has counts as different)."""
    if isinstance(previous, dict) and isinstance(current, dict):
        keys = sorted(set(previous) | set(current))
        return [
            diff
            for key in keys
            for diff in config_differences(
                previous.get(key, _MISSING), current.get(key, _MISSING), f"{prefix}{key}."
            )
        ]
    return [] if previous == current else [prefix.rstrip(".")]


_MISSING = object()


def check_config_change(previous: dict, current: dict, workdir: str) -> list[int]:
    """The seeds ``current`` adds to a work dir made with ``previous`` (``[]``: the same config).

    Seeds may only grow: every run and phase is keyed by its seed, so the finished seeds' results
    stay valid and only the added seeds train.

    Raises:
      ConfigMismatchError: a seed was removed, or a key other than ``seeds`` changed (names the
        keys and what to do).
    """
    old, new = _comparable(previous), _comparable(current)
    changed = config_differences(
        {k: v for k, v in old.items() if k != "seeds"},
        {k: v for k, v in new.items() if k != "seeds"},
    )
    path = os.path.join(workdir, "config.json")
    if changed:
        shown = ", ".join(changed[:8]) + (
            f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
        )
        raise ConfigMismatchError(
            f"{workdir} holds results of a different config ({path}; changed: {shown}); use "
            "another --workdir, or --fresh to delete it. (Only config.seeds may change in a "
            "work dir, by adding seeds.)"
        )
    old_seeds = [int(s) for s in old.get("seeds", [])]
    new_seeds = [int(s) for s in new.get("seeds", [])]
    removed = [s for s in old_seeds if s not in new_seeds]
    if removed:
        raise ConfigMismatchError(
            f"{workdir} holds results of seeds {old_seeds} ({path}); this config drops seeds "
            f"{removed}. Seeds may only be added to a work dir: keep {old_seeds} in config.seeds "
            "(and add new ones), use another --workdir, or --fresh to delete it."
        )
    return [s for s in new_seeds if s not in old_seeds]


def prepare_workdir(
    config: ml_collections.ConfigDict, workdir: str, fresh: bool = False
) -> list[int]:
    """Creates the work dir and ``config.json``; refuses a work dir made by another config.

    A config that differs from the stored one only by added seeds is accepted: ``config.json``
    gets the new seeds, the finished seeds' phases are skipped and only the added seeds train.
    Returns the added seeds (``[]`` for a new work dir or the same config).
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"The work dir {workdir!r} is a file; give --workdir a directory.")
    if fresh and os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    added: list[int] = []
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        current = json.loads(config.to_json_best_effort())
        added = check_config_change(previous, current, workdir)
    atomic_write_text(path, config.to_json_best_effort(indent=2) + "\n")
    return added


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples config files use."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a work dir was made with (its ``config.json``, written by
    :func:`prepare_workdir`), lists back as tuples.

    Raises:
      FileNotFoundError: the work dir has no ``config.json``.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: give --workdir a work dir of experiments.run.")
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


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
    data = data_lib.make_dataset(config.dataset)
    model = models_lib.make_model(config.model, data.tasks, data.input_shape)
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


def write_study_report(study, records, tasks, config, workdir: str) -> str:
    """The base report (comparison table, plots) with the study's own section first."""
    title = f"{config.study}: {records[0].get('dataset', '')}, model {config.model.name}, seeds {list(config.seeds)}"
    sections = [study.report(records, tasks, config, workdir)] if study.report else []
    return reports.write_report(
        records, tasks, workdir, title, plots=bool(config.report.plots), sections=sections
    )


def listing() -> str:
    """``--list``: the studies, data sets, models and methods, one line each."""
    lines = ["Studies (config.study):"]
    lines += [f"  {name:20s} {s.description}" for name, s in sorted(studies.STUDIES.items())]
    lines.append("Data sets (config.dataset.name):")
    lines += [
        f"  {name:20s} {getattr(entry, 'description', '')}".rstrip()
        for name, entry in sorted(data_lib.DATASETS.items())
    ]
    lines.append("Models (config.model.name):")
    lines += [
        f"  {name:20s} {entry.description}" for name, entry in sorted(models_lib.MODELS.items())
    ]
    lines.append("Methods (config.methods; 'name:key=value,...' sets hyper-parameters):")
    what = {
        "jacobian": "aggregator of the task Jacobian",
        "loss": "loss-only (weights from the losses)",
        "representation": "representation gradients (d loss_k / d z)",
    }
    lines += [f"  {name:20s} {what[entry.cost]}" for name, entry in mtl.METHODS.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line: check overrides before absl parses them (its error for an unknown key is a bare
# AttributeError).


def _config_path(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def _load_config_file(path: str) -> ml_collections.ConfigDict:
    file, _, arg = path.partition(":")
    if not os.path.exists(file):
        raise FileNotFoundError(f"Config file {file!r} does not exist.")
    spec = importlib.util.spec_from_file_location("_experiment_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


#: Config sections whose ``name`` selects a registry entry with its own keys: overriding the
#: name from the command line brings that entry's defaults (the old entry's keys do not stay).
NAMED_SECTIONS: dict[str, Callable[[str], ml_collections.ConfigDict]] = {
    "dataset": data_lib.default_dataset_config,
    "model": models_lib.default_model_config,
}


def split_named_section_overrides(argv: list[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Takes ``--config.<section>.*=...`` out of ``argv`` for each :data:`NAMED_SECTIONS` section
    whose ``name`` is overridden; returns ``(the other args, {section: {key: text}})``."""
    pulled: dict[str, dict[str, str]] = {}
    for section in NAMED_SECTIONS:
        prefix = f"--config.{section}."
        if any(a.startswith(prefix + "name=") for a in argv):
            pulled[section] = dict(
                a[len(prefix) :].split("=", 1) for a in argv if a.startswith(prefix) and "=" in a
            )
            argv = [a for a in argv if not a.startswith(prefix)]
    return argv, pulled


def _coerce(text: str, default: Any) -> Any:
    value = config_lib._parse_value(text)
    if isinstance(default, bool) or default is None:
        return value
    if isinstance(default, int | float) and isinstance(value, int | float):
        return type(default)(value)
    if isinstance(default, str) and not isinstance(value, str):
        return text
    return value


def apply_named_section_overrides(
    config: ml_collections.ConfigDict, pulled: dict[str, dict[str, str]]
) -> ml_collections.ConfigDict:
    """Replaces each pulled section by its new entry's defaults, then applies the other keys.

    Raises:
      ConfigError: an unknown name or key (listing the valid ones).
    """
    for section, overrides in pulled.items():
        overrides = dict(overrides)
        name = config_lib._parse_value(overrides.pop("name"))
        try:
            fresh = NAMED_SECTIONS[section](name)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from e
        for key, text in overrides.items():
            if key not in fresh:
                raise config_lib.ConfigError(
                    f"Unknown config key {section}.{key!r} for {section} {name!r}; valid keys: "
                    f"{sorted(fresh.keys())}."
                )
            with fresh.ignore_type():
                fresh[key] = _coerce(text, fresh[key])
        with config.unlocked():
            config[section] = fresh
    return config


def check_overrides(argv: list[str]) -> None:
    """Raises ``ValueError`` for a ``--config.a.b=...`` whose key the config does not have
    (overrides of a data set's or model's keys after a new ``name`` are checked against that
    entry's keys, by :func:`apply_named_section_overrides`)."""
    argv, pulled = split_named_section_overrides(argv)
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not overrides and not pulled:
        return
    config = _load_config_file(_config_path(argv))
    apply_named_section_overrides(config, pulled)
    for key in overrides:
        node, walked = config, []
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = "config" + "".join(f".{w}" for w in walked)
                raise ValueError(
                    f"Unknown config key {key!r}: {where} has no {part!r}; valid keys: {valid}."
                )
            node = node[part]
            walked.append(part)


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


#: Errors that end a run with one message and exit status 2 (the traceback only with --verbose).
USER_ERRORS = (
    config_lib.ConfigError,
    ConfigMismatchError,
    WorkdirError,
    NonFiniteLossError,
    DataUnavailableError,
    FileNotFoundError,
    parallel_lib.DistributedSetupError,
)


def fail(message: str, error: BaseException | None = None) -> None:
    if error is not None and "verbose" in _FLAGS and _FLAGS["verbose"].value:
        traceback.print_exception(error)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if _FLAGS["list"].value:
        print(listing())
        return
    workdir = _FLAGS["workdir"].value or default_workdir(sys.argv)
    try:
        config = apply_named_section_overrides(_FLAGS["config"].value, _PULLED)
        if config.get("parallel", {}).get("distributed", False):
            parallel_lib.initialize_distributed()  # before any other JAX call
        enable_compilation_cache()
        print(f"Work dir: {os.path.abspath(workdir)}", file=sys.stderr)
        report = run_study(config, workdir, fresh=_FLAGS["fresh"].value)
    except NonFiniteLossError as e:
        fail(f"{e} Work dir: {workdir}.", e)
    except USER_ERRORS as e:
        fail(str(e), e)
    except KeyboardInterrupt as e:
        fail(
            f"interrupted. Rerunning the same command resumes from the last checkpoint "
            f"(work dir {workdir}).",
            e,
        )
    if parallel_lib.is_primary():
        print(report)
        print(f"Work dir: {os.path.abspath(workdir)}")


_PULLED: dict[str, dict[str, str]] = {}


def config_file_first(argv: list[str]) -> list[str]:
    """``argv`` with ``--config FILE`` / ``--config=FILE`` moved before every other flag: absl
    parses ``--config.x=y`` only after the config file is loaded, and otherwise stops with a
    fatal flags-parsing error when an override comes first."""
    program, rest = argv[:1], argv[1:]
    first: list[str] = []
    others: list[str] = []
    i = 0
    while i < len(rest):
        if rest[i] == "--config" and i + 1 < len(rest):
            first += rest[i : i + 2]
            i += 2
            continue
        (first if rest[i].startswith("--config=") else others).append(rest[i])
        i += 1
    return program + first + others


def entry() -> None:
    """``python -m experiments.run``: checks the overrides before absl parses them (its own error
    for an unknown key is a bare AttributeError), then runs :func:`main`."""
    try:
        check_overrides(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        fail(str(e), e)
    argv, pulled = split_named_section_overrides(config_file_first(sys.argv))
    _PULLED.update(pulled)
    sys.argv[:] = argv  # the default config's overrides are parsed when its flag is defined
    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    entry()
