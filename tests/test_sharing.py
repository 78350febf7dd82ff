"""Per-task parameter views: sharing specs, copies, masks and the per-task forward."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtl_jax as mtl
from mtl_jax.sharing import (
    COPIED,
    SHARED,
    Masked,
    check_spec,
    copy_per_task,
    make_spec,
    match_paths,
    merge_specs,
    per_task,
    spec_from_masks,
    spec_task_specific,
    task_params,
)

K, B, D, H = 3, 5, 4, 16  # distinct sizes, so a task axis is recognisable in shapes


class Branchy(nn.Module):
    """trunk (shared) -> branch (copied) -> out (shared, after the branch)."""

    hidden: int = H

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, name="trunk")(x))
        x = nn.relu(nn.Dense(self.hidden, name="branch")(x))
        return nn.Dense(2, name="out")(x)


def _x(n=B, d=D, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, d)), jnp.float32)


def _setup(copied="branch"):
    model = Branchy()
    x = _x()
    params = model.init(jax.random.PRNGKey(0), x)
    spec = make_spec(params, copied=copied)
    stacked = copy_per_task(params, spec, K)
    # make the copies differ
    stacked = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            v + 0.1 * jnp.arange(K, dtype=v.dtype).reshape((K,) + (1,) * (v.ndim - 1))
            if "branch" in jax.tree_util.keystr(p)
            else v
        ),
        stacked,
    )
    return model, x, params, spec, stacked


def _close(a, b, **kw):
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, **{"rtol": 1e-5, "atol": 1e-6, **kw}), a, b
    )


# ---------------------------------------------------------------------------------------------
# Specs


def test_make_spec_copy_per_task_and_labels():
    _, _, params, spec, stacked = _setup()
    assert spec["params"]["branch"]["kernel"] is COPIED
    assert spec["params"]["trunk"]["kernel"] is SHARED
    assert stacked["params"]["branch"]["kernel"].shape == (K, H, H)
    assert stacked["params"]["trunk"]["kernel"].shape == (D, H)
    plain = copy_per_task(params, spec, K)
    for t in range(K):  # every copy starts at the shared value (Recon's initialisation)
        np.testing.assert_array_equal(
            plain["params"]["branch"]["kernel"][t], params["params"]["branch"]["kernel"]
        )
    labels = spec_task_specific(spec)
    assert labels["params"]["branch"] == {"kernel": True, "bias": True}
    assert labels["params"]["trunk"] == {"kernel": False, "bias": False}
    assert check_spec(spec, stacked) == K


def test_prefix_spec_and_string_markers():
    _, x, _, spec, stacked = _setup()
    prefix = {"params": {"trunk": "shared", "branch": COPIED, "out": SHARED}}
    _close(
        per_task(Branchy().apply, prefix, K)(stacked, x),
        per_task(Branchy().apply, spec, K)(stacked, x),
    )


def test_spec_errors_name_the_leaf():
    _, x, params, spec, stacked = _setup()
    with pytest.raises(
        ValueError, match=r"num_tasks=3.*K=1: params/branch/bias, params/branch/kernel"
    ):
        check_spec(spec, copy_per_task(params, spec, 1), num_tasks=K)
    with pytest.raises(ValueError, match="params/trunk/kernel: mask"):
        bad = merge_specs(spec, make_spec(params))
        bad["params"]["trunk"]["kernel"] = Masked(np.ones((K, D + 1, H), bool))
        check_spec(bad, stacked)
    missing = {"params": {"trunk": SHARED, "branch": COPIED}}  # no "out"
    with pytest.raises(ValueError, match="params/out"):
        per_task(Branchy().apply, missing, K)(stacked, x)
    wrong = make_spec(params)
    wrong["params"]["out"]["kernel"] = "copy"
    with pytest.raises(ValueError, match="params/out/kernel.*'copy'"):
        check_spec(wrong, params)
    with pytest.raises(ValueError, match="disagree"):
        twice = copy_per_task(params, spec, 2)
        twice["params"]["out"]["kernel"] = jnp.zeros((K, H, 2))
        check_spec(merge_specs(spec, make_spec(params, copied="out/kernel")), twice)


def test_merge_specs():
    _, _, params, spec, _ = _setup()
    masks = jax.tree.map(lambda v: np.ones((K, *v.shape), bool), params)
    masks["params"]["trunk"]["kernel"][0, 0, 0] = False
    masked = spec_from_masks(masks)
    assert isinstance(masked["params"]["trunk"]["kernel"], Masked)
    assert masked["params"]["trunk"]["bias"] is SHARED  # all-True masks stay shared
    merged = merge_specs(spec, masked)
    assert merged["params"]["branch"]["kernel"] is COPIED
    assert isinstance(merged["params"]["trunk"]["kernel"], Masked)
    all_masked = spec_from_masks(jax.tree.map(lambda v: np.zeros((K, *v.shape), bool), params))
    with pytest.raises(ValueError, match="params/branch/.*copied or masked, not both"):
        merge_specs(spec, all_masked)


# ---------------------------------------------------------------------------------------------
# The per-task forward


def test_per_task_equals_a_loop_over_task_views():
    model, x, _, spec, stacked = _setup()
    outs = jax.jit(per_task(model.apply, spec, K))(stacked, x)
    assert outs.shape == (K, B, 2)
    for t in range(K):
        _close(outs[t], model.apply(task_params(stacked, spec, t), x))
    assert not np.allclose(outs[0], outs[1])


def _dot_generals(jaxpr):
    """Output shapes of every dot_general in a jaxpr, sub-jaxprs included, in program order."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes.extend(_dot_generals(inner))
    return shapes


