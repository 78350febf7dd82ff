"""The Gramian engine (issue 24): G without the Jacobian, the update, instance-wise objectives.

Every reference is the explicit Jacobian: ``mtl.value_and_grads`` (K pullbacks, rows ``[K,
*leaf]``), its Gram matrix from the definition ``G_kl = sum_p J_kp J_lp`` (numpy, float64
accumulation) and the update ``sum_k w_k J_k`` with weights from that G. The worst relative
errors are printed (``pytest -s``) for docs/autogram.md.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mtl_jax as mtl
from mtl_jax import autogram
from mtl_jax.aggregation.gramspace import from_weighting

GW = autogram.GramianWeighting
TOL = {"float32": 2e-5, "float64": 1e-11}


def explicit_gram(jac) -> np.ndarray:
    """``J J^T`` from the definition: rows flattened and concatenated, float64 products."""
    rows = [np.reshape(np.asarray(x, np.float64), (x.shape[0], -1)) for x in jax.tree.leaves(jac)]
    J = np.concatenate(rows, axis=1)
    return J @ J.T


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree_rel_err(a, b) -> float:
    """Worst per-leaf error relative to the leaf's scale (at least 1e-2 of the tree's largest
    entry: a conv bias before BatchNorm has an exactly zero gradient, so rounding only)."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    top = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for _, y in pairs)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-2 * top, 1e-30)
        for x, y in pairs
    )


def weighted_rows(weights, jac):
    w = np.asarray(weights, np.float64)
    return jax.tree.map(lambda r: np.tensordot(w, np.asarray(r, np.float64), axes=1), jac)


# ---------------------------------------------------------------------------------------------
# Models.


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(16)(x))
        x = nn.LayerNorm()(x)
        x = nn.tanh(nn.Dense(16)(x))
        return nn.Dense(3)(x)


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, ids):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=False)(x)
        x = nn.relu(x).mean(axis=(1, 2)) + nn.Embed(7, 4)(ids)
        return nn.Dense(3)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.ln(jax.nn.gelu(self.l1(x))))


def mlp_problem(dtype):
    model = MLP()
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (8, 5), dtype)
    y = jax.random.normal(k2, (8, 3), dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), model.init(k3, x)["params"])

    def loss_fn(p, x, y):  # -> [3]: one squared error per output column
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2, axis=0)

    return loss_fn, params, (x, y)


def conv_problem(dtype):
    model = ConvBN()
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (6, 5, 5, 2), dtype)
    ids = jnp.array([0, 1, 2, 1, 0, 6])
    y = jax.random.normal(k[1], (6, 3), dtype)
    variables = jax.tree.map(lambda p: p.astype(dtype), model.init(k[2], x, ids))

    def loss_fn(p, stats, x, ids, y):  # -> ([3], new batch statistics)
        out, new = model.apply({"params": p, "batch_stats": stats}, x, ids, mutable=["batch_stats"])
        return jnp.mean((out - y) ** 2, axis=0), new

    return loss_fn, variables["params"], (variables["batch_stats"], x, ids, y)


def nnx_problem(dtype):
    graphdef, params = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    x = jax.random.normal(jax.random.key(3), (10, 5), dtype)
    y = jnp.ones((10, 2), dtype)

    def loss_fn(p, x, y):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2, axis=0)

    return loss_fn, params, (x, y)


PROBLEMS = {"linen_mlp": mlp_problem, "conv_bn_embed": conv_problem, "nnx": nnx_problem}
HAS_AUX = {"linen_mlp": False, "conv_bn_embed": True, "nnx": False}


