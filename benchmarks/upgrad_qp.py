"""UPGrad's K dual QPs at large K: ``upgrad_weights(G)`` against TorchJD's ``UPGradWeighting``.

One run, interleaved rounds, medians; prints a markdown table with ``uptime`` before and after.
Also the warm start's steps and certified rows. Two families of ``G = J J^T`` at K = 16, 64, 128, 256:

* ``gaussian``: ``J[K, 2K]`` with i.i.d. normal entries (few conflicts resolve at once);
* ``iwrm``: ``J`` = per-sample gradients of a small MLP (144 -> 32 -> 10, random init,
  cross-entropy on the ``left`` digit) on the embedded ``multi_digits`` data: the instance-wise
  objectives of issue 24, where many pairs of samples conflict.

TorchJD runs in its own venv (:func:`benchmarks._torchjd.torchjd_python`); ``G`` goes there as an
``.npz`` file and the timing happens inside that process. Agreement: ``max |w - w_ref| / max |w|``
against TorchJD (which normalises ``G`` by its trace and adds ``1e-4 I``: ~1e-4 expected) and
against an unregularised float64 reference (SciPy's NNLS per problem on a factor of ``G``).

    python benchmarks/upgrad_qp.py [--ks 16,64,128,256] [--rounds 5] [--old /tmp/p28/old_qp.py]

``--old`` also times a previous ``_qp.py`` (e.g. ``git show HEAD:mtl_jax/weighting/_qp.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._torchjd import torchjd_python
from mtl_jax.weighting import upgrad_weights

TORCHJD_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
from torchjd.aggregation import UPGradWeighting
data = np.load(sys.argv[1])
rounds = int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
out = {}
for key in data.files:
    G = torch.as_tensor(data[key], dtype=torch.float32)
    weighting = UPGradWeighting()
    w = weighting(G)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        w = weighting(G)
        times.append(time.perf_counter() - start)
    try:  # the same quadprog projections without TorchJD's ridge (G full rank: still PD)
        from torchjd._linalg._dual_cone import QuadprogProjector

        projector = QuadprogProjector(reg_eps=0.0)
        w_noreg = UPGradWeighting(projector=projector)(G).double().tolist()
    except Exception:
        w_noreg = None
    out[key] = {"times": times, "w": w.double().tolist(), "w_noreg": w_noreg}
print(json.dumps(out))
"""


def gaussian_gram(k: int, seed: int = 0) -> np.ndarray:
    """``G = J J^T``, ``J[K, 2K]`` standard normal."""
    J = np.random.default_rng(seed).normal(size=(k, 2 * k))
    return J @ J.T


def iwrm_gram(k: int, seed: int = 0, hidden: int = 32) -> np.ndarray:
    """``G = J J^T``, ``J[K, P]``: per-sample gradients of a 144 -> hidden -> 10 MLP (tanh,
    random init) with cross-entropy on the ``left`` digit of K ``multi_digits`` images."""
    from experiments.data.registry import make_dataset

    data = make_dataset({"name": "multi_digits"}).train.arrays
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data["left"]), size=k, replace=False)
    x = np.asarray(data["image"][idx].reshape(k, -1), np.float64)
    y = jnp.asarray(data["left"][idx])

    def loss(p, xi, yi):
        logits = jnp.tanh(xi @ p["w1"]) @ p["w2"]
        return -jax.nn.log_softmax(logits)[yi]

    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(seed), 2)
        params = {
            "w1": jax.random.normal(keys[0], (x.shape[1], hidden), jnp.float64)
            / np.sqrt(x.shape[1]),
            "w2": jax.random.normal(keys[1], (hidden, 10), jnp.float64) / np.sqrt(hidden),
        }
        xs = jnp.asarray(x, jnp.float64)
        grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xs, y)
        J = np.concatenate([np.asarray(g).reshape(k, -1) for g in jax.tree.leaves(grads)], 1)
    return J @ J.T


def reference_weights(G: np.ndarray) -> np.ndarray:
    """UPGrad's weights in float64 without regularisation: for each ``u = e_i / K``,
    ``min_{x >= 0} |L^T (u + x)|^2`` (``G = L L^T``) by SciPy's NNLS."""
    k = G.shape[0]
    vals, vecs = np.linalg.eigh(G)
    L = vecs * np.sqrt(np.clip(vals, 0, None))  # G = L L^T, L[K, K]
    A = L.T  # |A v|^2 = v^T G v
    w = np.zeros(k)
    for i in range(k):
        u = np.zeros(k)
        u[i] = 1.0 / k
        x, _ = scipy.optimize.nnls(A, -A @ u, maxiter=50 * k)
        w += u + x
    return w