def test_shared_prefix_runs_once_in_the_jaxpr():
    model, x, _, spec, stacked = _setup()
    jaxpr = jax.make_jaxpr(per_task(model.apply, spec, K))(stacked, x).jaxpr
    shapes = _dot_generals(jaxpr)
    # three layers -> three matmuls (not 3K); the trunk's has no task axis, the others have one
    assert len(shapes) == 3, shapes
    assert shapes[0] == (B, H)
    assert all(
        K in s and np.prod(s) == K * B * (H if i == 1 else 2) for i, s in enumerate(shapes[1:], 1)
    )


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def test_shared_prefix_runs_once_by_flop_count():
    model = Branchy(hidden=256)
    x = _x(n=32, d=256)
    params = model.init(jax.random.PRNGKey(0), x)
    # the copied layer is the last one: the two big shared layers are the prefix
    spec = make_spec(params, copied="params/out/")
    stacked = copy_per_task(params, spec, K)
    once = _flops(model.apply, params, x)
    tail = 2 * 32 * 256 * 2  # the out layer's matmul
    fused = _flops(per_task(model.apply, spec, K), stacked, x)
    # prefix once + K tails, far below K full forwards
    assert fused < once + K * 2 * tail, (fused, once)
    assert fused < 0.5 * K * once
    # with the copy at the *first* layer everything is per task: about K forwards
    first = make_spec(params, copied="params/trunk/")
    fused_all = _flops(per_task(model.apply, first, K), copy_per_task(params, first, K), x)
    assert fused_all > 0.9 * K * once


def test_all_shared_spec_broadcasts():
    model, x, params, _, _ = _setup()
    outs = per_task(model.apply, make_spec(params), K)(params, x)
    assert outs.shape == (K, B, 2)
    np.testing.assert_array_equal(outs[0], outs[2])


# ---------------------------------------------------------------------------------------------
# Gradients


def _task_losses(model, spec, x, ys):
    forward = per_task(model.apply, spec, K)

    def losses(params):
        outs = forward(params, x)  # [K, B, 2]
        return jnp.mean((outs - ys) ** 2, axis=(1, 2))

    return losses


