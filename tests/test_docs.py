"""Every ``python`` code block of the documentation site (docs/**/*.md) runs, and trains.

The blocks of one page run in order in one namespace (a page is a script). Pages with a recipe
then get checked for what the recipe claims: losses fall, BatchNorm statistics change through
the ``mutable`` collection / the ``nnx.BatchStat`` state and never enter the optimizer,
task-specific leaves get no task axis. A page whose blocks this file does not know is still
executed (``test_every_page_runs``), so a new example cannot go untested.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _pages() -> list[str]:
    return sorted(
        os.path.relpath(p, DOCS)
        for p in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)
        # docs/design/ holds the design notes (not built into the site; their snippets are
        # sketches of the API, not runnable examples)
        if "_build" not in p and os.sep + "design" + os.sep not in p
    )


def _blocks(page: str) -> list[str]:
    with open(os.path.join(DOCS, page)) as f:
        return FENCE.findall(f.read())


_CACHE: dict[str, dict] = {}


def run_page(page: str) -> dict:
    """Executes the page's python blocks in one namespace (cached: each page runs once)."""
    if page not in _CACHE:
        namespace = {"__name__": f"docs_{page.replace('/', '_')[:-3]}", "print": lambda *a: None}
        for i, code in enumerate(_blocks(page)):
            exec(compile(code, f"docs/{page}[block {i}]", "exec"), namespace)
        _CACHE[page] = namespace
    return _CACHE[page]


def _paths(tree) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p) for p, _ in flat]


def test_the_site_has_pages_with_examples():
    pages = _pages()
    for required in ("index.md", "install.md", "custom_loop.md", "methods.md", "conflict.md"):
        assert required in pages
    assert sum(len(_blocks(p)) for p in pages) >= 8