# ---------------------------------------------------------------------------------------------
# Agreement with the Jacobian path.


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_gram_and_upgrad_update_match_the_jacobian_path(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        loss_fn, params, args = PROBLEMS[name](jnp.dtype(dtype))
        has_aux = HAS_AUX[name]
        out, jac = jax.jit(mtl.value_and_grads(loss_fn, has_aux=has_aux))(params, *args)
        G_ref = explicit_gram(jac)
        w_ref = mtl.weighting.upgrad_weights(jnp.asarray(G_ref, dtype))
        errors = []
        for identities in (True, "always", False) if name == "linen_mlp" else (True, False):
            engine = autogram.engine_value_and_grads(
                loss_fn, GW("upgrad", identities=identities), has_aux=has_aux
            )
            (losses, aux), grads = jax.jit(engine)(params, *args)
            assert aux["gram"].dtype == jnp.dtype(dtype)
            errors.append(rel_err(aux["gram"], G_ref))
            errors.append(tree_rel_err(grads, weighted_rows(w_ref, jac)))
            np.testing.assert_allclose(losses, out[0] if has_aux else out, rtol=1e-6)
            if has_aux:  # BatchNorm's new statistics, as the plain forward computes them
                assert tree_rel_err(aux["aux"], out[1]) < TOL[dtype]
        print(f"\n{name} {dtype}: worst relative error {max(errors):.2e}")
        assert max(errors) < TOL[dtype], errors


def test_plan_reports_each_leaf_and_the_identity_choice():
    loss_fn, params, args = mlp_problem(jnp.float32)
    plan = autogram.engine_value_and_grads(loss_fn, GW("mean")).plan(params, *args)
    methods = plan.methods()
    assert methods["Dense_1/kernel"] == "identity"  # 16 x 16 at batch 8: the identity is cheaper
    assert methods["LayerNorm_0/scale"] == "rows" and plan.fell_back == []
    assert plan.num_objectives == 3 and "dot_general" in str(plan)
    always = autogram.value_and_gramian(loss_fn, identities="always").plan(params, *args)
    assert {always.methods()[f"Dense_{i}/kernel"] for i in range(3)} == {"identity"}


def test_reused_and_computed_parameters_fall_back_exactly():
    """A tied weight (two sites: rows summed) and an L2 penalty (a computation on the
    parameter alone: fallback to its explicit rows) stay exact."""

    def loss_fn(p, x):
        h = jnp.tanh(x @ p["w"])
        out = jnp.tanh(h @ p["w"].T) @ p["v"] * jnp.exp(p["s"])
        l2 = jnp.sum(p["v"] ** 2)
        return jnp.stack([jnp.mean(out[:, 0]) + l2, jnp.mean(out[:, 1] ** 2), jnp.mean(h)])

    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    params = {
        "w": jax.random.normal(k1, (4, 6)),
        "v": jax.random.normal(k2, (4, 2)),
        "s": jnp.array(0.3),
        "unused": jnp.ones(3),
    }
    x = jax.random.normal(k3, (5, 4))
    vg = autogram.value_and_gramian(loss_fn)
    plan = vg.plan(params, x).methods()
    assert plan == {"s": "fallback", "unused": "unused", "v": "fallback", "w": "rows"}
    _, G = jax.jit(vg)(params, x)
    _, jac = mtl.value_and_grads(loss_fn)(params, x)
    assert rel_err(G, explicit_gram(jac)) < 2e-5
    engine = autogram.engine_value_and_grads(loss_fn, GW("mgda"))
    (_, aux), grads = jax.jit(engine)(params, x)
    assert tree_rel_err(grads, weighted_rows(aux["weights"], jac)) < 2e-5
    # Instance-wise, a fallback leaf's rows are per-sample Jacobians (a second forward).
    per_sample = lambda p, xb: loss_fn(p, xb[None])
    iw = autogram.value_and_gramian(per_sample, instance_wise=True)
    assert iw.plan(params, x).methods()["s"] == "fallback"
    _, G_iw = jax.jit(iw)(params, x)
    vector = lambda p, x: jnp.reshape(jax.vmap(per_sample, (None, 0))(p, x), (-1,))
    _, jac_iw = mtl.value_and_grads(vector)(params, x)
    assert rel_err(G_iw, explicit_gram(jac_iw)) < 2e-5


def test_remat_is_walked_into_and_scan_falls_back():
    """``jax.checkpoint`` is inlined (its kernel keeps a site); a parameter carried by a
    ``scan`` falls back to its rows. Both exact."""

    @jax.checkpoint
    def block(w, h):
        return jnp.tanh(h @ w)

    def remat_loss(p, x):
        return jnp.mean((block(p["w"], x) @ p["v"]) ** 2, axis=0)

    def scan_loss(p, x):
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), x, None, length=3)
        return jnp.mean((h @ p["v"]) ** 2, axis=0)

    k1, k2, k3 = jax.random.split(jax.random.key(8), 3)
    params = {"w": jax.random.normal(k1, (4, 4)) / 2, "v": jax.random.normal(k2, (4, 3))}
    x = jax.random.normal(k3, (6, 4))
    for loss_fn, w_method in ((remat_loss, "rows"), (scan_loss, "fallback")):
        vg = autogram.value_and_gramian(loss_fn)
        assert vg.plan(params, x).methods()["w"] == w_method
        _, G = jax.jit(vg)(params, x)
        _, jac = mtl.value_and_grads(loss_fn)(params, x)
        assert rel_err(G, explicit_gram(jac)) < 2e-5


