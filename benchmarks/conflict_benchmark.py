"""Measures task conflict on the ``digit_transforms`` benchmark: per-pair mean cosine over
training on the whole shared encoder, negative transfer (single-task vs joint), per-module
S-conflict scores, and wall time -- the numbers used to choose the benchmark's default tasks.

    python benchmarks/conflict_benchmark.py --tasks digit,rotation,flip,thickness --epochs 4 \\
        --seeds 0,1,2 --methods mean --single --out /tmp/conflict.json

Uses ``experiments.train``'s step (``build_problem``, ``make_train_step``, ``evaluate``) without
checkpoints or logs; the per-pair statistics come from ``ConflictTracker``'s ``pair_cos_sum``.
Prints one row per (method, seed): the mean cosine of every pair, test accuracies, S-scores of
the top modules, and seconds; then single-task accuracies and the joint - single differences.
"""

from __future__ import annotations

import argparse
import json
import time

import _checkout  # noqa: F401  (puts the checkout on sys.path: experiments/ is not installed)
import jax
import numpy as np

from experiments import data as data_lib
from experiments import models as models_lib
from experiments import train as train_lib
from experiments.config import base_config, parse_method
from mtl_jax.conflict import pair_indices


def make_config(args: argparse.Namespace):
    config = base_config("digit_transforms", "small_resnet")
    config.dataset.tasks = tuple(args.tasks.split(","))
    config.dataset.num_train = args.num_train
    config.dataset.num_test = args.num_test
    config.model.widths = tuple(int(w) for w in args.widths.split(","))
    config.model.feature_dim = args.feature_dim
    config.model.strides = tuple(int(w) for w in args.strides.split(","))
    config.train.epochs = args.epochs
    config.train.batch_size = args.batch_size
    config.train.lr = args.lr
    config.conflict.granularity = "module"
    return config


def run_one(config, data, model, method: str, seed: int, tasks=None) -> dict:
    """Trains one run in-process; returns its per-pair cosines, S-scores and test metrics."""
    start = time.perf_counter()
    name, kwargs = parse_method(method)
    spec = train_lib.RunSpec(
        label=method, method=name, method_kwargs=kwargs, seed=seed, tasks=tasks
    )
    streams = tuple(data.tasks)
    trained = streams if tasks is None else tuple(t for t in streams if t.name in tasks)
    batch_size = int(config.train.batch_size)
    steps_per_epoch = data_lib.num_batches(data.train, batch_size, drop_remainder=True)
    problem = train_lib.build_problem(config, trained, streams, model, spec, steps_per_epoch)
    params, model_state = train_lib.initial_params(model, streams, data.input_shape, seed)
    state = train_lib.init_state(problem, params, model_state)
    state = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), state)
    step_fn = jax.jit(train_lib.make_train_step(problem), donate_argnums=0)
    columns = ["image", *[t.name for t in trained]]
    for epoch in range(int(config.train.epochs)):
        for batch in data_lib.batches(data.train, batch_size, seed=seed, epoch=epoch, shuffle=True):
            state, _ = step_fn(state, {k: jax.numpy.asarray(batch[k]) for k in columns})
    predict = jax.jit(train_lib.make_predict(problem))
    test = train_lib.evaluate(problem, predict, state, data.test, 512)
    tracker = problem.tracker
    names = [t.name for t in trained]
    rows, cols = pair_indices(len(names))
    mean_cos = np.asarray(tracker.mean_pair_cosines(state.conflict).get("global", []))
    return {
        "method": method,
        "seed": seed,
        "tasks": names,
        "pair_mean_cos": {
            f"{names[i]}-{names[j]}": float(c) for i, j, c in zip(rows, cols, mean_cos, strict=True)
        },
        "pair_histogram": np.asarray(state.conflict.pair_histogram.get("global", [])).tolist(),
        "s_scores": tracker.s_scores(state.conflict),
        "accuracy": {t: float(m["accuracy"]) for t, m in test.items()},
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digit,rotation,flip,thickness")
    parser.add_argument("--methods", default="mean")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num_train", type=int, default=6000)
    parser.add_argument("--num_test", type=int, default=1500)
    parser.add_argument("--widths", default="4,8,16")
    parser.add_argument("--strides", default="2,2,2")
    parser.add_argument("--feature_dim", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--single", action="store_true", help="also single-task references")
    parser.add_argument("--out", default="")
    parser.add_argument("--cache", default="", help="persistent XLA compilation cache dir")
    args = parser.parse_args()
    if (
        args.cache
    ):  # the runner's persistent compilation cache: seeds after the first skip compiling
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    config = make_config(args)
    data = data_lib.make_dataset(config.dataset)
    model = models_lib.make_model(config.model, data.tasks, data.input_shape)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    t0 = time.perf_counter()
    methods = [m for m in args.methods.split(",") if m]  # --methods "": single-task runs only
    for method in methods:
        for seed in seeds:
            r = run_one(config, data, model, method, seed)
            results.append(r)
            cos = " ".join(f"{k}={v:+.4f}" for k, v in r["pair_mean_cos"].items())
            acc = " ".join(f"{k}={v:.1f}" for k, v in r["accuracy"].items())
            top = sorted(r["s_scores"].items(), key=lambda kv: -kv[1])[:3]
            print(f"{method} s{seed} {r['seconds']:.0f}s | {cos} | {acc} | top {top}", flush=True)
    if args.single:
        for task in data.task_names:
            for seed in seeds:
                r = run_one(config, data, model, "mean", seed, tasks=(task,))
                r["method"] = f"single:{task}"
                results.append(r)
                print(f"single {task} s{seed} {r['seconds']:.0f}s acc {r['accuracy'][task]:.2f}")
        for task in data.task_names:
            single = np.mean(
                [r["accuracy"][task] for r in results if r["method"] == f"single:{task}"]
            )
            for method in methods:
                joint = np.mean([r["accuracy"][task] for r in results if r["method"] == method])
                print(
                    f"{task}: single {single:.2f} {method} {joint:.2f} diff {joint - single:+.2f}"
                )
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
