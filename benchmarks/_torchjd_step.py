"""The PyTorch / TorchJD side of ``benchmarks/vs_torchjd.py``, run in TorchJD's own virtual
environment (``benchmarks/_torchjd.py``): a small server reading one JSON command per stdin line
and answering one JSON line, so that the JAX process can interleave its rounds with ours.

Commands:

* ``{"cmd": "setup", "name": N, "model": "mlp" | "conv", "K": K, "mode": M, "batch": B}``
  builds variant N: ``mode`` is ``"jd"`` (``mtl_backward`` + ``jac_to_grad(aggregator)`` on the
  shared parameters, then SGD; ``"aggregator"`` names it: ``"pcgrad"`` or ``"upgrad"``) or
  ``"joint"`` (one backward of the summed loss, SGD). Runs 3 warm-up steps.
* ``{"cmd": "run", "name": N, "inner": n}``: ``n`` steps; answers ``{"ms": ms per step}``.
* ``{"cmd": "info"}``: versions and threads.

The models are those of ``benchmarks/step_time.py`` (MLP trunk 784-512-512-256, heads
256-64-10, cross-entropy) and ``experiments/models/small_resnet.py`` (stem + 3 BasicBlocks with
BatchNorm in training mode, widths 8-16-32, pool, fc 32 + ReLU; linear heads 32-10) on
``[B, 1, 16, 16]`` inputs (NCHW, PyTorch's native layout).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torchjd
from torch import nn
from torch.nn import functional as F
from torchjd.aggregation import PCGrad, UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward

AGGREGATORS = {"pcgrad": PCGrad, "upgrad": UPGrad}


def mlp(num_tasks: int):
    trunk = nn.Sequential(
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
    )
    heads = nn.ModuleList(
        nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)) for _ in range(num_tasks)
    )
    return trunk, heads, (784,)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


def small_resnet(num_tasks: int, widths=(8, 16, 32), feature_dim: int = 32):
    trunk = nn.Sequential(
        nn.Conv2d(1, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
        BasicBlock(widths[0], widths[0], 1),
        BasicBlock(widths[0], widths[1], 2),
        BasicBlock(widths[1], widths[2], 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[2], feature_dim),
        nn.ReLU(),
    )
    heads = nn.ModuleList(nn.Linear(feature_dim, 10) for _ in range(num_tasks))
    return trunk, heads, (1, 16, 16)


def build(model: str, num_tasks: int, mode: str, batch: int, aggregator: str):
    torch.manual_seed(0)
    trunk, heads, shape = (mlp if model == "mlp" else small_resnet)(num_tasks)
    x = torch.randn(batch, *shape)
    ys = torch.randint(0, 10, (num_tasks, batch))
    params = [*trunk.parameters(), *heads.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)
    agg = AGGREGATORS[aggregator]()
    shared = list(trunk.parameters())

    def step() -> None:
        z = trunk(x)
        losses = [F.cross_entropy(h(z), y) for h, y in zip(heads, ys, strict=True)]
        if mode == "joint":
            torch.stack(losses).sum().backward()
        else:
            mtl_backward(losses, features=z)
            jac_to_grad(shared, agg)
        opt.step()
        opt.zero_grad()

    return step


def main() -> None:
    torch.set_grad_enabled(True)
    steps = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "info":
            import importlib.metadata as md

            out = {
                "torch": torch.__version__,
                "torchjd": md.version("torchjd"),
                "threads": torch.get_num_threads(),
                "ok": torchjd is not None,
            }
        elif cmd["cmd"] == "setup":
            step = build(
                cmd["model"], cmd["K"], cmd["mode"], cmd["batch"], cmd.get("aggregator", "pcgrad")
            )
            for _ in range(3):
                step()
            steps[cmd["name"]] = step
            out = {"ok": True}
        elif cmd["cmd"] == "run":
            step = steps[cmd["name"]]
            start = time.perf_counter()
            for _ in range(cmd["inner"]):
                step()
            out = {"ms": 1e3 * (time.perf_counter() - start) / cmd["inner"]}
        else:
            out = {"error": f"unknown command {cmd['cmd']!r}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