# ---------------------------------------------------------------------------------------------
# Stateful weightings, groups, task-specific leaves.


def test_gradvac_per_module_groups_and_state_match_the_aggregator_over_two_steps():
    loss_fn, params, args = mlp_problem(jnp.float32)
    weighting = mtl.weighting.gradvac_weighting(beta=0.5, shuffle=False)
    engine = jax.jit(
        autogram.engine_value_and_grads(loss_fn, GW(weighting, granularity=mtl.gramian.by_module))
    )
    aggregator = from_weighting(weighting, granularity=mtl.gramian.by_module, num_tasks=3)
    agg_state = aggregator.init(params)
    state = engine.init_weighting_state(params, 3)
    assert set(state) == {"Dense_0", "Dense_1", "Dense_2", "LayerNorm_0"}
    for step in range(2):
        losses, jac = mtl.value_and_grads(loss_fn)(params, *args)
        ref, agg_state = aggregator.update(jac, agg_state, params, task_losses=losses)
        (_, aux), grads = engine(params, *args, weighting_state=state)
        state = aux["weighting_state"]
        assert tree_rel_err(grads, ref) < 1e-4, step
        for group, inner in agg_state.inner.items():
            np.testing.assert_allclose(state[group].targets, inner.targets, atol=1e-5)
        assert set(aux["gram"]) == set(state)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)


def test_stateful_weighting_without_state_is_an_error_and_ema_state_threads():
    loss_fn, params, args = mlp_problem(jnp.float32)
    ema = mtl.weighting.get_weighting("ema_weights", method="mgda", alpha=0.5)
    engine = autogram.engine_value_and_grads(loss_fn, GW(ema))
    with pytest.raises(ValueError, match="keeps state across steps"):
        engine(params, *args)
    state = engine.init_weighting_state(params, 3)
    aggregator = from_weighting(ema, num_tasks=3)
    agg_state = aggregator.init(params)
    for _ in range(2):
        losses, jac = mtl.value_and_grads(loss_fn)(params, *args)
        ref, agg_state = aggregator.update(jac, agg_state, params, task_losses=losses)
        (_, aux), grads = jax.jit(engine)(params, *args, weighting_state=state)
        state = aux["weighting_state"]
        assert tree_rel_err(grads, ref) < 1e-4


def test_task_specific_heads_get_their_own_gradient_and_stay_out_of_g():
    def loss_fn(p, x, ys):
        z = jnp.tanh(x @ p["trunk"])
        return jnp.stack([jnp.mean((z @ p["heads"][t] - ys[t]) ** 2) for t in range(2)])

    labels = {"trunk": False, "heads": True}
    k1, k2, k3, k4 = jax.random.split(jax.random.key(4), 4)
    params = {"trunk": jax.random.normal(k1, (4, 8)), "heads": jax.random.normal(k2, (2, 8, 1))}
    x, ys = jax.random.normal(k3, (16, 4)), jax.random.normal(k4, (2, 16, 1))
    losses, grads_ref = mtl.value_and_grads(loss_fn, labels)(params, x, ys)
    tx = mtl.shared_rows(from_weighting(mtl.weighting.upgrad_weighting()), labels)
    ref, _ = tx.update(grads_ref, tx.init(params), params, task_losses=losses)
    engine = autogram.engine_value_and_grads(loss_fn, GW("upgrad"), labels)
    (_, aux), grads = jax.jit(engine)(params, x, ys)
    assert tree_rel_err(grads, ref) < 1e-5
    assert rel_err(aux["gram"], explicit_gram({"trunk": grads_ref["trunk"]})) < 1e-5