def test_copied_rows_are_zero_except_the_own_copy_and_shared_rows_gets_own_gradients():
    model, x, _, spec, stacked = _setup()
    ys = jnp.asarray(np.random.default_rng(1).normal(size=(K, B, 2)), jnp.float32)
    losses_fn = _task_losses(model, spec, x, ys)
    losses, jac = jax.jit(mtl.value_and_grads(losses_fn))(stacked)
    kernel = jac["params"]["branch"]["kernel"]  # [K (rows), K (copies), H, H]
    assert kernel.shape == (K, K, H, H)
    for t in range(K):
        for c in range(K):
            assert np.any(kernel[t, c] != 0) == (t == c)

    task_specific = spec_task_specific(spec)
    _, grads = jax.jit(mtl.value_and_grads(losses_fn, task_specific))(stacked)
    tx = mtl.shared_rows(mtl.aggregation.sum_(), task_specific)
    updates, _ = tx.update(grads, tx.init(stacked), stacked)
    grad_fn = jax.jit(jax.grad(lambda p, t: losses_fn(p)[t]))
    for t in range(K):  # each copy gets exactly its own task's gradient
        grad_t = grad_fn(stacked, t)
        _close(updates["params"]["branch"]["kernel"][t], grad_t["params"]["branch"]["kernel"][t])
    total = jax.grad(lambda p: jnp.sum(losses_fn(p)))(stacked)
    _close(updates["params"]["trunk"], total["params"]["trunk"])
    assert losses.shape == (K,)


def test_masked_leaf_gradient_is_zero_outside_its_mask():
    model, x, params, _, _ = _setup()
    rng = np.random.default_rng(2)
    masks = jax.tree.map(lambda v: np.ones((K, *v.shape), bool), params)
    masks["params"]["trunk"]["kernel"] = rng.random((K, D, H)) < 0.5
    spec = spec_from_masks(masks)
    ys = jnp.asarray(rng.normal(size=(K, B, 2)), jnp.float32)
    _, jac = mtl.value_and_grads(_task_losses(model, spec, x, ys))(params)
    for t in range(K):
        row = np.asarray(jac["params"]["trunk"]["kernel"][t])
        assert np.all(row[~masks["params"]["trunk"]["kernel"][t]] == 0)
        assert np.count_nonzero(row) > 0


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics


class BNBranchy(nn.Module):
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(H, name="trunk")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn0")(x))
        x = nn.Dense(H, name="branch")(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.5, axis_name=self.axis_name, name="bn1"
        )(x)
        return nn.Dense(2, name="out")(nn.relu(x))


def _bn_setup(copied):
    model = BNBranchy()
    x = _x(n=8)
    variables = model.init(jax.random.PRNGKey(0), x)
    spec = make_spec(variables, copied=copied)
    stacked = copy_per_task(variables, spec, K)
    stacked["params"]["branch"]["kernel"] = stacked["params"]["branch"]["kernel"] * jnp.arange(
        1.0, K + 1.0
    ).reshape(K, 1, 1)
    apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    return model, x, spec, stacked, apply


def test_shared_batchnorm_inside_the_streams_is_refused_by_default():
    _, x, spec, stacked, apply = _bn_setup(copied="params/branch/")
    # bn1 (after the copied `branch`) is named; bn0 (before it) is not
    with pytest.raises(ValueError, match=r"\[batch_stats/bn1/mean, batch_stats/bn1/var\]"):
        per_task(apply, spec, K, has_state=True)(stacked, x)
    with pytest.raises(ValueError, match=r"state_reduction='mean' explicitly"):
        jax.jit(per_task(apply, spec, K, has_state=True))(stacked, x)
    with pytest.raises(ValueError, match=r"state_reduction must be None, 'mean'"):
        per_task(apply, spec, K, has_state=True, state_reduction="median")


def test_shared_batchnorm_before_the_branch_is_kept_exactly():
    _, x, spec, stacked, apply = _bn_setup(copied=match_paths("/branch/", "/bn1/"))
    _, state = per_task(apply, spec, K, has_state=True)(stacked, x)
    ref = apply(task_params(stacked, spec, 0), x)[1]["batch_stats"]["bn0"]
    for name in ("mean", "var"):  # unbatched out of the vmap: no task axis, no reduction
        assert state["batch_stats"]["bn0"][name].shape == (H,)
        _close(state["batch_stats"]["bn0"][name], ref[name])


