"""Median ms per training step, and ratios measured in the same run.

Model (issue "Core"): an MLP trunk 784-512-512-256 (ReLU) shared by K tasks, each with its own head
256-64-10, batch 256, softmax cross-entropy; and a small conv net (two 3x3 convs, 16 and 32
channels, 28x28x1 input) at K = 2. Every variant is one jitted step including the Adam update:

* ``summed``: ``jax.value_and_grad`` of the summed loss (the floor: 1 forward + 1 backward).
* ``naive+pcgrad``: K separate ``jax.grad`` calls, one per task loss, in one jit, stacked and
  given to PCGrad (compare with ``jac+pcgrad``).
* ``jac_all+mean``: ``mtl.value_and_grads`` of the loss vector over *all* parameters (heads
  included: rows for every leaf), mean. (Against TorchJD, and the loss-vector path with
  ``task_specific`` vs ``TrunkAndHeads``: ``benchmarks/vs_torchjd.py``.)
* ``jac+<method>``: ``mtl.TrunkAndHeads`` (Jacobian rows for the trunk only, heads get their
  own gradient), then the aggregator on the trunk rows.
* ``jac+mean+tracker``: ``jac+mean`` plus a ``ConflictTracker`` update from the same Jacobian.
* ``jac[unroll]+mean``, ``jac[scan]+mean``: ``jac+mean`` with the K backward passes unrolled or in
  a ``lax.map`` loop instead of one vmapped pass (``task_map=`` of ``mtl.value_and_grads``).
* ``ub+<weighting>``: the representation-gradient path (MGDA-UB / Aligned-MTL-UB,
  ``mtl.RepresentationWeighting``): one trunk forward, the K heads' gradients with respect to
  the trunk output, their Gram matrix, the weighting, ONE trunk backward pass.
* ``loss+<scalarizer>``: a loss-only method (``mtl.scalarization``): one forward (``jax.vjp``), the
  scalarizer's weights, one backward pass of the weights as cotangent. ``loss+famo`` adds the
  extra forward pass for its post-step losses; ``loss+gradnorm`` adds the task gradient norms of
  the last trunk layer, read off that layer's rows of the trunk Jacobian of
  ``mtl.TrunkAndHeads`` (XLA keeps only the part of the K backward passes that reaches that
  layer), and one trunk backward of the weighted representation gradients.

Ratios: every row against ``summed``; every aggregator against ``jac+mean``. The column
``aggregator ms`` is each aggregator's jitted ``update`` alone (Gram matrix, solver, combination),
timed on the trunk Jacobian where its own ``jac+<method>`` run stopped (for ``jac+mean+tracker``:
the ``ConflictTracker`` update alone). The targets of the issue
are printed with a pass/fail mark: each Gram-space aggregator adds at most 5% to ``jac+mean``,
judged on ``(aggregator ms - mean's aggregator ms) / jac+mean ms`` (the difference of two
~100 ms step medians is as noisy as the 5% it would test); ``jac+mean`` costs at most
``1.5 (1 + 2K) / 3`` summed steps at K = 10 and 40.

``--solvers`` instead times every Gram-space weighting alone (jitted ``weigh`` on a K x K Gram
matrix of random, partly conflicting gradients), at the same K values.

Usage::

  python benchmarks/step_time.py                     # K = 2, 10, 40 + conv, all methods
  python benchmarks/step_time.py --ks 2 10 --repeats 15 --methods mean pcgrad mgda
  python benchmarks/step_time.py --ks 10 --no-conv --repeats 3 --ub mgda --loss uw famo
  python benchmarks/step_time.py --solvers --ks 2 10 40
  python benchmarks/step_time.py --resnet --quick          # ResNet-18, K = 2, 40 (CPU minutes)
  python benchmarks/step_time.py --resnet --repeats 7 --inner 2   # full width, batch 32 (GPU)

``--resnet`` (issue 16, "Large models") instead times ResNet-18 (BatchNorm, 64x64x3 input,
K binary heads, ``make_resnet_problem``) at ``--resnet-ks``: ``joint`` (the summed loss, one
forward and one backward: the baseline of the ratios), ``jac+<aggregator>`` (the encoder's K-row
Jacobian) and ``ub+<weighting>`` (the representation-gradient path, one encoder backward). The
same command runs on whatever device JAX sees (CPU or GPU).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import _checkout  # noqa: F401  (puts the checkout on sys.path: experiments/ is not installed)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _steps import representation_step, trunk_jacobian_step
from _timing import interleaved_ms, machine_line, median_ms

import mtl_jax as mtl

GRAM_METHODS = (
    "mean",
    "sum",
    "pcgrad",
    "mgda",
    "cagrad",
    "imtl_g",
    "gradvac",
    "nash_mtl",
    "aligned_mtl",
    "upgrad",
    "dualproj",
    "config",
    "random_weighting",
    "fairgrad",
    "nocl",
    "ema_weights",
)
OTHER_METHODS = ("graddrop", "excess_mtl")
UB_METHODS = ("mean", "mgda", "aligned_mtl", "upgrad")
LOSS_METHODS = ("mean", "rlw", "uw", "imtl_l", "dwa", "gls", "stch", "famo", "gradnorm")


def dense_init(key, fan_in, fan_out):
    return {
        "w": jax.random.normal(key, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
        "b": jnp.zeros(fan_out),
    }


def mlp_trunk_init(key, sizes=(784, 512, 512, 256)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [dense_init(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def mlp_trunk(params, x):
    for layer in params:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x


def conv_trunk_init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "c1": jax.random.normal(k1, (3, 3, 1, 16)) * np.sqrt(2 / 9),
        "c2": jax.random.normal(k2, (3, 3, 16, 32)) * np.sqrt(2 / 144),
        "fc": dense_init(k3, 7 * 7 * 32, 256),
    }


def conv_trunk(params, x):
    dn = ("NHWC", "HWIO", "NHWC")
    x = jax.nn.relu(
        jax.lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn)
    )
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = jax.nn.relu(
        jax.lax.conv_general_dilated(x, params["c2"], (1, 1), "SAME", dimension_numbers=dn)
    )
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    x = x.reshape(x.shape[0], -1)
    return jax.nn.relu(x @ params["fc"]["w"] + params["fc"]["b"])


def heads_init(key, num_tasks):
    """K heads 256-64-10, stacked along a leading task axis."""

    def one(k):
        k1, k2 = jax.random.split(k)
        return {"h": dense_init(k1, 256, 64), "o": dense_init(k2, 64, 10)}

    return jax.vmap(one)(jax.random.split(key, num_tasks))


def head_loss(head, z, labels):
    h = jax.nn.relu(z @ head["h"]["w"] + head["h"]["b"])
    logits = h @ head["o"]["w"] + head["o"]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_problem(kind: str, num_tasks: int, batch: int = 256, seed: int = 0):
    key = jax.random.PRNGKey(seed)
    kt, kh, kx, ky = jax.random.split(key, 4)
    if kind == "mlp":
        trunk_fn, trunk = mlp_trunk, mlp_trunk_init(kt)
        x = jax.random.normal(kx, (batch, 784))
    else:
        trunk_fn, trunk = conv_trunk, conv_trunk_init(kt)
        x = jax.random.normal(kx, (batch, 28, 28, 1))
    params = {"trunk": trunk, "heads": heads_init(kh, num_tasks)}
    labels = jax.random.randint(ky, (num_tasks, batch), 0, 10)
    return trunk_fn, params, x, labels


def build_steps(
    trunk_fn, num_tasks: int, methods, ub_methods=(), loss_methods=(), task_maps=()
) -> dict[str, Callable]:
    """One jitted ``(params, opt_state, x, labels) -> (params, opt_state, losses)`` per variant."""

    def task_losses(params, x, labels):
        z = trunk_fn(params["trunk"], x)
        return jax.vmap(head_loss, in_axes=(0, None, 0))(params["heads"], z, labels)

    adam = optax.adam(1e-4)
    steps: dict[str, tuple[Callable, optax.GradientTransformation]] = {}

    def summed(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(lambda p: task_losses(p, x, labels).sum())(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    steps["summed"] = (summed, adam)

    # The naive way: K separate jax.grad calls stacked into a Jacobian, then PCGrad (a non-linear
    # aggregator, so XLA cannot fold the K backward passes into one as it can for a mean).
    naive_tx = optax.chain(mtl.aggregation.pcgrad(num_tasks=num_tasks), optax.adam(1e-4))

    def naive(params, opt_state, x, labels):
        grads = [
            jax.grad(lambda p, t=t: task_losses(p, x, labels)[t])(params) for t in range(num_tasks)
        ]
        jac = jax.tree.map(lambda *g: jnp.stack(g), *grads)
        updates, opt_state = naive_tx.update(jac, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.zeros(num_tasks)

    steps["naive+pcgrad"] = (naive, naive_tx)

    mean_all = optax.chain(mtl.aggregation.mean(num_tasks=num_tasks), optax.adam(1e-4))

    def jac_all(params, opt_state, x, labels):
        losses, jac = mtl.value_and_grads(task_losses)(params, x, labels)
        updates, opt_state = mean_all.update(jac, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    steps["jac_all+mean"] = (jac_all, mean_all)

    model = mtl.TrunkAndHeads(trunk_fn, head_loss)
    grad_fn = mtl.value_and_grads(model, representation=True)
    tracker = mtl.ConflictTracker(num_tasks=num_tasks)

    def structured(method: str, track: bool = False, task_map: str = "vmap"):
        grads = mtl.value_and_grads(model, task_map=task_map)
        agg = mtl.get_method(method, num_tasks=num_tasks).transform
        tx = optax.chain(agg, optax.adam(1e-4))
        head_tx = optax.adam(1e-4)

        def init(params):
            return (
                tx.init(params["trunk"]),
                head_tx.init(params["heads"]),
                tracker.init(params["trunk"]),
            )

        def step(params, opt_state, x, labels):
            trunk_state, head_state, cstate = opt_state
            losses, g = grads(params, x, labels)
            enc_jac, head_grads = g["trunk"], g["heads"]
            t_updates, trunk_state = tx.update(
                enc_jac, trunk_state, params["trunk"], task_losses=losses
            )
            h_updates, head_state = head_tx.update(head_grads, head_state, params["heads"])
            if track:
                cstate = tracker.update(cstate, enc_jac)
            params = {
                "trunk": optax.apply_updates(params["trunk"], t_updates),
                "heads": optax.apply_updates(params["heads"], h_updates),
            }
            return params, (trunk_state, head_state, cstate), losses

        return step, init

    for method in dict.fromkeys(["mean", *methods]):  # jac+mean is every ratio's baseline
        steps[f"jac+{method}"] = structured(method)
    steps["jac+mean+tracker"] = structured("mean", track=True)
    for task_map in task_maps:
        steps[f"jac[{task_map}]+mean"] = structured("mean", task_map=task_map)

    def representation(method: str):
        weighting = mtl.weighting.get_weighting(method)
        grads_fn = mtl.value_and_grads(model, representation=mtl.RepresentationWeighting(weighting))

        def init(params):
            return (
                adam.init(params["trunk"]),
                adam.init(params["heads"]),
                weighting.init(num_tasks),
            )

        def step(params, opt_state, x, labels):
            trunk_state, head_state, w_state = opt_state
            (losses, aux), g = grads_fn(params, x, labels, weighting_state=w_state)
            t_updates, trunk_state = adam.update(g["trunk"], trunk_state, params["trunk"])
            h_updates, head_state = adam.update(g["heads"], head_state, params["heads"])
            params = {
                "trunk": optax.apply_updates(params["trunk"], t_updates),
                "heads": optax.apply_updates(params["heads"], h_updates),
            }
            return params, (trunk_state, head_state, aux["weighting_state"]), losses

        return step, init

    for method in ub_methods:
        steps[f"ub+{method}"] = representation(method)

    def loss_only(name: str):
        sc = mtl.scalarization.get_scalarizer(name)

        def init(params):
            return adam.init(params), sc.init(num_tasks)

        def step(params, opt_state, x, labels):
            opt, sc_state = opt_state
            losses, pullback = jax.vjp(lambda p: task_losses(p, x, labels), params)
            _, weights, sc_state = sc.scalarize(losses, sc_state)
            (grads,) = pullback(weights.astype(losses.dtype))  # d loss = sum_k w_k d L_k
            updates, opt = adam.update(grads, opt, params)
            params = optax.apply_updates(params, updates)
            if name == "famo":  # FAMO's post-step losses: one more forward pass
                sc_state = sc.post_step(sc_state, task_losses(params, x, labels))
            return params, (opt, sc_state), losses

        return step, init

    def gradnorm_step():
        """GradNorm on the last trunk layer W: its rows of the trunk Jacobian give the norms.

        ``mtl.TrunkAndHeads`` pulls each task's representation gradient back through the trunk;
        only W's rows are used, so XLA keeps the K backward passes through the last layer alone.
        The weighted gradient is then one trunk backward of ``sum_k w_k dL_k/dz`` (the heads get
        ``w_k`` times their own gradient).
        """
        sc = mtl.scalarization.get_scalarizer("gradnorm")

        def init(params):
            return adam.init(params), sc.init(num_tasks)

        def step(params, opt_state, x, labels):
            opt, sc_state = opt_state
            trunk = params["trunk"]
            (losses, aux), g = grad_fn(params, x, labels)
            enc_jac, head_grads, rep_grads = g["trunk"], g["heads"], aux["rep_grads"]
            last = str(len(trunk) - 1) if isinstance(trunk, list) else "fc"
            norms = mtl.scalarization.layer_grad_norms(enc_jac, last)
            _, w, sc_state = sc.scalarize(losses, sc_state, grad_norms=norms)
            _, trunk_pullback = jax.vjp(lambda p: trunk_fn(p, x), trunk)
            (trunk_grads,) = trunk_pullback(jnp.tensordot(w, rep_grads, axes=1))
            scale = lambda g: g * jnp.reshape(w, (-1,) + (1,) * (g.ndim - 1))
            grads = {"trunk": trunk_grads, "heads": jax.tree.map(scale, head_grads)}
            updates, opt = adam.update(grads, opt, params)
            return optax.apply_updates(params, updates), (opt, sc_state), losses

        return step, init

    for name in loss_methods:
        steps[f"loss+{name}"] = gradnorm_step() if name == "gradnorm" else loss_only(name)
    return steps


def time_steps(steps, params, x, labels, repeats: int, inner: int):
    """Interleaved rounds (``_timing.interleaved_ms``): every variant runs ``inner`` steps per round.

    Returns ``(times, states)``: the ms per step of every round per variant, and every variant's
    final ``[params, opt_state]``.
    """
    states, runners = {}, {}
    for name, (fn, tx) in steps.items():
        init = tx if callable(tx) and not hasattr(tx, "init") else tx.init
        states[name] = [params, init(params)]
        jitted = jax.jit(fn)

        def run(name=name, jitted=jitted):
            p, s, _ = jitted(states[name][0], states[name][1], x, labels)
            states[name] = [p, s]
            return p

        runners[name] = run
    return interleaved_ms(runners, repeats, inner), states


def time_aggregators(trunk_fn, num_tasks, methods, states, x, labels, repeats: int = 21):
    """Median ms of each aggregator's ``update`` alone, on the Jacobian its own run has reached.

    The step-level ratio ``jac+<method> / jac+mean`` compares two medians of ~100 ms steps whose
    noise on a shared machine is itself a few percent; this measures what the aggregator adds
    directly: its jitted ``update`` (Gram matrix, solver, combination) on the trunk Jacobian at
    the parameters and aggregator state where ``jac+<method>`` stopped (UPGrad's QP, say, has
    more active constraints late in training than at initialisation). Interleaved rounds.
    """
    grads = jax.jit(mtl.value_and_grads(mtl.TrunkAndHeads(trunk_fn, head_loss)))
    calls = {}
    for method in methods:
        if f"jac+{method}" not in states:
            continue
        params, opt_state = states[f"jac+{method}"]
        agg_state = opt_state[0][0]  # optax.chain(aggregator, adam): the aggregator's state
        losses, jac = grads(params, x, labels)
        jac = jac["trunk"]
        agg = mtl.get_method(method, num_tasks=num_tasks).transform
        update = jax.jit(
            lambda j, s, p, losses, agg=agg: agg.update(j, s, p, task_losses=losses)[0]
        )
        args = (jac, agg_state, params["trunk"], losses)
        jax.block_until_ready(update(*args))
        calls[method] = (update, args)
    if "jac+mean+tracker" in states:  # the conflict tracker's update alone, same treatment
        params, opt_state = states["jac+mean+tracker"]
        losses, jac = grads(params, x, labels)
        jac = jac["trunk"]
        tracker = mtl.ConflictTracker(num_tasks=num_tasks)
        update = jax.jit(lambda j, s: tracker.update(s, j))
        args = (jac, opt_state[2])
        jax.block_until_ready(update(*args))
        calls["mean+tracker"] = (update, args)
    runners = {method: (lambda u=update, a=args: u(*a)) for method, (update, args) in calls.items()}
    return median_ms(interleaved_ms(runners, repeats, warmup=0, seed=1))


def report(
    kind: str, num_tasks: int, times: dict[str, list[float]], agg_ms: dict[str, float]
) -> list[str]:
    med = {name: statistics.median(v) for name, v in times.items()}
    base, jac_mean = med["summed"], med["jac+mean"]
    mean_agg = agg_ms.get("mean", 0.0)
    bound = 1.5 * (1 + 2 * num_tasks) / 3
    lines = []
    for name, m in med.items():
        vs_jac = ""
        target = ""
        method = name.split("+", 1)[1] if name.startswith("jac+") else None
        agg_cell = f"{agg_ms[method]:.2f}" if method in agg_ms else ""
        added = (agg_ms[method] - mean_agg) / jac_mean if method in agg_ms else None
        if name.startswith(("ub+", "loss+")):
            target = "(vs summed)"
        if name.startswith("jac+") and name != "jac+mean":
            vs_jac = f"{m / jac_mean:.3f}"
            if method in GRAM_METHODS and added is not None:
                verdict = "ok" if added <= 0.05 else "MISS"
                target = f"{verdict} (adds {100 * added:+.1f}% <= 5%)"
            elif method == "mean+tracker" and method in agg_ms:
                # Alone it reads the whole Jacobian again (as mean's update alone does); in the
                # step XLA fuses that read with the aggregator's, so the end-to-end ratio is what
                # it costs: informational, no target.
                target = f"(tracker alone: {100 * agg_ms[method] / jac_mean:.1f}% of jac+mean)"
        if name.startswith("jac["):
            vs_jac = f"{m / jac_mean:.3f}"
            target = "(task_map vs vmap)"
        if name == "naive+pcgrad":
            vs_jac = f"{m / med['jac+pcgrad']:.3f}" if "jac+pcgrad" in med else ""
            target = "(vs jac+pcgrad)"
        if name == "jac+mean" and num_tasks >= 10:
            target = f"ok (<={bound:.1f}x)" if m / base <= bound else f"MISS (>{bound:.1f}x)"
        lines.append(
            f"| {kind} | {num_tasks} | {name} | {m:.2f} | {m / base:.2f} | {vs_jac} | {agg_cell} "
            f"| {target} |"
        )
    return lines


def random_gram(num_tasks: int, dim: int = 4096, seed: int = 0) -> jax.Array:
    """G of K random gradients sharing a common component (some pairs conflict)."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)
    J = 0.3 * common + rng.normal(size=(num_tasks, dim)) * rng.uniform(0.5, 2.0, (num_tasks, 1))
    return jnp.asarray(J @ J.T, jnp.float32)