# ---------------------------------------------------------------------------------------------
# Instance-wise objectives.


def per_sample_mlp():
    model = MLP()
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(k1, (12, 5))
    y = jax.random.normal(k2, (12, 3))
    params = model.init(k3, x)["params"]

    def iwrm_loss(p, xb, yb):  # one sample -> scalar
        return jnp.mean((model.apply({"params": p}, xb[None])[0] - yb) ** 2)

    def mtl_loss(p, xb, yb):  # one sample -> [3]: instance-wise MTL
        return (model.apply({"params": p}, xb[None])[0] - yb) ** 2

    return params, x, y, iwrm_loss, mtl_loss


@pytest.mark.parametrize("tasks", [1, 3])
def test_instance_wise_gram_matches_per_sample_jacobian(tasks):
    params, x, y, iwrm_loss, mtl_loss = per_sample_mlp()
    per_sample = iwrm_loss if tasks == 1 else mtl_loss
    vector = lambda p, x, y: jnp.reshape(jax.vmap(per_sample, (None, 0, 0))(p, x, y), (-1,))
    _, jac = mtl.value_and_grads(vector)(params, x, y)  # K = 12 T rows, order b T + t
    G_ref = explicit_gram(jac)
    for identities in (True, False):
        engine = autogram.engine_value_and_grads(
            per_sample, GW("upgrad", instance_wise=True, identities=identities)
        )
        (losses, aux), grads = jax.jit(engine)(params, x, y)
        assert losses.shape == ((12,) if tasks == 1 else (12, 3))
        assert rel_err(aux["gram"], G_ref) < 2e-5
        # UPGrad's weights at K = 36 > rank-ish G are sensitive to rounding in G: the update is
        # checked against the engine's own weights on the explicit rows.
        assert tree_rel_err(grads, weighted_rows(aux["weights"], jac)) < 2e-5


def test_instance_wise_sequences_use_the_positions_identity():
    """Per-sample inputs with positions (a sequence): the identity sums over position pairs."""

    def per_sample(p, seq):  # seq: [L, C] -> [2]
        h = jnp.tanh(seq @ p["w"])
        return jnp.stack([jnp.mean(h), jnp.mean(h[-1] ** 2)])

    k1, k2 = jax.random.split(jax.random.key(6))
    params = {"w": jax.random.normal(k1, (4, 3))}
    seqs = jax.random.normal(k2, (5, 6, 4))
    vg = autogram.value_and_gramian(per_sample, instance_wise=True, identities="always")
    assert vg.plan(params, seqs).methods() == {"w": "identity"}
    _, G = jax.jit(vg)(params, seqs)
    vector = lambda p, s: jnp.reshape(jax.vmap(per_sample, (None, 0))(p, s), (-1,))
    _, jac = mtl.value_and_grads(vector)(params, seqs)
    assert rel_err(G, explicit_gram(jac)) < 2e-5


