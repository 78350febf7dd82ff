"""Every shell command shown in README.md and docs/ (not docs/design/) works as written.

The commands come from the pages themselves: fenced ``bash`` / ``sh`` / ``shell`` / ``console``
blocks (``console``: the ``$`` lines), blocks without a language whose lines are commands, and
inline code that is a command (``python ...``, ``pip ...``, or the ``--config ...`` arguments of
``python -m experiments.run``). A line is split at ``&&`` / ``;`` into parts; ``NAME=value``
prefixes become the environment; a part ending in ``&`` runs next to the following ones.
Placeholders: ``[...]`` is optional and dropped, ``experiments/configs/<name>.py`` stands for every
config file, ``DIR`` after ``experiments.report --workdir`` is the work dir of the main job (run
first, in the same case).

Each case runs in a fresh directory with ``experiments/`` and ``benchmarks/`` linked in (relative
paths resolve as from the repository root; work dirs land there), an empty ``$TFDS_DATA_DIR``, and
the overrides of :func:`tiny_overrides` appended (one seed, one epoch, a few hundred examples, no
downloads). It must then do what a user gets: a report (exit 0), or, for a data set that needs a
download or a folder that is not there, the one-message "not downloaded" / "not found" error
(exit 2, no traceback) -- never a config error. Identical commands (after expansion) run once.

Commands that cannot run in a test are in :data:`SKIPPED`, each with its reason. Any other shape
(a new launcher, an unknown placeholder, a benchmark without tiny arguments) fails
:func:`test_every_documented_command_is_runnable_or_skipped` -- also in the quick loop
(``-m "not slow"``) -- until it is made runnable here or listed there with a reason.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import re
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import config as config_lib
from experiments import run as run_lib
from experiments import studies
from tests._cli import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = [
    "README.md",
    *sorted(
        os.path.relpath(path, ROOT)
        for path in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
        if os.sep + "design" + os.sep not in path and os.sep + "_build" + os.sep not in path
    ),
]
CONFIG_FILES = sorted(
    os.path.relpath(path, ROOT)
    for path in glob.glob(os.path.join(ROOT, "experiments/configs/*.py"))
)
TIMEOUT_S = 900  # one part; a tiny recon run took 265 s at load 7 on 2 cores

#: (pattern matched against a part as written, reason): the parts that do not run here. Review
#: an addition like code: the reason must say where else the command is exercised.
SKIPPED: list[tuple[str, str]] = [
    (r"python3? -m venv \S+", "creates a virtual environment; the tests run inside one"),
    (r"(\.|source) \S*bin/activate", "activates the environment the tests run in"),
    (
        r"pip3? install .*",
        "installs packages (network); .ci/run installs requirements-dev.txt -e . in a fresh venv",
    ),
    (r"python3? -m pytest( .*)?", "the test command itself; .ci/run runs the full suite"),
    (
        r"python3? -m sphinx .*",
        "builds the site; .ci/run builds it with -W and tests/test_docs.py runs every example",
    ),
    (r"--config\.x=y", "the override syntax: x and y are placeholders"),
    (
        r"python3? -m experiments\.toy .*",
        "the two-objective toy (minutes); tests/test_toy.py runs its CLI with tiny --steps",
    ),
    (
        r"srun .*",
        "needs a SLURM allocation; the JAX_* launch line runs here as local processes "
        "(and in tests/test_multidevice.py)",
    ),
]

#: Tiny arguments per benchmark script (``python benchmarks/<script> ...`` in the docs).
TINY_BENCHMARK_ARGS: dict[str, list[str]] = {}

SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh", "shell-session"}
_ENV = r"(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*"
_PROGRAM = r"(?:python3?|pip3?|bash|sh|tfds|git|ruff|uv|conda|torchrun|mpirun|srun|\.|source)"
COMMAND_LINE = re.compile(rf"^\$?\s*{_ENV}{_PROGRAM}(?:\s|$)")
INLINE_COMMAND = re.compile(rf"^{_ENV}{_PROGRAM}\s+\S|^--config(?:\s+\S|\.\S+=)")
EXPERIMENTS_RUN = ("python", "-m", "experiments.run")


# ---------------------------------------------------------------------------------------------
# Finding the commands


@dataclasses.dataclass(frozen=True)
class Shown:
    """One command as the docs show it: ``where`` is ``file:line``."""

    where: str
    text: str


def _fenced_commands(path: str, lines: list[str]) -> list[Shown]:
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening.group(2), opening.group(3).strip()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = list(enumerate(lines[i + 1 : end], start=i + 2))
        words = info.split()
        if words and words[0] in ("{code-block}", "{code}", "{prompt}") and len(words) > 1:
            words = words[1:]
        language = words[0] if words else ""
        content = [(n, t) for n, t in body if t.strip() and not t.lstrip().startswith("#")]
        if language == "console":
            content = [(n, t.strip()[1:].strip()) for n, t in content if t.strip().startswith("$")]
        elif language in SHELL_LANGUAGES:
            content = [(n, re.sub(r"^\$\s*", "", t.strip())) for n, t in content]
        elif language == "" and any(COMMAND_LINE.match(t.strip()) for _, t in content):
            content = [(n, re.sub(r"^\$\s*", "", t.strip())) for n, t in content]
        else:
            content = []
        joined: list[tuple[int, str]] = []
        for n, text in content:  # backslash continuations
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1].rstrip() + " " + text)
            else:
                joined.append((n, text))
        found += [Shown(f"{path}:{n}", text) for n, text in joined]
        i = end + 1
    return found


def _inline_commands(path: str, text: str) -> list[Shown]:
    prose = re.sub(
        r"^\s*(`{3,}|~{3,}).*?^\s*\1\s*$",
        lambda m: "\n" * m.group(0).count("\n"),
        text,
        flags=re.S | re.M,
    )
    found = []
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        span = " ".join(match.group(1).split())
        if INLINE_COMMAND.match(span):
            found.append(Shown(f"{path}:{prose.count(chr(10), 0, match.start()) + 1}", span))
    return found


def documented_commands() -> list[Shown]:
    """Every command of :data:`DOC_FILES`, in order of appearance."""
    found = []
    for path in DOC_FILES:
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        found += _fenced_commands(path, text.splitlines())
        found += _inline_commands(path, text)
    return found


# ---------------------------------------------------------------------------------------------
# What each command is


@dataclasses.dataclass(frozen=True)
class Part:
    """One program to start: ``argv[0]`` is ``python`` (this interpreter)."""

    kind: str  # "run" | "report" | "benchmark"
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    background: bool = False
    #: a multi-process launch (``JAX_PROCESS_ID=<0 or 1>``): the extra environment of each
    #: process, all started together
    processes: tuple[tuple[tuple[str, str], ...], ...] = ((),)


class UnknownCommand(ValueError):
    pass


def split_parts(text: str) -> list[tuple[str, bool]]:
    """``a && b; c & d  # note`` -> ``[("a", False), ("b", False), ("c", True), ("d", False)]``
    (the flag: runs in the background); the comment dropped, quoted text kept as written.

    Raises:
      UnknownCommand: a pipe or ``||``.
    """
    parts, start, quote, i = [], 0, "", 0
    while i < len(text):
        char = text[i]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            break
        elif char in "&;|":
            operator = text[i : i + 2] if text[i : i + 2] in ("&&", "||") else char
            if "|" in operator:
                raise UnknownCommand(f"{operator!r} in {text!r}: pipes and || are not run here")
            parts.append((text[start:i].strip(), operator == "&"))
            i += len(operator)
            start = i
            continue
        i += 1
    parts.append((text[start:i].strip(), False))
    return [(part, background) for part, background in parts if part]


def skip_reason(part: str) -> str | None:
    for pattern, reason in SKIPPED:
        if re.fullmatch(pattern, part):
            return reason
    return None


def _drop_optional(tokens: list[str]) -> list[str]:
    """``[--workdir DIR]`` and other ``[...]`` groups are optional: drop them."""
    kept, depth = [], 0
    for token in tokens:
        if token.startswith("[") or depth:
            depth += token.count("[") - token.count("]")
            continue
        kept.append(token)
    return kept


def _expand(tokens: list[str]) -> list[list[str]]:
    """``experiments/configs/<name>.py`` -> one argv per config file."""
    for i, token in enumerate(tokens):
        if "experiments/configs/<name>.py" in token:
            return [
                [
                    *tokens[:i],
                    token.replace("experiments/configs/<name>.py", path),
                    *tokens[i + 1 :],
                ]
                for path in CONFIG_FILES
            ]
    return [tokens]


def parse_part(part: str, background: bool) -> list[Part]:
    """The runnable :class:`Part` s of one documented part (several for ``<name>``).

    Raises:
      UnknownCommand: a shape this test does not know how to run.
    """
    joined = re.sub(r"<[^<>]*>", lambda m: m.group(0).replace(" ", "\x01"), part)
    tokens = [t.replace("\x01", " ") for t in shlex.split(joined)]  # <0 or 1>: one token
    env, processes = [], [()]
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        name, value = tokens.pop(0).split("=", 1)
        choices = re.fullmatch(r"<(.+)>", value)
        if choices and len(processes) == 1:  # one process per value
            values = re.split(r"\s+or\s+|\s*[,|]\s*", choices.group(1).strip())
            processes = [((name, v),) for v in values]
        else:
            env.append((name, value))
    tokens = _drop_optional(tokens)
    if tokens and tokens[0].startswith("--config"):
        tokens = [*EXPERIMENTS_RUN, *tokens]  # inline arguments of the runner
    if tokens and tokens[0] in ("python", "python3"):
        tokens[0] = "python"
    if tuple(tokens[:3]) == EXPERIMENTS_RUN:
        kind = "run"
    elif tuple(tokens[:3]) == ("python", "-m", "experiments.report"):
        kind = "report"
    elif len(tokens) > 1 and tokens[0] == "python" and tokens[1].startswith("benchmarks/"):
        script = os.path.basename(tokens[1])
        if script not in TINY_BENCHMARK_ARGS:
            raise UnknownCommand(
                f"benchmark {script} has no tiny arguments: add them to TINY_BENCHMARK_ARGS"
            )
        kind = "benchmark"
    else:
        raise UnknownCommand(f"no runner for {part!r}")
    out = []
    for argv in _expand(tokens):
        left = [t for t in argv if re.search(r"<[^>]*>", t)]
        if left:
            raise UnknownCommand(f"placeholder {left} in {part!r}")
        if kind == "run":
            argv = _without_default_config(argv)
        out.append(Part(kind, tuple(argv), tuple(env), background, tuple(processes)))
    return out


def _without_default_config(argv: list[str]) -> list[str]:
    """``--config experiments/configs/default.py`` is the default: the same run as without it."""
    path = run_lib.config_path(["run", *argv[3:]])
    if os.path.abspath(os.path.join(ROOT, path)) != os.path.abspath(run_lib.DEFAULT_CONFIG):
        return argv
    return [a for a in argv if a not in ("--config", f"--config={path}", path)]


def classify(shown: Shown) -> tuple[list[list[Part]], list[tuple[str, str]]]:
    """``(runnable alternatives per part, [(skipped part, reason)])``."""
    runnable, skipped = [], []
    for part, background in split_parts(shown.text):
        reason = skip_reason(part)
        if reason:
            skipped.append((part, reason))
        else:
            runnable.append(parse_part(part, background))
    return runnable, skipped


# ---------------------------------------------------------------------------------------------
# Tiny runs


def _flat(config, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolved_config(argv: tuple[str, ...]):
    """The config ``python -m experiments.run <argv>`` trains (its config argument applied; study
    section defaults added), its config path resolved from the repository root."""
    args = list(argv[3:])
    path = run_lib.config_path(["run", *args])
    if not os.path.isabs(path):
        path = os.path.join(ROOT, path)
    config = config_lib.load_config(path)
    studies.with_study_section(config)
    apply_overrides(config, args)  # the command's own overrides, typed as on the command line
    return config


def tiny_overrides(argv: tuple[str, ...]) -> list[str]:
    """``--config.*`` overrides that make ``python -m experiments.run <argv>`` tiny, for keys the
    command does not set itself: one seed, no single-task references, 1 epoch for every
    ``epochs`` / ``*_epochs`` key (study phases too), 256 train / 64 test and val examples, batch
    32, the first method of every study section's ``methods`` and no ``controls`` runs (the
    command's own top-level ``methods`` stay), no downloads, no plots or progress bars."""
    given = {a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")}
    out = []
    for key, value in _flat(resolved_config(argv)).items():
        if key in given:
            continue
        section, _, leaf = key.rpartition(".")
        new = None
        if key == "seeds" and len(value) > 1:
            new = "(0,)"
        elif key == "single_task" and value:
            new = "False"
        elif key in ("report.plots", "report.progress") and value:
            new = "False"
        elif re.fullmatch(r"(\w+_)?epochs", leaf) and "every" not in leaf and value > 1:
            new = "1"
        elif re.fullmatch(r"max_train_examples", leaf) and not 0 < value <= 256:
            new = "256"
        elif re.fullmatch(r"max_\w+_examples", leaf) and not 0 < value <= 64:
            new = "64"
        elif key == "train.batch_size" and value > 32:
            new = "32"
        elif key == "train.eval_batch_size" and value > 64:
            new = "64"
        elif key == "dataset.download" and value:
            new = "False"
        elif key == "methods" and "methods" not in given and len(value) > 1:
            new = repr(tuple(value[:1]))
        elif section and leaf == "methods" and len(value) > 1:
            new = repr(tuple(value[:1]))
        elif section and leaf == "controls" and value:
            new = "()"
        if new is not None:
            out.append(f"--config.{key}={new}")
    return out


def expected_outcome(argv: tuple[str, ...], cwd: str) -> str:
    """``"report"`` (exit 0), ``"not downloaded"`` (a TFDS data set), ``"not found"`` (a data
    folder that is not there) or ``"list"``."""
    if "--list" in argv:
        return "list"
    dataset = resolved_config(argv).dataset
    if "download" in dataset:
        return "not downloaded"
    if "root" in dataset and not os.path.isdir(os.path.join(cwd, str(dataset.root))):
        return "not found"
    return "report"


def _write_arrays_file(path: str) -> None:
    """The README's "your own data" file: ``train_image`` / ``test_image`` and one label array
    per task (3-class "row", 2-class "parity")."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 96), ("test", 32)):
        labels = rng.integers(0, 3, size=n)
        images = np.zeros((n, 8, 8), np.uint8)
        images[np.arange(n), 2 * labels] = 255
        arrays.update({f"{split}_image": images, f"{split}_row": labels})
        arrays[f"{split}_parity"] = labels % 2
    np.savez(path, **arrays)


def _prepare_inputs(argv: tuple[str, ...], cwd: str) -> None:
    """Files a documented command expects the user to have made (the docs say how)."""
    if argv[:3] != EXPERIMENTS_RUN or "--list" in argv:
        return
    dataset = resolved_config(argv).dataset
    if "path" in dataset and dataset.path and not os.path.isabs(dataset.path):
        if dataset.name != "arrays":
            raise UnknownCommand(f"no test input for data set {dataset.name!r} at {dataset.path}")
        _write_arrays_file(os.path.join(cwd, dataset.path))


# ---------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
    parts: list[Part]  # run in order; the report after the main job
    where: list[str]

    @property
    def id(self) -> str:
        first = self.parts[0]
        words = [a for a in first.argv[3 if first.kind != "benchmark" else 1 :]]
        words = [os.path.basename(w) if w.startswith("experiments/configs/") else w for w in words]
        later = [f"+{p.kind}" for p in self.parts[1:]]
        slug = re.sub(r"[^A-Za-z0-9_.:=,+-]+", "_", " ".join([first.kind, *words, *later]))
        return slug[:80].strip("_")


def build_cases() -> tuple[list[Case], list[tuple[Shown, str]], list[tuple[Shown, str, str]]]:
    """``(cases, [(command, why it is unknown)], [(command, skipped part, reason)])``; identical
    commands are one case (all places listed). A command line that starts with a report runs
    after the main job (``python -m experiments.run``), in its case."""
    cases: dict[tuple, Case] = {}
    unknown, skipped = [], []
    for shown in documented_commands():
        try:
            runnable, skips = classify(shown)
        except (UnknownCommand, ValueError) as e:
            unknown.append((shown, str(e)))
            continue
        skipped += [(shown, part, reason) for part, reason in skips]
        for parts in itertools.product(*runnable) if runnable else []:  # one per <name> value
            if parts[0].kind == "report":
                parts = (Part("run", EXPERIMENTS_RUN), *parts)
                main = cases.setdefault(_key(parts[:1]), Case(list(parts[:1]), []))
                main.parts += [p for p in parts[1:] if p not in main.parts]
                main.where.append(shown.where)
                continue
            cases.setdefault(_key(parts), Case(list(parts), [])).where.append(shown.where)
    return list(cases.values()), unknown, skipped


def _key(parts) -> tuple:
    """Commands that differ only in ``--workdir`` run the same thing: one case."""
    return tuple((_without_workdir(p.argv), p.env, p.background, p.processes) for p in parts)


def _without_workdir(argv: tuple[str, ...]) -> tuple[str, ...]:
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--workdir="):
            skip = False
            continue
        skip = arg == "--workdir"
        if not skip:
            out.append(arg)
    return tuple(out)


CASES, UNKNOWN, SKIPPED_SEEN = build_cases()


def _trains(case: Case) -> bool:
    """Whether the case trains (``slow``); a config that does not resolve counts as training
    (:func:`test_every_documented_command_is_runnable_or_skipped` names the error)."""
    try:
        outcomes = [expected_outcome(p.argv, ROOT) for p in case.parts if p.kind == "run"]
    except Exception:
        return True
    return "report" in outcomes or any(p.kind == "benchmark" for p in case.parts)


def test_every_documented_command_is_runnable_or_skipped():
    message = "\n".join(
        f"{shown.where}: `{shown.text}`: {why}. Make it runnable in tests/test_commands.py or "
        "add it to SKIPPED with a reason."
        for shown, why in UNKNOWN
    )
    assert not UNKNOWN, message
    # every documented override names a key of its config (checked here, without running)
    for case in CASES:
        for part in case.parts:
            if part.kind == "run" and "--list" not in part.argv:
                try:
                    tiny_overrides(part.argv)
                except Exception as e:
                    raise AssertionError(f"{case.where}: {' '.join(part.argv)}: {e!r}") from e
    # the docs still show the commands the test relies on, and every skip reason is used
    assert any(p.argv == EXPERIMENTS_RUN for case in CASES for p in case.parts)
    used = {re.sub(r"\s+", " ", reason) for _, _, reason in SKIPPED_SEEN}
    unused = [pattern for pattern, reason in SKIPPED if reason not in used]
    assert not unused, f"SKIPPED entries that match no documented command: {unused}"


def test_the_parser_finds_commands_in_every_form():
    text = "\n".join(
        [
            "Run `python -m experiments.run --config.seeds=(0,)` or `--config experiments/x.py`;",
            "`--config.dataset.name` is a key, `python` a word.",
            "```bash",
            "# a comment",
            "A=1 python -m experiments.run \\",
            "  --config.train.epochs=2 && python -m experiments.report --workdir DIR",
            "```",
            "```console",
            "$ pip install -e .",
            "output line",
            "```",
            "```",
            "mtl_jax/   the library",
            "```",
            "```text",
            "python not a command here",
            "```",
        ]
    )
    found = _fenced_commands("x.md", text.splitlines()) + _inline_commands("x.md", text)
    assert [(s.where, s.text) for s in found] == [
        ("x.md:5", "A=1 python -m experiments.run --config.train.epochs=2 && "
         "python -m experiments.report --workdir DIR"),
        ("x.md:9", "pip install -e ."),
        ("x.md:1", "python -m experiments.run --config.seeds=(0,)"),
        ("x.md:1", "--config experiments/x.py"),
    ]  # fmt: skip
    runnable, skipped = classify(found[0])
    assert runnable[0][0] == Part(
        "run", (*EXPERIMENTS_RUN, "--config.train.epochs=2"), (("A", "1"),)
    )
    assert runnable[1][0].kind == "report" and not skipped
    assert classify(found[1]) == ([], [("pip install -e .", SKIPPED[2][1])])
    with pytest.raises(UnknownCommand, match="placeholder"):
        parse_part("python -m experiments.run --workdir <somewhere>", False)
    with pytest.raises(UnknownCommand, match="no runner"):
        parse_part("torchrun --nproc 2 train.py", False)
    expanded = parse_part("python -m experiments.run --config experiments/configs/<name>.py", False)
    assert len(expanded) == len(CONFIG_FILES) >= 2
    assert [p.argv for p in parse_part("python -m experiments.run [--workdir DIR]", False)] == [
        EXPERIMENTS_RUN
    ]
    assert split_parts("A=1 python a & python b") == [("A=1 python a", True), ("python b", False)]
    (launch,) = parse_part("A=h:1 ID=<0 or 1> python -m experiments.run --workdir /s/w", False)
    assert launch.env == (("A", "h:1"),) and launch.processes == ((("ID", "0"),), (("ID", "1"),))
    assert _local_paths(list(launch.argv), "/tmp/c")[-1] == "/tmp/c/s/w"


def test_tiny_overrides_keep_what_the_command_sets():
    argv = (*EXPERIMENTS_RUN, "--config", "experiments/configs/default.py", "--config.seeds=(1,2)")
    tiny = tiny_overrides(argv)
    assert "--config.train.epochs=1" in tiny and "--config.single_task=False" in tiny
    assert not any(a.startswith("--config.seeds=") for a in tiny)
    argv = (
        *EXPERIMENTS_RUN,
        "--config",
        "experiments/configs/default.py:dataset=multi_mnist,model=lenet",
    )
    assert "--config.dataset.download=False" in tiny_overrides(argv)
    assert expected_outcome(argv, ROOT) == "not downloaded"


def test_ci_runs_the_readme_test_command_and_selects_every_test():
    shown = [s for s in documented_commands() if s.where.startswith("README.md:")]
    commands = [part for s in shown for part, _ in split_parts(s.text)]
    (suite,) = {c for c in commands if re.fullmatch(r"python -m pytest -q -n 2 tests", c)}
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert re.search(rf"^{re.escape(suite)} \|\| status=\$\?$", ci, re.M), ci
    assert "unset PYTEST_ADDOPTS" in ci  # the suite command above deselects nothing
    tiers = [c for c in commands if re.search(r"pytest .*-m ", c)]  # the README's quick tier
    assert tiers == ["python -m pytest -q -n 2 -m quick tests"], tiers


def _run_case(case: Case, tmp_path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("experiments", "benchmarks"):
        os.symlink(os.path.join(ROOT, name), cwd / name)
    base_env = dict(os.environ, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=str(tmp_path / "tfds"))
    base_env = {k: v for k, v in base_env.items() if k not in LOCAL_ENV}
    workdir = None  # of the last run: a report's DIR
    pending: list[tuple[Part, subprocess.Popen, list[str]]] = []
    for part in case.parts:
        argv = list(part.argv)
        extra: list[str] = []
        if part.kind == "run" and "--list" not in argv:
            _prepare_inputs(part.argv, str(cwd))
            extra = tiny_overrides(part.argv)
        elif part.kind == "benchmark":
            extra = TINY_BENCHMARK_ARGS[os.path.basename(argv[1])]
        argv = _local_paths(argv, str(cwd))
        if part.kind == "report":
            assert workdir, "the report needs a run's work dir"
            argv = [workdir if a == "DIR" else a for a in argv]
        env = dict(base_env, **dict(part.env))
        env.update({k: LOCAL_ENV[k]() for k in env if k in LOCAL_ENV})
        for process_env in part.processes:
            proc = subprocess.Popen(
                [sys.executable, *argv[1:], *extra],
                cwd=cwd,
                env=dict(env, **dict(process_env)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            pending.append((part, proc, extra))
        if part.background:
            continue
        try:
            for started, process, added in pending:
                stdout, stderr = process.communicate(timeout=TIMEOUT_S)
                made = _check(started, process.returncode, stdout, stderr, added, case, str(cwd))
                workdir = made or workdir
        finally:  # a failed process leaves no waiting partner behind
            for _, process, _ in pending:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
        pending = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


#: Variables whose documented value names another machine: this one's in the test.
LOCAL_ENV = {"JAX_COORDINATOR_ADDRESS": lambda: f"localhost:{_free_port()}"}


def _local_paths(argv: list[str], cwd: str) -> list[str]:
    """An absolute ``--workdir`` (``/shared/workdirs/run1``) moves under the case's directory."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--workdir="):
            path = arg.split("=", 1)[1]
            if os.path.isabs(path):
                out[i] = "--workdir=" + os.path.join(cwd, path.lstrip("/"))
        elif i > 0 and out[i - 1] == "--workdir" and os.path.isabs(arg):
            out[i] = os.path.join(cwd, arg.lstrip("/"))
    return out


def _check(part: Part, rc: int, stdout: str, stderr: str, extra, case: Case, cwd: str):
    shown = " ".join(shlex.quote(a) for a in (*part.argv, *extra))
    context = f"`{shown}` (shown at {', '.join(case.where)}), exit {rc}:\n{stderr[-3000:]}"
    expected = expected_outcome(part.argv, cwd) if part.kind == "run" else "ok"
    if expected in ("report", "list", "ok"):
        assert rc == 0, context
        assert "Traceback" not in stderr, context
        if expected == "list":
            assert "Studies" in stdout and "Methods" in stdout, stdout
        if expected == "report":
            # every process names the work dir (on stderr); process 0 prints the report
            workdir = re.findall(r"^Work dir: (.+)$", stdout + stderr, re.M)
            assert workdir and os.path.isfile(os.path.join(workdir[-1], "report.md")), context
            return workdir[-1]
        if part.kind == "report":
            assert "|" in stdout, stdout[-2000:]  # the comparison table
        return None
    # a data set that is not here: one clear message, exit 2, no config error
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert rc == 2 and "Traceback" not in stderr and len(errors) == 1, context
    assert "config key" not in errors[0].lower(), context
    assert expected in stderr, context
    return None


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, id=case.id, marks=[pytest.mark.slow] if _trains(case) else [])
        for case in CASES
    ],
)
def test_documented_command(case: Case, tmp_path):
    _run_case(case, tmp_path)
