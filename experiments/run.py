"""Run an experiment: ``python -m experiments.run [--config FILE[:ARG]] [--config.key=value ...]
[--workdir DIR] [--fresh] [--list] [--verbose]``.

With no ``--config`` this runs ``experiments/configs/default.py``: the embedded two-digit
benchmark (no download), ``mean`` vs ``pcgrad`` on the same seeds (about two minutes on a 2-core
CPU). ``ARG`` picks the config file's setup and switches its data set or model:
``--config experiments/configs/default.py:dataset=arrays --config.dataset.path=mine.npz``
(:func:`experiments.config.section_arguments`). The work dir (default ``workdirs/<config name>``,
plus ``-<hash>`` of the config argument and the ``--config.*`` overrides when there are any)
receives ``config.json``, ``metrics.jsonl``, one directory per phase of the study under
``phases/``, ``plots/*.png`` and ``report.md`` (:mod:`experiments.workdir`); the comparison table
is also printed. Rerunning the same command resumes; a work dir accepts added seeds and refuses
any other change of config (``--fresh`` starts over). Mistakes end with one ``error:`` line and
exit status 2 (``--verbose`` adds the traceback), and a command refused for its input writes
nothing. ``--list`` lists the studies, data sets, models and methods.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import sys
import traceback
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import mtl_jax as mtl
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models as models_lib
from experiments import parallel as parallel_lib
from experiments import studies
from experiments.data.core import DataError
from experiments.data.tfds_io import DataUnavailableError
from experiments.interrupt import catching_ctrl_c, raise_if_interrupted
from experiments.runner import enable_compilation_cache, run_study
from experiments.train import NonFiniteLossError
from experiments.workdir import ConfigMismatchError, WorkdirError

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

_FLAGS: dict[str, Any] = {}


def define_flags() -> None:
    """Defines the flags (at :func:`entry`, not at import: ``experiments.report`` imports this
    module and defines its own ``--workdir``)."""
    if _FLAGS:
        return
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file FILE[:SETUP,dataset=NAME,model=NAME]."
    )
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir", None, "Work dir (default: workdirs/<config name>[-<hash of the arguments>])."
    )
    _FLAGS["fresh"] = flags.DEFINE_bool("fresh", False, "Delete the work dir before running.")
    _FLAGS["list"] = flags.DEFINE_bool(
        "list", False, "List the studies, data sets, models and methods."
    )
    _FLAGS["verbose"] = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error.")


def config_first(argv: list[str]) -> list[str]:
    """``argv`` with its ``--config FILE`` (or the default config) first: absl applies the
    ``--config.*`` overrides only once the file has been loaded."""
    program, rest, first = argv[:1], [], []
    args = iter(argv[1:])
    for arg in args:
        if arg == "--config":
            first = [f"--config={next(args, '')}"]
        elif arg.startswith("--config="):
            first = [arg]
        else:
            rest.append(arg)
    return program + (first or [f"--config={DEFAULT_CONFIG}"]) + rest


def config_path(argv: list[str]) -> str:
    """The ``FILE[:ARG]`` of ``--config`` in ``argv`` (after :func:`config_first`)."""
    return config_first(argv)[1].split("=", 1)[1]


def default_workdir(argv: list[str]) -> str:
    """``workdirs/<config name>``; with a config argument or ``--config.*`` overrides,
    ``workdirs/<config name>-<hash of them>``, so a command with other settings never collides
    with the plain one."""
    file, _, arg = config_path(argv).partition(":")
    name = os.path.splitext(os.path.basename(file))[0]
    settings = sorted(a for a in argv if a.startswith("--config.")) + ([f":{arg}"] if arg else [])
    if not settings:
        return os.path.join("workdirs", name)
    digest = hashlib.sha1("\n".join(settings).encode()).hexdigest()[:8]
    return os.path.join("workdirs", f"{name}-{digest}")


def unknown_override(config: ml_collections.ConfigDict, argv: list[str]) -> str | None:
    """The message for the first ``--config.a.b=...`` of ``argv`` that ``config`` has no key
    for (``None``: every key exists)."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        node, walked = config, []
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = "config" + "".join(f".{w}" for w in walked)
                hint = (
                    config_lib.switch_hint(walked[0])
                    if walked[:1] in (["dataset"], ["model"])
                    else ""
                )
                return f"Unknown config key {key!r}: {where} has no {part!r}; valid keys: {valid}.{hint}"
            node = node[part]
            walked.append(part)
    return None


