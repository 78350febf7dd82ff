"""The command line, for the CLI tests: run a command in a subprocess, check its one error line,
snapshot a work dir, make a directory read-only, apply ``--config.*`` overrides in-process."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from experiments import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(
    *args: str, module: str = "experiments.run", timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the repository root, on the CPU."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit 2, no traceback, exactly one ``error:`` line, matching ``pattern``."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]


def snapshot(path: str) -> dict[str, tuple[int, int]] | None:
    """Every file under ``path`` with its size and mtime (``None``: no such directory)."""
    if not os.path.exists(path):
        return None
    return {
        os.path.join(d, f): (
            os.stat(os.path.join(d, f)).st_size,
            os.stat(os.path.join(d, f)).st_mtime_ns,
        )
        for d, _, files in os.walk(path)
        for f in files
    }


@contextlib.contextmanager
def read_only(path: str) -> Iterator[None]:
    """``path`` (a directory) read-only for this process: ``chmod`` for a normal user; for root
    (whom permission bits do not stop), a read-only bind mount of it over itself, else the
    immutable attribute. Skips when none is possible here."""
    if os.geteuid() != 0:
        modes = {d: os.stat(d).st_mode for d, _, _ in os.walk(path)}
        for d in modes:
            os.chmod(d, 0o555)
        try:
            yield
        finally:
            for d, mode in modes.items():
                os.chmod(d, mode)
        return
    mounted = subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode == 0
    if mounted:
        ro = subprocess.run(["mount", "-o", "remount,bind,ro", path], capture_output=True)
        if ro.returncode == 0:
            try:
                yield
            finally:
                subprocess.run(["umount", path], check=True)
            return
        subprocess.run(["umount", path], check=True)
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0:
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
        return
    pytest.skip("cannot make a directory read-only here (root without mount or chattr)")


def coerce(text: str, default):
    """``text`` parsed as ml_collections parses an override of a key holding ``default``."""
    value = config_lib._parse_value(text)
    if isinstance(default, bool) or default is None:
        return value
    if isinstance(default, int | float) and isinstance(value, int | float):
        return type(default)(value)
    if isinstance(default, str) and not isinstance(value, str):
        return text
    return value


def apply_overrides(config, args) -> None:
    """Applies the ``--config.a.b=value`` arguments of ``args`` to ``config`` in place, typed as
    the command line would type them (other arguments are ignored)."""
    for arg in args:
        if arg.startswith("--config.") and "=" in arg:
            key, text = arg[len("--config.") :].split("=", 1)
            *sections, leaf = key.split(".")
            node = config
            for section in sections:
                node = node[section]
            with node.ignore_type():
                node[leaf] = coerce(text, node[leaf])
