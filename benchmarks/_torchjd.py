"""TorchJD in its own virtual environment, for the benchmarks that compare with it.

No project dependency gains PyTorch (issue 25): a benchmark that times TorchJD calls
:func:`torchjd_python`, which creates (once) a virtual environment with the CPU wheel of
``torch`` and ``torchjd[full]`` from the package registry and returns its interpreter. The
TorchJD side of a benchmark then runs as a script in that interpreter (``subprocess``), and
prints JSON the benchmark reads back.

The environment lives in ``$MTL_JAX_TORCHJD_VENV`` or ``~/.cache/mtl_jax/torchjd-venv``;
``python benchmarks/_torchjd.py`` creates it and prints the versions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv

DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "mtl_jax", "torchjd-venv")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PACKAGES = ("torch", "torchjd[full]")


def venv_dir() -> str:
    return os.environ.get("MTL_JAX_TORCHJD_VENV", DEFAULT_VENV)


def _python_in(path: str) -> str:
    return os.path.join(path, "bin", "python")


def _has_torchjd(python: str) -> bool:
    if not os.path.exists(python):
        return False
    probe = subprocess.run(
        [python, "-c", "import torch, torchjd"], capture_output=True, text=True, check=False
    )
    return probe.returncode == 0


def torchjd_python(path: str | None = None, quiet: bool = True) -> str:
    """The interpreter of a virtual environment holding ``torch`` (CPU) and ``torchjd[full]``,
    created at ``path`` (default :func:`venv_dir`) the first time. The CPU wheel's index is
    tried first; the default index (where the local mirror may hold it) second."""
    path = path or venv_dir()
    python = _python_in(path)
    if _has_torchjd(python):
        return python
    os.makedirs(os.path.dirname(path), exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    pip += ["-q"] if quiet else []
    cpu = subprocess.run(  # an unreachable CPU index fails fast, then the default one
        [*pip, "torch", "--extra-index-url", TORCH_CPU_INDEX, "--retries", "0", "--timeout", "10"],
        check=False,
    )
    if cpu.returncode != 0:
        subprocess.run([*pip, "torch"], check=True)
    subprocess.run([*pip, "torchjd[full]"], check=True)
    if not _has_torchjd(python):
        raise RuntimeError(f"{path}: torch and torchjd did not install; see pip's output above.")
    return python


def versions(python: str) -> dict[str, str]:
    """``{"torch": ..., "torchjd": ...}`` of the environment's interpreter."""
    code = (
        "import json, importlib.metadata as m; "
        "print(json.dumps({p: m.version(p) for p in ('torch', 'torchjd')}))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run_json(python: str, script: str, args: list[str]) -> dict:
    """Runs ``script`` with ``args`` in the TorchJD interpreter; its last stdout line is JSON."""
    out = subprocess.run([python, script, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    exe = torchjd_python(quiet=False)
    print(exe, versions(exe), file=sys.stdout)
