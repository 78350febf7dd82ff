"""TorchJD's side of benchmarks/gramian_engine.py; runs in the TorchJD interpreter (_torchjd.py).

One configuration per process; memory: the first step's peak RSS (``VmHWM``, reset just
before the step through ``/proc/self/clear_refs``) minus the RSS before it.
``python _torchjd_autogram.py '<json spec>'`` prints one JSON line ``{"ms": [...], "rss_mib":
..., "versions": ...}``. Specs:

* ``{"mode": "sweep", "k": K, "hidden": H, "batch": B, "outputs": O, "weighting": "mean" |
  "upgrad", "rounds": R}``: the MLP ``H -> H -> H -> O`` (tanh) of the benchmark, losses
  ``mean_b ((f(x) @ c)[b, k] - y[b, k])^2`` (K objectives), ``autogram.Engine(model,
  batch_dim=None)``, the weighting, ``losses.backward(weights)``, an SGD step;
* ``{"mode": "iwrm", "data": "<npz path>", "hidden": H, "rounds": R, "weighting": ...}``: IWRM
  (every sample's cross-entropy an objective), ``Engine(model, batch_dim=0)``.

Each round times one whole step (forward, Gramian, weights, backward, SGD) with
``time.perf_counter``; the first step (warm-up) is not timed.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from torch import nn
from torchjd.aggregation import MeanWeighting, UPGradWeighting
from torchjd.autogram import Engine


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, d_out),
    )


def status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (kB -> MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss() -> None:
    """Resets ``VmHWM`` to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    weighting = UPGradWeighting() if spec.get("weighting", "mean") == "upgrad" else MeanWeighting()
    if spec["mode"] == "sweep":
        k, h, b, o = spec["k"], spec["hidden"], spec["batch"], spec["outputs"]
        model = mlp(h, h, o)
        x, y = torch.randn(b, h), torch.randn(b, k)
        proj = torch.randn(o, k) / o**0.5
        engine = Engine(model, batch_dim=None)

        def losses() -> torch.Tensor:
            return ((model(x) @ proj - y) ** 2).mean(dim=0)  # [K]

    else:
        data = np.load(spec["data"])
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
        model = mlp(x.shape[1], spec["hidden"], 10)
        engine = Engine(model, batch_dim=0)
        ce = nn.CrossEntropyLoss(reduction="none")

        def losses() -> torch.Tensor:
            return ce(model(x), y)  # [B]: every sample an objective

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = losses()
        gramian = engine.compute_gramian(loss)
        weights = weighting(gramian)
        opt.zero_grad()
        loss.backward(weights)
        opt.step()

    before = status_mib("VmRSS")
    reset_peak_rss()
    step()  # the first step: its peak RSS over the RSS before it
    grown = status_mib("VmHWM") - before
    times = []
    for _ in range(spec.get("rounds", 5)):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("torch", "torchjd")}
    print(
        json.dumps(
            {
                "ms": times,
                "rss_mib": grown,
                "versions": versions,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