def test_shared_batchnorm_statistics_are_averaged_when_asked():
    _, x, spec, stacked, apply = _bn_setup(copied="params/branch/")
    outs, state = per_task(apply, spec, K, has_state=True, state_reduction="mean")(stacked, x)
    runs = [apply(task_params(stacked, spec, t), x) for t in range(K)]
    for t in range(K):  # each stream normalises with its own batch statistics
        _close(outs[t], runs[t][0])
    stats = state["batch_stats"]
    raw = per_task(apply, spec, K, has_state=True, state_reduction=lambda s: s)(stacked, x)[1]
    for name in ("mean", "var"):
        # bn0 sits before the branch: one set of statistics (all task rows are identical), kept
        # exactly by the reduction, equal to a plain forward's
        rows = np.asarray(raw["batch_stats"]["bn0"][name])
        assert np.all(rows == rows[0])
        np.testing.assert_array_equal(stats["bn0"][name], rows[0])
        _close(stats["bn0"][name], runs[0][1]["batch_stats"]["bn0"][name])
        # bn1 is shared but inside the task streams: the mean of the per-task running averages
        per_task_stats = np.stack([r[1]["batch_stats"]["bn1"][name] for r in runs])
        assert stats["bn1"][name].shape == (H,)
        _close(stats["bn1"][name], per_task_stats.mean(axis=0))
        assert not np.allclose(per_task_stats[0], per_task_stats[1])


def test_reduce_task_state_refuses_rows_that_differ():
    from mtl_jax.sharing import reduce_task_state

    same, differ = jnp.ones((K, H)), jnp.arange(K * H, dtype=jnp.float32).reshape(K, H)
    spec = {"params": {"w": SHARED}}
    out = reduce_task_state({"batch_stats": {"bn": {"mean": same}}}, spec)
    np.testing.assert_array_equal(out["batch_stats"]["bn"]["mean"], np.ones(H))
    with pytest.raises(ValueError, match=r"\[batch_stats/bn/mean\]"):
        reduce_task_state({"batch_stats": {"bn": {"mean": differ}}}, spec)
    with pytest.raises(ValueError, match="traced"):
        jax.jit(lambda s: reduce_task_state(s, spec))({"batch_stats": {"bn": {"mean": same}}})
    out = reduce_task_state({"bn": {"mean": differ}}, spec, state_reduction="mean")
    np.testing.assert_allclose(out["bn"]["mean"], np.asarray(differ).mean(axis=0))


def test_copied_batchnorm_keeps_per_task_statistics():
    _, x, spec, stacked, apply = _bn_setup(copied=match_paths("/branch/", "/bn1/"))
    assert stacked["batch_stats"]["bn1"]["mean"].shape == (K, H)
    forward = jax.jit(per_task(apply, spec, K, has_state=True))
    outs, state = forward(stacked, x)
    for t in range(K):
        out_t, state_t = apply(task_params(stacked, spec, t), x)
        _close(outs[t], out_t)
        _close(state["batch_stats"]["bn1"]["mean"][t], state_t["batch_stats"]["bn1"]["mean"])
    # the new state plugs back in: the next step's variables pass the spec check
    forward({"params": stacked["params"], **state}, x)

    # the Jacobian w.r.t. the params only, batch statistics as auxiliary output
    def losses(params, batch_stats):
        outs, new_state = forward({"params": params, "batch_stats": batch_stats}, x)
        return jnp.mean(outs**2, axis=(1, 2)), new_state

    (vals, _), jac = mtl.value_and_grads(losses, has_aux=True)(
        stacked["params"], stacked["batch_stats"]
    )
    assert vals.shape == (K,) and jac["bn1"]["scale"].shape == (K, K, H)


def test_batchnorm_axis_name_pools_statistics_over_tasks():
    model = BNBranchy(axis_name="tasks")
    x = _x(n=8)
    variables = model.init(jax.random.PRNGKey(0), x)
    spec = make_spec(variables, copied="params/branch/")
    stacked = copy_per_task(variables, spec, K)
    stacked["params"]["branch"]["kernel"] *= jnp.arange(1.0, K + 1.0).reshape(K, 1, 1)
    apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    fwd = per_task(apply, spec, K, has_state=True, axis_name="tasks", state_reduction=lambda s: s)
    _, state = fwd(stacked, x)
    rows = np.asarray(state["batch_stats"]["bn1"]["mean"])  # kept stacked by the callable
    np.testing.assert_allclose(rows[0], rows[1], rtol=1e-6)  # pooled: every stream agrees