def load_solver(path: str):
    """``upgrad_weights`` with the ``project_weights`` of another ``_qp.py`` file."""
    spec = importlib.util.spec_from_file_location("old_qp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    @jax.jit
    def weights(gram):
        k = gram.shape[0]
        return jnp.sum(module.project_weights(gram, jnp.eye(k, dtype=gram.dtype) / k), axis=0)

    return weights


def warm_start_stats(gram: jax.Array) -> tuple[int, int]:
    """Steps of the primal-dual active-set warm start and rows it certified (internals of
    ``mtl_jax.weighting._qp``: rows it does not certify run Lawson-Hanson)."""
    from mtl_jax.weighting import _qp
    from mtl_jax.weighting.base import diag_scale

    G = gram / diag_scale(gram)
    G = 0.5 * (G + G.T)
    k = G.shape[0]
    _, certified, steps = jax.jit(_qp._solve, static_argnums=2)(
        G, jnp.eye(k, dtype=G.dtype) / k, 4 * k + 20
    )
    return int(steps), int(np.sum(certified))


def time_call(fn, arg, rounds: int) -> list[float]:
    jax.block_until_ready(fn(arg))  # compile
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    return times


def run_torchjd(grams: dict[str, np.ndarray], rounds: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "grams.npz")
        np.savez(path, **grams)
        script = os.path.join(tmp, "torchjd_upgrad.py")
        with open(script, "w") as f:
            f.write(TORCHJD_SCRIPT)
        result = subprocess.run(
            [torchjd_python(), script, path, str(rounds), str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="16,64,128,256")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old", default=None, help="a previous _qp.py to time beside")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-reference", action="store_true", help="skip SciPy's NNLS check")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    print(f"uptime before: {uptime()}\n")
    grams = {
        f"{family}_{k}": builder(k)
        for k in ks
        for family, builder in (("gaussian", gaussian_gram), ("iwrm", iwrm_gram))
    }
    new = jax.jit(upgrad_weights)
    old = load_solver(args.old) if args.old else None
    ours: dict[str, dict] = {}
    torchjd: dict[str, dict] = {}
    # Interleaved: each round times every G once with ours (and old), then TorchJD on all of them.
    for _ in range(args.rounds):
        for key, G in grams.items():
            G32 = jnp.asarray(G, jnp.float32)
            entry = ours.setdefault(key, {"new": [], "old": []})
            entry["new"] += time_call(new, G32, 1)
            entry["w"] = np.asarray(new(G32), np.float64)
            if old is not None:
                entry["old"] += time_call(old, G32, 1)
        for key, value in run_torchjd(grams, 1, args.threads).items():
            slot = torchjd.setdefault(key, {"times": []})
            slot["times"] += value["times"]
            slot["w"] = np.asarray(value["w"])
            slot["w_noreg"] = None if value["w_noreg"] is None else np.asarray(value["w_noreg"])
    header = (
        "| G | K | ours (ms) |"
        + (" HEAD (ms) |" if old else "")
        + " TorchJD (ms) | ours / TorchJD |"
    )
    header += " vs TorchJD | vs TorchJD, no ridge | vs NNLS f64 | warm steps | certified |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for key, G in grams.items():
        family, k = key.rsplit("_", 1)
        w = ours[key]["w"]
        ms = 1e3 * np.median(ours[key]["new"])
        tj = 1e3 * np.median(torchjd[key]["times"])
        scale = np.max(np.abs(w))
        vs_tj = np.max(np.abs(w - torchjd[key]["w"])) / scale
        ref = (
            "-" if args.no_reference else f"{np.max(np.abs(w - reference_weights(G))) / scale:.1e}"
        )
        row = f"| {family} | {k} | {ms:.1f} |"
        row += f" {1e3 * np.median(ours[key]['old']):.1f} |" if old else ""
        noreg = torchjd[key]["w_noreg"]
        vs_noreg = "-" if noreg is None else f"{np.max(np.abs(w - noreg)) / scale:.1e}"
        steps, certified = warm_start_stats(jnp.asarray(G, jnp.float32))
        row += f" {tj:.1f} | {ms / tj:.2f} | {vs_tj:.1e} | {vs_noreg} | {ref} |"
        row += f" {steps} | {certified}/{k} |"
        print(row)
    print(f"\nuptime after: {uptime()}")


if __name__ == "__main__":
    main()