@pytest.mark.parametrize("mode", ["fill", "clip"])
def test_embedding_identity_counts_repeated_tokens(mode):
    """Token sequences with repeats (and, clipped, an index past the table's end)."""

    def per_sample(p, tokens):  # tokens: [L] -> [2]
        h = jnp.tanh(jnp.take(p["table"], tokens, axis=0, mode=mode) @ p["w"])  # [L, 3]
        return jnp.stack([jnp.mean(h), jnp.mean(h[0] * h[-1])])

    k1, k2 = jax.random.split(jax.random.key(7))
    params = {"table": jax.random.normal(k1, (6, 4)), "w": jax.random.normal(k2, (4, 3))}
    tokens = jnp.array([[0, 1, 1, 5], [2, 0, 0, 0], [5, 5, 3, 1]])
    if mode == "clip":
        tokens = tokens.at[0, 0].set(9)  # clipped to row 5
    vector = lambda p, t: jnp.reshape(jax.vmap(per_sample, (None, 0))(p, t), (-1,))
    _, jac = mtl.value_and_grads(vector)(params, tokens)
    vg = autogram.value_and_gramian(per_sample, instance_wise=True, identities="always")
    assert vg.plan(params, tokens).methods()["table"] == "identity"
    _, G = jax.jit(vg)(params, tokens)
    assert rel_err(G, explicit_gram(jac)) < 2e-5
    whole = autogram.value_and_gramian(vector, identities="always")  # one sample: the batch
    _, G_whole = jax.jit(whole)(params, tokens)
    assert rel_err(G_whole, explicit_gram(jac)) < 2e-5


# ---------------------------------------------------------------------------------------------
# Memory: no K x P buffer in the compiled step.


def test_compiled_step_holds_no_k_by_p_buffer():
    hidden, num_tasks, batch = 512, 128, 8

    def loss_fn(p, x, y):
        h = jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"])
        return jnp.mean((h @ p["out"] - y) ** 2, axis=0)

    shapes = {
        "w1": jax.ShapeDtypeStruct((hidden, hidden), jnp.float32),
        "w2": jax.ShapeDtypeStruct((hidden, hidden), jnp.float32),
        "out": jax.ShapeDtypeStruct((hidden, num_tasks), jnp.float32),
    }
    x = jax.ShapeDtypeStruct((batch, hidden), jnp.float32)
    y = jax.ShapeDtypeStruct((batch, num_tasks), jnp.float32)
    engine = autogram.engine_value_and_grads(loss_fn, GW("mean"))
    temp = jax.jit(engine).lower(shapes, x, y).compile().memory_analysis().temp_size_in_bytes
    num_params = 2 * hidden * hidden + hidden * num_tasks
    # The Jacobian alone would be 4 K P bytes (302 MiB); the engine's step is a few MiB.
    assert temp < 0.1 * 4 * num_tasks * num_params, temp


# ---------------------------------------------------------------------------------------------
# Mistakes.


def test_mistakes_are_clear_errors():
    loss_fn, params, args = mlp_problem(jnp.float32)
    with pytest.raises(TypeError, match="GramianWeighting"):
        autogram.engine_value_and_grads(loss_fn, "upgrad")
    with pytest.raises(ValueError, match="Unknown weighting 'upgrd'"):
        autogram.engine_value_and_grads(loss_fn, GW("upgrd"))
    with pytest.raises(ValueError, match="identities must be True, False or 'always'"):
        autogram.engine_value_and_grads(loss_fn, GW("mean", identities="sometimes"))
    with pytest.raises(TypeError, match="loss function"):
        autogram.engine_value_and_grads(None, GW("mean"))
    summed = lambda p, x, y: jnp.sum(loss_fn(p, x, y))
    with pytest.raises(ValueError, match="loss vector"):
        autogram.engine_value_and_grads(summed, GW("mean"))(params, *args)
    with pytest.raises(ValueError, match="state collection 'batch_stats'"):
        autogram.value_and_gramian(loss_fn)({"params": params, "batch_stats": {}}, *args)
    iw = autogram.value_and_gramian(
        lambda p, xb, yb: loss_fn(p, xb[None], yb[None]), instance_wise=True
    )
    with pytest.raises(ValueError, match="same size B"):
        iw(params, args[0], args[1][:3])
    matrix = autogram.value_and_gramian(lambda p, xb: jnp.ones((2, 2)) * p["w"], instance_wise=True)
    with pytest.raises(ValueError, match=r"scalar \(IWRM\) or losses\[T\]"):
        matrix({"w": jnp.ones(())}, jnp.ones((3, 2)))
    everything = autogram.engine_value_and_grads(loss_fn, GW("mean"), lambda p: True)
    with pytest.raises(ValueError, match="every parameter leaf is task-specific"):
        everything(params, *args)