# ---------------------------------------------------------------------------------------------
# NNX


class NNXBranchy(nnx.Module):
    def __init__(self, rngs):
        self.trunk = nnx.Linear(D, H, rngs=rngs)
        self.bn = nnx.BatchNorm(H, momentum=0.5, rngs=rngs)
        self.branch = nnx.Linear(H, H, rngs=rngs)
        self.out = nnx.Linear(H, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.trunk(x)))
        return self.out(nnx.relu(self.branch(x)))


def test_nnx_per_task_forward_jacobian_and_batch_stats():
    graphdef, params, stats = nnx.split(NNXBranchy(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    spec = make_spec(params, copied="branch")
    stacked = copy_per_task(params, spec, K)
    stacked = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            v * jnp.arange(1.0, K + 1.0).reshape(K, 1, 1)
            if "branch" in jax.tree_util.keystr(p) and v.ndim == 3
            else v
        ),
        stacked,
    )
    x = _x()

    def apply(variables, x):
        model = nnx.merge(graphdef, *variables, copy=True)  # eager calls: do not alias `stats`
        return model(x), nnx.state(model, nnx.BatchStat)

    stats_spec = make_spec(stats)
    forward = jax.jit(per_task(apply, (spec, stats_spec), K, has_state=True))
    outs, new_stats = forward((stacked, stats), x)
    for t in range(K):
        ref, ref_stats = apply((task_params(stacked, spec, t), stats), x)
        _close(outs[t], ref)
        # the BatchNorm is before the branch: one set of statistics, exactly
        _close(new_stats["bn"]["mean"][...], ref_stats["bn"]["mean"][...])

    ys = jnp.ones((K, B, 2))

    def losses(p):
        return jnp.mean((forward((p, stats), x)[0] - ys) ** 2, axis=(1, 2))

    _, jac = mtl.value_and_grads(losses)(stacked)
    rows = jac["branch"]["kernel"][...]  # [K, K, H, H]
    for t in range(K):
        for c in range(K):
            assert np.any(rows[t, c] != 0) == (t == c)
    task_specific = spec_task_specific(spec)
    _, grads = mtl.value_and_grads(losses, task_specific)(stacked)
    tx = optax.chain(mtl.shared_rows(mtl.aggregation.pcgrad(), task_specific), optax.sgd(0.1))
    updates, _ = tx.update(grads, tx.init(stacked), stacked)
    assert updates["branch"]["kernel"][...].shape == (K, H, H)


# ---------------------------------------------------------------------------------------------
# Layer-based specs over the whole variables (parameters and statistics)


def test_layer_key_and_layer_spec_cover_parameters_and_statistics():
    from mtl_jax.sharing import layer_key, layer_names, layer_spec

    assert layer_key("params/Conv_0/kernel") == "Conv_0"
    assert layer_key("batch_stats/bn1/mean") == "bn1"
    assert layer_key("encoder/conv0/kernel/value") == "encoder/conv0"
    assert layer_key("bn1/scale") == "bn1"
    variables = BNBranchy().init(jax.random.PRNGKey(0), _x(n=8))
    assert layer_names(variables) == ["bn0", "bn1", "branch", "out", "trunk"]  # sorted keys
    spec = layer_spec(variables, ["params/bn1", "branch"])
    assert spec["params"]["bn1"] == {"scale": COPIED, "bias": COPIED}
    assert spec["batch_stats"]["bn1"] == {"mean": COPIED, "var": COPIED}
    assert spec["params"]["branch"]["kernel"] is COPIED
    assert spec["batch_stats"]["bn0"]["mean"] is SHARED
    # over a state tree alone: the state spec of per_task
    assert layer_spec(variables["batch_stats"], ["bn1"])["bn1"]["var"] is COPIED
    with pytest.raises(ValueError, match=r"Layers not found: \['bn7'\]"):
        layer_spec(variables, ["bn7"])