@pytest.mark.parametrize("page", _pages())
def test_every_page_runs(page):
    run_page(page)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_examples_pass_the_projects_lint_and_format(tmp_path):
    """Each block on its own: ruff-clean and formatted, so each example can be copied whole."""
    files = []
    for page in _pages():
        for i, code in enumerate(_blocks(page)):
            path = tmp_path / f"{page.replace('/', '_')[:-3]}_{i}.py"
            path.write_text(code)
            files.append(str(path))
    config = os.path.join(ROOT, "pyproject.toml")
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run(
            ["ruff", *args, "--config", config, *files], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Custom loop: Linen with BatchNorm


def test_linen_batchnorm_recipe_trains_and_keeps_statistics_out_of_the_optimizer():
    ns = run_page("custom_loop.md")
    model, x, ys = ns["model"], ns["x"], ns["ys"]
    init = model.init(jax.random.split(jax.random.PRNGKey(0), 3)[2], x, train=False)
    before, _ = ns["task_losses"](init["params"], init["batch_stats"], x, ys)
    after, _ = ns["task_losses"](ns["params"], ns["batch_stats"], x, ys)
    assert np.all(np.asarray(after) < 0.5 * np.asarray(before))  # every task learned
    # the statistics moved through the mutable collection: running mean towards the batch mean
    mean0 = np.asarray(init["batch_stats"]["BatchNorm_0"]["mean"])
    mean1 = np.asarray(ns["batch_stats"]["BatchNorm_0"]["mean"])
    assert np.allclose(mean0, 0.0) and np.abs(mean1).max() > 0.1
    var1 = np.asarray(ns["batch_stats"]["BatchNorm_0"]["var"])
    assert not np.allclose(var1, 1.0)
    # the optimizer state holds the parameters' moments only (no BatchNorm statistics)
    adam = ns["opt_state"][1][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(ns["params"])
    assert not any("mean" in p or "var" in p for p in _paths(ns["opt_state"]))
    # one gradient tree: trunk rows [K, ...], heads shaped like their parameters
    (_, _), grads = jax.jit(ns["grad_fn"])(ns["params"], ns["batch_stats"], x, ys)
    assert grads["Dense_0"]["kernel"].shape == (2, 8, 32)
    for k in range(2):
        head = f"head_{k}"
        assert grads[head]["kernel"].shape == ns["params"][head]["kernel"].shape == (32, 1)
    assert ns["eval_preds"].shape == (2, 128, 1)


def test_linen_one_step_updates_the_running_statistics_from_its_forward_pass():
    ns = run_page("custom_loop.md")
    model, x, ys = ns["model"], ns["x"], ns["ys"]
    init = model.init(jax.random.split(jax.random.PRNGKey(0), 3)[2], x, train=False)
    params, stats = init["params"], init["batch_stats"]
    _, new_stats, _, _ = ns["train_step"](params, stats, ns["tx"].init(params), x, ys)
    # NumPy: the Dense_0 output of this batch, momentum 0.9, biased variance
    a = np.asarray(x) @ np.asarray(params["Dense_0"]["kernel"]) + np.asarray(
        params["Dense_0"]["bias"]
    )
    bn = new_stats["BatchNorm_0"]
    np.testing.assert_allclose(bn["mean"], 0.1 * a.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn["var"], 0.9 + 0.1 * a.var(axis=0), rtol=1e-4, atol=1e-5)
    # evaluation reads them: other statistics, other predictions
    eval_new = model.apply({"params": params, "batch_stats": new_stats}, x, train=False)
    eval_old = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    assert not np.allclose(eval_new, eval_old)


def test_linen_head_gradient_is_its_own_task_gradient():
    ns = run_page("custom_loop.md")
    params, stats, x, ys = ns["params"], ns["batch_stats"], ns["x"], ns["ys"]
    (_, _), grads = ns["grad_fn"](params, stats, x, ys)

    def loss_k(p, k):
        return ns["task_losses"](p, stats, x, ys)[0][k]

    for k in range(2):
        own = jax.grad(loss_k)(params, k)[f"head_{k}"]["kernel"]
        np.testing.assert_allclose(grads[f"head_{k}"]["kernel"], own, rtol=1e-5, atol=1e-6)
    row1 = jax.grad(loss_k)(params, 1)["Dense_0"]["kernel"]
    np.testing.assert_allclose(grads["Dense_0"]["kernel"][1], row1, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Custom loop: NNX


def test_nnx_recipe_trains_updates_batch_stats_and_optimises_params_only():
    from flax import nnx

    ns = run_page("custom_loop.md")
    model, x, ys = ns["nnx_model"], ns["x"], ns["ys"]
    fresh = ns["NNXNet"](nnx.Rngs(0))
    _, p0, s0 = nnx.split(fresh, nnx.Param, nnx.BatchStat)
    _, p1, s1 = nnx.split(model, nnx.Param, nnx.BatchStat)
    before, _ = ns["nnx_task_losses"](p0, s0, x, ys)
    after, _ = ns["nnx_task_losses"](p1, s1, x, ys)
    assert np.all(np.asarray(after) < 0.5 * np.asarray(before))
    # BatchStat moved (running mean of inputs with mean 2 through the trunk) ...
    assert np.allclose(np.asarray(s0["bn"]["mean"][...]), 0.0)
    assert np.abs(np.asarray(s1["bn"]["mean"][...])).max() > 0.1
    assert not np.allclose(np.asarray(s1["bn"]["var"][...]), 1.0)
    # ... and is not in the optimizer: its state mirrors nnx.Param only
    opt_paths = _paths(nnx.as_pure(ns["optimizer"].opt_state))
    assert opt_paths and not any("/mean" in p or "/var" in p for p in opt_paths)
    assert any("heads/0/kernel" in p for p in opt_paths)
    assert int(ns["optimizer"].step[...]) == 60
    # heads: no task axis; trunk: K rows
    (_, _), grads = ns["nnx_grad_fn"](p1, s1, x, ys)
    assert grads["trunk"]["kernel"][...].shape == (2, 8, 32)
    assert grads["heads"][0]["kernel"][...].shape == (32, 1)
    assert grads["bn"]["scale"][...].shape == (2, 32)  # BatchNorm's scale is a shared Param


def test_nnx_eval_mode_uses_running_statistics():
    ns = run_page("custom_loop.md")
    model, x = ns["nnx_model"], ns["x"]
    model.eval()
    out_eval = model(x)
    stats = jax.tree.map(jnp.copy, nnx_state_batchstat(model))
    model.eval()
    np.testing.assert_allclose(model(x), out_eval)  # eval does not change the statistics
    after = nnx_state_batchstat(model)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def nnx_state_batchstat(model):
    from flax import nnx

    return nnx.as_pure(nnx.state(model, nnx.BatchStat))


# ---------------------------------------------------------------------------------------------
# Methods and conflict metrics


def test_methods_page_includes_the_readme_table_and_its_directions_do_not_conflict():
    with open(os.path.join(DOCS, "methods.md")) as f:
        page = f.read()
    assert '```{include} ../README.md\n:start-after: "## Methods"' in page  # one source
    ns = run_page("methods.md")
    flat = np.concatenate([np.asarray(ns["jac"]["w"]), np.asarray(ns["jac"]["b"])], axis=1)
    for name in ("mgda", "upgrad"):
        d = ns["directions"][name]
        d = np.concatenate([np.asarray(d["w"]), np.asarray(d["b"])])
        assert np.all(flat @ d >= -1e-6)
    mean = ns["directions"]["mean"]
    np.testing.assert_allclose(mean["w"], flat[:, :2].mean(axis=0), rtol=1e-6)


def test_conflict_page_metrics_match_numpy_cosines_of_the_rows():
    ns = run_page("conflict.md")
    _, grads = jax.jit(ns["grad_fn"])(ns["params"], ns["x"], ns["y"])
    rows = np.concatenate(
        [np.asarray(g).reshape(3, -1) for g in jax.tree.leaves(grads["shared"])], axis=1
    )
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cos = unit @ unit.T
    expected = np.array([cos[0, 1], cos[0, 2], cos[1, 2]])
    gram = mtl_gramian(grads["shared"])
    conflict = ns["mtl"].conflict
    np.testing.assert_allclose(conflict.pairwise_cosines(gram), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        conflict.conflict_incidence(gram), 100.0 * np.mean(expected < 0), atol=1e-4
    )
    cstate = ns["cstate"]
    assert int(cstate.steps) == 30
    assert set(cstate.severe) == {"global", "shared/dense1", "shared/dense2"}
    assert int(np.sum(cstate.histogram["global"])) == 30 * 3  # every (step, pair) in one bin
    assert float(np.sum(ns["losses"])) < float(np.sum(ns["first"]))


def mtl_gramian(tree):
    import mtl_jax as mtl

    return mtl.gramian.gramian(tree)


# ---------------------------------------------------------------------------------------------
# Recipes


def test_sparse_recipe_freezes_exactly_the_unmasked_weights_and_trains():
    ns = run_page("recipes/sparse.md")
    mask, before, after = ns["mask"], ns["init_params"], ns["params"]
    for layer in ("dense1", "dense2"):
        m = np.asarray(mask["encoder"][layer]["kernel"])
        w0 = np.asarray(before["encoder"][layer]["kernel"])
        w1 = np.asarray(after["encoder"][layer]["kernel"])
        assert np.all(m.sum(axis=0) == 4)  # PSN: 4 incoming weights per output unit
        np.testing.assert_array_equal(w1[~m], w0[~m])  # bit-identical, despite AdamW's decay
        assert np.all(w1[m] != w0[m])
    assert np.asarray(mask["heads"]).all()  # outside include: dense
    first = ns["task_losses"](before, ns["x"], ns["y"])
    assert np.all(np.asarray(ns["losses"]) < 0.5 * np.asarray(first))


def test_lass_recipe_masks_are_per_task_and_training_continues_through_them():
    ns = run_page("recipes/lass.md")
    spec = ns["spec"]
    for layer in ("dense1", "dense2"):
        masks = np.asarray(spec["encoder"][layer]["kernel"].mask)
        assert masks.shape[0] == 2 and masks.dtype == bool
        assert np.all(masks.reshape(2, -1).sum(axis=1) == masks[0].size // 2)  # 50% kept
        assert not np.array_equal(masks[0], masks[1])  # two fine-tuned copies, two masks
        # task t's gradient vanishes outside M_t (computed independently with jax.grad)
        for t in range(2):

            def loss_t(theta, t=t, layer=layer, masks=masks):
                view = jax.tree.map(lambda a: a, ns["params"])
                view["head"] = ns["params"]["head"][t]
                for name in ("dense1", "dense2"):
                    m = np.asarray(spec["encoder"][name]["kernel"].mask[t])
                    w = theta if name == layer else ns["params"]["encoder"][name]["kernel"]
                    view["encoder"] = dict(view["encoder"])
                    view["encoder"][name] = {"kernel": w * m}
                return jnp.mean((ns["forward"](view, ns["x"]) - ns["y"][t]) ** 2)

            g = np.asarray(jax.grad(loss_t)(ns["params"]["encoder"][layer]["kernel"]))
            assert np.all(g[~masks[t]] == 0.0)
            mtl = ns["mtl"]
            grad_fn = mtl.value_and_grads(mtl.PerTaskLosses(ns["task_loss"], spec, 2))
            _, grads = grad_fn(ns["params"], ns["x"], ns["y"])
            np.testing.assert_allclose(
                grads["encoder"][layer]["kernel"][t], g, rtol=1e-4, atol=1e-6
            )
    assert np.all(np.asarray(ns["losses"]) < np.asarray(ns["before"]))


def test_modulation_recipe_has_per_task_scales_that_train_apart():
    ns = run_page("recipes/modulation.md")
    params = ns["params"]
    for name in ("TaskModulation_0", "TaskModulation_1"):
        scales = np.asarray(params[name]["task_scale"])
        assert scales.shape == (2, 32)
        assert not np.allclose(scales, 1.0)  # moved from the identity
        assert not np.allclose(scales[0], scales[1])  # each task its own scale
    assert params["head"]["kernel"].shape == (2, 32, 1)
    assert params["Dense_0"]["kernel"].shape == (8, 32)  # shared: no task axis
    _, grads = jax.jit(ns["grad_fn"])(params, ns["x"], ns["y"])
    assert grads["Dense_0"]["kernel"].shape == (2, 8, 32)  # Jacobian rows of a shared leaf
    assert grads["TaskModulation_0"]["task_scale"].shape == (2, 32)  # own-task copies
    assert np.all(np.asarray(ns["losses"]) < 0.5 * np.asarray(ns["first"]))


def test_recon_recipe_branches_the_selected_layers_with_their_statistics():
    ns = run_page("recipes/recon.md")
    layers, scores = ns["layers"], ns["scores"]
    assert len(layers) == 2 and set(layers) <= set(scores)
    ranked = sorted(scores.values(), reverse=True)
    assert sorted((scores[name] for name in layers), reverse=True) == ranked[:2]
    assert sorted(ns["mtl"].recon.branched_layers(ns["spec"])) == sorted([*layers, "head"])
    variables = ns["variables"]
    for name in [*layers, "head"]:
        for leaf in jax.tree.leaves(variables["params"][name]):
            assert leaf.shape[0] == 2  # per-task copies
        if name.startswith("BatchNorm"):
            mean = np.asarray(variables["batch_stats"][name]["mean"])
            # K rows of statistics, each updated by its own task stream (identical rows when no
            # branched layer precedes this one: the streams see the same input)
            assert mean.shape == (2, 16) and np.abs(mean).max() > 0.01
    shared = [n for n in ("Dense_0", "Dense_1", "Dense_2") if n not in layers]
    for name in shared:
        assert variables["params"][name]["kernel"].ndim == 2  # still one shared array
    assert float(np.sum(ns["losses"])) < float(np.sum(np.var(np.asarray(ns["y"]), axis=(1, 2))))


def test_experiments_page_builds_the_users_data_set():
    ns = run_page("experiments.md")
    dataset = ns["dataset"]
    assert set(dataset.task_names) == {"row", "parity"}
    assert (len(dataset.train), len(dataset.test)) == (96, 32)
    assert dataset.input_shape == (8, 8, 1)


def test_conal_page_points_at_the_module_docstring():
    with open(os.path.join(DOCS, "recipes", "conal.md")) as f:
        page = f.read()
    assert ".. automodule:: mtl_jax.conal" in page


def test_nnx_type_labels_mark_the_head_parameter_only():
    from flax import nnx

    ns = run_page("custom_loop.md")
    labels = ns["is_typed_head"]
    for tree in (ns["typed_params"], nnx.as_pure(ns["typed_params"])):
        marks = dict(zip(_paths(nnx.as_pure(tree)), jax.tree.leaves(labels(tree)), strict=True))
        assert marks == {"head_kernels": True, "trunk/bias": False, "trunk/kernel": False}


def test_nnx_functional_step_on_the_state_equals_the_nnx_optimizer_step():
    import optax
    from flax import nnx

    ns = run_page("custom_loop.md")
    model = ns["NNXNet"](nnx.Rngs(0))
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx, grad_fn, x, ys = ns["nnx_tx"], ns["nnx_grad_fn"], ns["x"], ns["ys"]

    @jax.jit
    def step(params, stats, opt_state):
        (losses, stats), grads = grad_fn(params, stats, x, ys)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), stats, opt_state, losses

    opt_state = tx.init(params)
    for _ in range(60):
        params, stats, opt_state, losses = step(params, stats, opt_state)
    np.testing.assert_allclose(losses, ns["nnx_losses"], rtol=1e-5)
    nnx.update(model, params, stats)
    np.testing.assert_allclose(model.bn.mean[...], ns["nnx_model"].bn.mean[...], rtol=1e-5)