def flag_error_message(error: Exception, argv: list[str]) -> str:
    """One line for an error of absl's flag parsing: an unknown ``--config.*`` key (found by
    loading the config file again, only on this error path), or the last line of the error
    (a config file's own exception arrives as a traceback inside the flag error)."""
    try:
        config = config_lib.load_config(config_path(argv))
    except Exception as e:  # the config file itself fails: report that
        error = e
    else:
        message = unknown_override(config, argv)
        if message:
            return message
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return re.sub(r"^[\w.]*(Error|Exception): ", "", last.strip())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error one ``error:`` line and exit status 2."""
    file = config_path(argv).partition(":")[0]
    if not os.path.isfile(file):
        fail(
            f"Config file {file!r} does not exist (relative paths start at {os.getcwd()}); give "
            "--config a file of experiments/configs/ or your own."
        )
    try:
        remaining = flags.FLAGS(argv)
        flags.FLAGS["config"].value.keys()  # ml_collections defers a failed load to first use
    except Exception as e:  # absl and ml_collections raise several types for a bad flag
        fail(flag_error_message(e, argv), e)
    return remaining


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


#: Errors that end a run with one message and exit status 2 (the traceback only with --verbose).
USER_ERRORS = (
    config_lib.ConfigError,
    ConfigMismatchError,
    WorkdirError,
    DataError,
    DataUnavailableError,
    FileNotFoundError,
    parallel_lib.DistributedSetupError,
)

#: ``OSError`` numbers that are the environment's, not a bug's: reported as one message.
WRITE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)


def fail(message: str, error: BaseException | None = None) -> None:
    """Prints ``error: message`` (after the traceback with ``--verbose``) and exits 2. Reads
    ``--verbose`` from ``sys.argv``: a flag error comes before the flags are parsed."""
    verbose = any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in sys.argv)
    if error is not None and verbose:
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
        config = _FLAGS["config"].value
        if config.get("parallel", {}).get("distributed", False):
            parallel_lib.initialize_distributed()  # before any other JAX call
        enable_compilation_cache()
        print(f"Work dir: {os.path.abspath(workdir)}", file=sys.stderr)
        with catching_ctrl_c():
            report = run_study(config, workdir, fresh=_FLAGS["fresh"].value)
            raise_if_interrupted()  # pressed during the last steps' work and swallowed there
    except NonFiniteLossError as e:
        fail(f"{e} Work dir: {workdir}.", e)
    except USER_ERRORS as e:
        fail(str(e), e)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        fail(
            f"cannot write {e.filename or workdir} ({e.strerror}). Free space or give --workdir "
            "a writable directory; rerunning the same command resumes from the last checkpoint.",
            e,
        )
    except KeyboardInterrupt as e:
        fail(
            f"interrupted. Rerunning the same command resumes from the last checkpoint "
            f"(work dir {workdir}).",
            e,
        )
    if parallel_lib.is_primary():
        print(report)
        print(f"Work dir: {os.path.abspath(workdir)}")


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def usage_on_help(argv: list[str]) -> None:
    """Prints the usage and exits 0 when ``argv`` asks for help (absl's help flag exits 1); call
    after the flags are defined."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True, exitcode=0)


def entry() -> None:
    """``python -m experiments.run``: Flax's ``main.py`` shape (flags, a config file loaded once,
    ``main``), with every mistake one ``error:`` line and exit status 2."""
    define_flags()
    usage_on_help(sys.argv)
    sys.argv[:] = config_first(sys.argv)
    app.run(main, argv=sys.argv, flags_parser=parse_flags)


if __name__ == "__main__":
    entry()