def time_solvers(ks, repeats: int = 50) -> None:
    """Median ms of every Gram-space weighting alone (jitted ``weigh``), at each K."""
    print("| weighting | " + " | ".join(f"K={k} ms" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for name in sorted(mtl.weighting.WEIGHTINGS):
        if name == "linear":
            continue
        cells = []
        for k in ks:
            weighting = mtl.weighting.get_weighting(name)
            state = weighting.init(k)
            gram = random_gram(k)
            key = jax.random.PRNGKey(0)
            losses = jnp.ones(k)
            weigh = jax.jit(weighting.weigh)
            run = lambda weigh=weigh, args=(gram, state, key, losses): weigh(*args)
            cells.append(f"{median_ms(interleaved_ms({name: run}, repeats))[name]:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


# --------------------------------------------------------------------------------------------
# Large model: ResNet-18 on CelebA-sized inputs, K binary heads (issue 16, "Large models")

RESNET_UB = ("mean", "mgda")
RESNET_JAC = ("mean", "upgrad")


def make_resnet_problem(
    num_tasks: int, width: int = 64, batch: int = 32, size: int = 64, seed: int = 0
):
    """ResNet-18 (``experiments/models/resnet.py``, BatchNorm, ImageNet stem) + K binary heads.

    Input ``[B, size, size, 3]`` (CelebA-sized at 64); the encoder ends at the global average pool
    (``feature_dim=0``: ``z [B, 8 width]``); head k is ``Dense(8 width -> 1)`` with sigmoid
    binary cross-entropy (CelebA's 40 attributes are binary). BatchNorm runs in training mode
    (batch statistics); the running averages are not carried between steps (their update is a
    few element-wise ops). Returns ``(encode, head_loss, params, x, y)`` with
    ``params = {"trunk": ..., "heads": {"w": [K, D], "b": [K]}}``.
    """
    from experiments.models.resnet import ResNetEncoder

    encoder = ResNetEncoder(width=width, feature_dim=0)
    kx, ky, ke, kh = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, (batch, size, size, 3))
    y = jax.random.bernoulli(ky, 0.5, (num_tasks, batch)).astype(jnp.float32)
    variables = encoder.init(ke, x[:2], train=False)
    stats = variables["batch_stats"]
    dim = 8 * width

    def encode(trunk, x):
        z, _ = encoder.apply(
            {"params": trunk, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return z

    def binary_head_loss(head, z, y):
        logits = z @ head["w"] + head["b"]
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()

    heads = {
        "w": jax.random.normal(kh, (num_tasks, dim)) / np.sqrt(dim),
        "b": jnp.zeros(num_tasks),
    }
    return encode, binary_head_loss, {"trunk": variables["params"], "heads": heads}, x, y


def build_resnet_steps(
    encode, loss_of_head, num_tasks: int, jac_methods, ub_methods, chunk_size: int | None = None
):
    """``{name: (step, init)}``: ``joint``, ``jac+<aggregator>``, ``ub+<weighting>``; Adam.

    ``chunk_size``: of the Jacobian's K backward passes (``mtl.TrunkAndHeads``).
    """
    adam = optax.adam(1e-4)

    def summed_loss(params, x, y):
        z = encode(params["trunk"], x)
        return jnp.sum(jax.vmap(loss_of_head, in_axes=(0, None, 0))(params["heads"], z, y))

    def joint(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(summed_loss)(params, x, y)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    steps = {"joint": (joint, adam.init)}

    def jacobian(method: str):
        grads = mtl.value_and_grads(mtl.TrunkAndHeads(encode, loss_of_head), chunk_size=chunk_size)
        aggregator = mtl.get_method(method, num_tasks=num_tasks).transform
        init, step = trunk_jacobian_step(grads, aggregator, adam)
        return step, init

    def representation(method: str):
        fn = mtl.value_and_grads(
            mtl.TrunkAndHeads(encode, loss_of_head),
            representation=mtl.RepresentationWeighting(method),
        )
        init, step = representation_step(fn, num_tasks, adam)
        return step, init

    for method in jac_methods:
        steps[f"jac+{method}"] = jacobian(method)
    for method in ub_methods:
        steps[f"ub+{method}"] = representation(method)
    return steps


def resnet_table(ks, width: int, batch: int, size: int, repeats: int, inner: int, jac, ub) -> None:
    """Median ms per step of ResNet-18 at each K: Jacobian and representation paths vs joint."""
    print(
        f"# ResNet-18 (width {width}, BatchNorm), input {size}x{size}x3, batch {batch}, "
        f"K binary heads; median of {repeats} interleaved rounds x {inner} steps"
    )
    print("| model | K | step | median ms | x joint |")
    print("|---|---|---|---|---|")
    for num_tasks in ks:
        encode, loss_of_head, params, x, y = make_resnet_problem(num_tasks, width, batch, size)
        steps = build_resnet_steps(encode, loss_of_head, num_tasks, jac, ub)
        times, _ = time_steps(steps, params, x, y, repeats, inner)
        med = median_ms(times)
        for name, ms in med.items():
            print(
                f"| resnet18 | {num_tasks} | {name} | {ms:.1f} | {ms / med['joint']:.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--conv", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--repeats", type=int, default=15, help="interleaved rounds (median over them)"
    )
    parser.add_argument("--inner", type=int, default=5, help="steps per round")
    parser.add_argument("--methods", nargs="+", default=[*GRAM_METHODS, *OTHER_METHODS])
    parser.add_argument("--ub", nargs="*", default=list(UB_METHODS), help="ub+<weighting> rows")
    parser.add_argument("--loss", nargs="*", default=list(LOSS_METHODS), help="loss+<name> rows")
    parser.add_argument(
        "--task-maps",
        nargs="*",
        default=["unroll", "scan"],
        help="jac[<task_map>]+mean rows: the K backward passes unrolled or in a loop (vs vmap)",
    )
    parser.add_argument(
        "--solvers", action="store_true", help="time the Gram-space solvers alone instead"
    )
    parser.add_argument(
        "--resnet", action="store_true", help="the ResNet-18 table (issue 16) instead"
    )
    parser.add_argument("--resnet-ks", type=int, nargs="+", default=[2, 40])
    parser.add_argument("--resnet-width", type=int, default=64, help="channels of layer1")
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--resnet-size", type=int, default=64, help="input height and width")
    parser.add_argument("--resnet-jac", nargs="*", default=list(RESNET_JAC))
    parser.add_argument("--resnet-ub", nargs="*", default=list(RESNET_UB))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="with --resnet: width 16, batch 8, 5 rounds of 1 step unless given (minutes on a CPU)",
    )
    args = parser.parse_args()

    print(machine_line("step_time"))
    if args.solvers:
        time_solvers(args.ks)
        return
    if args.resnet:
        if args.quick:  # explicit --repeats / --inner win
            args.resnet_width, args.resnet_batch = 16, 8
            if args.repeats == parser.get_default("repeats"):
                args.repeats = 5
            if args.inner == parser.get_default("inner"):
                args.inner = 1
        resnet_table(
            args.resnet_ks,
            args.resnet_width,
            args.resnet_batch,
            args.resnet_size,
            args.repeats,
            args.inner,
            args.resnet_jac,
            args.resnet_ub,
        )
        return
    print("| model | K | step | median ms | x summed | x jac+mean | aggregator ms | target |")
    print("|---|---|---|---|---|---|---|---|")
    configs = [("mlp", k) for k in args.ks] + ([("conv", 2)] if args.conv else [])
    for kind, num_tasks in configs:
        trunk_fn, params, x, labels = make_problem(kind, num_tasks)
        steps = build_steps(trunk_fn, num_tasks, args.methods, args.ub, args.loss, args.task_maps)
        times, states = time_steps(steps, params, x, labels, args.repeats, args.inner)
        methods = list(dict.fromkeys(["mean", *args.methods]))
        agg_ms = time_aggregators(trunk_fn, num_tasks, methods, states, x, labels)
        for line in report(kind, num_tasks, times, agg_ms):
            print(line, flush=True)


if __name__ == "__main__":
    main()