def test_copied_batchnorm_statistics_are_never_silently_averaged():
    # a spec made from the parameters' paths only: bn1's scale/bias copied, its statistics not
    _, x, _, _, apply = _bn_setup(copied="params/branch/")
    variables = BNBranchy().init(jax.random.PRNGKey(0), x)
    spec = make_spec(variables, copied=match_paths("^params/branch/", "^params/bn1/"))
    stacked = copy_per_task(variables, spec, K)
    with pytest.raises(ValueError, match=r"batch_stats/bn1/mean.*copied per task.*layer_spec"):
        per_task(apply, spec, K, has_state=True)(stacked, x)
    # an explicit state spec and state_reduction average them on purpose
    state_spec = make_spec({"batch_stats": stacked["batch_stats"]})
    with pytest.raises(ValueError, match=r"batch_stats/bn1/mean.*computed inside the task"):
        per_task(apply, spec, K, has_state=True, state_spec=state_spec)(stacked, x)
    _, state = per_task(
        apply, spec, K, has_state=True, state_spec=state_spec, state_reduction="mean"
    )(stacked, x)
    assert state["batch_stats"]["bn1"]["mean"].shape == (H,)


def test_shared_view_hides_task_specific_leaves():
    _, _, _, spec, stacked = _setup()
    view = mtl.sharing.shared_view(stacked, spec)
    assert isinstance(view["params"]["branch"]["kernel"], optax.MaskedNode)
    assert view["params"]["trunk"]["kernel"].shape == (D, H)
    groups = mtl.ConflictTracker(K, granularity=mtl.gramian.by_module).groups(view)
    assert groups == ["global", "params/out", "params/trunk"]


@pytest.mark.parametrize("unroll", [False, True])
def test_per_task_grads_refuses_stream_dependent_shared_state(unroll):
    model, x, _, _, _ = _bn_setup(copied="params/branch/")
    variables = model.init(jax.random.PRNGKey(0), x)

    def task_loss(view, stats_t, t, x):
        out, new = model.apply(
            {"params": view, "batch_stats": stats_t}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(out**2), new["batch_stats"]

    # bn1 after the copied `branch`, shared statistics: refused, naming bn1 only
    spec = make_spec(variables["params"], copied="^branch/")
    stacked = copy_per_task(variables["params"], spec, K)
    stacked["branch"]["kernel"] = stacked["branch"]["kernel"] * jnp.arange(1.0, K + 1).reshape(
        K, 1, 1
    )
    stats_spec = make_spec(variables["batch_stats"])
    fn = mtl.value_and_grads(
        mtl.PerTaskLosses(task_loss, spec, K, has_state=True, state_spec=stats_spec),
        task_map="unroll" if unroll else "vmap",
    )
    with pytest.raises(
        ValueError, match=r"value_and_grads\(PerTaskLosses\): the shared state leaves \[bn1/mean"
    ):
        jax.eval_shape(fn, stacked, variables["batch_stats"], x)
    # bn1 copied per task: bn0 (before the branch) stays shared and exact, no error
    stats_spec = make_spec(variables["batch_stats"], copied="^bn1/")
    stats = copy_per_task(variables["batch_stats"], stats_spec, K)
    fn = mtl.value_and_grads(
        mtl.PerTaskLosses(task_loss, spec, K, has_state=True, state_spec=stats_spec),
        task_map="unroll" if unroll else "vmap",
    )
    (losses, new), _ = fn(stacked, stats, x)
    assert losses.shape == (K,)
    ref = model.apply(
        {"params": task_params(stacked, spec, 1), "batch_stats": variables["batch_stats"]},
        x,
        train=True,
        mutable=["batch_stats"],
    )[1]["batch_stats"]
    assert new["bn0"]["mean"].shape == (H,) and new["bn1"]["mean"].shape == (K, H)
    _close(new["bn0"], ref["bn0"])
    _close(jax.tree.map(lambda v: v[1], new["bn1"]), ref["bn1"])
