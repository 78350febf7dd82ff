"""The experiment models: registry and config errors, output shapes, parameter counts against the
PyTorch originals, Recon's per-layer grouping, BatchNorm modes, and a real forward +
``mtl.TrunkAndHeads`` through every model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl
from experiments.losses import head_loss_fns, task_loss
from experiments.models import MODELS, default_model_config, make_model
from experiments.models.segnet import max_pool_with_argmax, max_unpool
from experiments.tasks import TaskSpec

DIGITS = (TaskSpec("left", "classification", 10), TaskSpec("right", "classification", 10))
PLANTS = (TaskSpec("species", "classification", 12), TaskSpec("health", "classification", 2))
NYU = (
    TaskSpec("segmentation", "segmentation", 13),
    TaskSpec("depth", "depth"),
    TaskSpec("normals", "normals"),
)


def _config(name, **overrides):
    cfg = default_model_config(name)
    cfg.update(overrides)
    return cfg


def _num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, shape):
    return jax.eval_shape(lambda k: model.init(k, shape), jax.random.PRNGKey(0))


def _init(model, shape, seed=0):
    """Real variables, fast on the CPU: one jitted init, with the RBG PRNG (threefry's random
    normals take most of the compile time of a small model's init)."""
    return jax.jit(model.init, static_argnums=1)(jax.random.key(seed, impl="rbg"), shape)


def _targets(tasks, batch, hw, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for t in tasks:
        if t.kind == "classification":
            out[t.name] = rng.integers(0, t.num_classes, batch)
        elif t.kind == "segmentation":
            out[t.name] = rng.integers(-1, t.num_classes, (batch, *hw))
        elif t.kind == "depth":
            d = rng.uniform(0.5, 3.0, (batch, *hw, 1))
            d[:, 0] = 0.0  # missing depth
            out[t.name] = d.astype(np.float32)
        else:
            n = rng.normal(size=(batch, *hw, 3))
            n /= np.linalg.norm(n, axis=-1, keepdims=True)
            n[:, 0] = 0.0  # missing normals
            out[t.name] = n.astype(np.float32)
    return jax.tree.map(jnp.asarray, out)


# --------------------------------------------------------------------------- registry and errors


def test_registry_and_default_configs():
    assert set(MODELS) == {
        *("mlp", "lenet", "resnet18", "small_cnn", "small_resnet", "segnet"),
        *("mmoe", "cgc", "ple", "dselect_k", "cross_stitch", "mtan", "ltb"),
    }
    for name, entry in MODELS.items():
        cfg = default_model_config(name)
        assert cfg.name == name
        assert set(cfg.keys()) == {"name", *entry.defaults}


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown model 'vgg'.*'lenet'.*'mlp'"):
        default_model_config("vgg")
    with pytest.raises(ValueError, match="valid models"):
        make_model({"name": "vgg"}, DIGITS, (16, 16, 1))


def test_unknown_key_is_named_with_valid_keys():
    with pytest.raises(ValueError, match=r"\['hidden'\].*'mlp'.*valid keys.*'head_hidden'"):
        make_model({"name": "mlp", "hidden": (8,)}, DIGITS, (16, 16, 1))


def test_partial_config_takes_defaults():
    model = make_model({"name": "mlp", "head_hidden": 0}, DIGITS, (16, 16, 1))
    params = _abstract_init(model, (16, 16, 1))["heads"]["left"]["params"]
    assert set(params) == {"pred"}  # linear head


@pytest.mark.parametrize(
    ("name", "tasks"),
    [("mlp", NYU[:1]), ("resnet18", NYU[1:2]), ("lenet", NYU[2:]), ("segnet", DIGITS[:1])],
)
def test_task_kind_the_model_cannot_serve(name, tasks):
    with pytest.raises(ValueError, match=f"cannot serve task '{tasks[0].name}' of kind"):
        make_model(default_model_config(name), tasks, (32, 32, 3))


def test_bad_tasks_and_shapes():
    with pytest.raises(ValueError, match="unique"):
        make_model(default_model_config("mlp"), (DIGITS[0], DIGITS[0]), (16, 16, 1))
    with pytest.raises(ValueError, match="at least one task"):
        make_model(default_model_config("mlp"), (), (16, 16, 1))
    with pytest.raises(ValueError, match="input_shape"):
        make_model(default_model_config("mlp"), DIGITS, (256,))
    with pytest.raises(ValueError, match="divisible by 2\\*\\*len\\(filters\\) = 32"):
        make_model(default_model_config("segnet"), NYU, (36, 36, 3))
    with pytest.raises(ValueError, match="too small"):
        make_model(default_model_config("lenet"), DIGITS, (12, 12, 1))
    with pytest.raises(ValueError, match="unknown stem"):
        make_model(_config("resnet18", stem="tiny"), DIGITS, (36, 36, 1))


# --------------------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize(
    ("name", "tasks", "shape"),
    [
        ("mlp", DIGITS, (16, 16, 1)),
        ("lenet", DIGITS, (28, 28, 1)),
        ("lenet", DIGITS, (36, 36, 1)),
        ("resnet18", DIGITS, (36, 36, 1)),
        ("resnet18", DIGITS, (32, 32, 3)),
        ("small_cnn", PLANTS, (64, 64, 3)),
        ("segnet", NYU, (32, 32, 3)),
    ],
)
def test_output_shapes_of_default_configs(name, tasks, shape):
    model = make_model(default_model_config(name), tasks, shape)
    variables = _abstract_init(model, shape)
    assert list(model.heads) == [t.name for t in tasks]
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    preds = jax.eval_shape(lambda v, x: model.apply(v, x)[0], variables, x)
    for t in tasks:
        expected = {
            "classification": (2, t.num_classes),
            "segmentation": (2, *shape[:2], t.num_classes),
            "depth": (2, *shape[:2], 1),
            "normals": (2, *shape[:2], 3),
        }[t.kind]
        assert preds[t.name].shape == expected, (name, t.name)


def test_resnet18_matches_recon_parameter_count_and_layers():
    model = make_model(default_model_config("resnet18"), DIGITS, (36, 36, 1))
    variables = _abstract_init(model, (36, 36, 1))
    params, state = model.split(variables)
    # torchvision resnet18 (11,689,512) - its fc (513,000) - 2 input channels of conv1 (6,272)
    # + Recon's fc 512 -> 100 (51,300); heads Linear 100 -> 10.
    assert _num_params(params["encoder"]) == 11_689_512 - 513_000 - 6_272 + 51_300
    assert all(_num_params(h) == 1_010 for h in params["heads"].values())
    assert model.encoder.stem == "imagenet"  # Recon's code keeps the 7x7/2 stem + max-pool
    groups = mtl.gramian.group_names({"params": params["encoder"]}, mtl.gramian.by_module)
    # Recon's layers: 20 convs + 20 BNs (incl. 3 downsample pairs) + fc
    assert len(groups) == 41
    # (dicts that went through a JAX transformation have sorted keys, hence sets here)
    assert {"params/conv1", "params/bn1", "params/fc", "params/layer2_0/downsample_1"} <= set(
        groups
    )
    bn = params["encoder"]["layer1_0"]["bn1"]
    assert set(bn) == {"scale", "bias"}  # one BN layer = one group of two leaves
    assert set(state["encoder"]) == {"batch_stats"}


def test_resnet18_cifar_stem_and_three_channels():
    model = make_model(_config("resnet18", stem="cifar"), DIGITS, (32, 32, 3))
    params = _abstract_init(model, (32, 32, 3))["encoder"]["params"]
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 64)
    assert "fc" in params


def test_segnet_matches_mtan_parameter_count():
    model = make_model(default_model_config("segnet"), NYU, (32, 32, 3))
    params, _ = model.split(_abstract_init(model, (32, 32, 3)))
    # MTAN's model_segnet_split.py prints parameter counts relative to 24,981,069: the SegNet
    # encoder-decoder with one 13-class head.
    assert _num_params(params["encoder"]) + _num_params(params["heads"]["segmentation"]) == (
        24_981_069
    )
    groups = mtl.gramian.group_names({"params": params["encoder"]}, mtl.gramian.by_module)
    assert len(groups) == 52  # 26 conv + 26 BN layers
    assert {"params/encoder_block_0/conv", "params/conv_block_dec_4_1/bn"} <= set(groups)


def test_max_pool_with_argmax_and_unpool_by_hand():
    x = jnp.array(
        [[1.0, 3.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.0], [5.0, 1.0, 2.0, 7.0], [0.0, 6.0, 1.0, 1.0]]
    )
    pooled, mask = max_pool_with_argmax(x[None, :, :, None])
    np.testing.assert_array_equal(pooled[0, :, :, 0], [[3.0, 0.0], [6.0, 7.0]])
    # first maximum in row-major order wins ties (3 at (0,1) before (1,0); 0 at (0,0) of its window)
    np.testing.assert_array_equal(mask[0, :, :, 0].argmax(-1), [[1, 0], [3, 1]])
    up = max_unpool(jnp.array([[10.0, 20.0], [30.0, 40.0]])[None, :, :, None], mask)[0, :, :, 0]
    np.testing.assert_array_equal(up, [[0, 10, 20, 0], [0, 0, 0, 0], [0, 0, 0, 40], [0, 30, 0, 0]])
    grad = jax.grad(lambda x: max_pool_with_argmax(x)[0].sum())(x[None, :, :, None])[0, :, :, 0]
    np.testing.assert_array_equal(grad, [[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]])


# --------------------------------------------------------------------------- BatchNorm modes

# One small BatchNorm model shared by the tests below (same shapes: JAX reuses compiled ops).
SMALL_CNN = {"channels": (4, 8), "feature_dim": 8}
SMALL_SHAPE = (16, 16, 3)


def test_batchnorm_train_updates_stats_and_eval_uses_running_averages():
    model = make_model(_config("small_cnn", **SMALL_CNN), PLANTS, SMALL_SHAPE)
    variables = _init(model, SMALL_SHAPE)
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 1.0, (2, *SMALL_SHAPE)), jnp.float32)
    _, new = model.apply(variables, x, train=True)
    old_mean = variables["encoder"]["batch_stats"]["block0"]["bn"]["mean"]
    new_mean = new["encoder"]["batch_stats"]["block0"]["bn"]["mean"]
    assert not np.allclose(old_mean, new_mean)
    preds, same = model.apply(new, x, train=False)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), same, new)))
    # eval mode: an example's prediction does not depend on the rest of the batch
    alone, _ = model.apply(new, x[:1], train=False)
    np.testing.assert_allclose(alone["species"], preds["species"][:1], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- real forward + grads

# Reduced widths/depths keep the CPU compile short; the code paths are the default models'.
GRAD_CASES = [
    ("mlp", {}, DIGITS, (16, 16, 1)),
    ("lenet", {}, DIGITS, (16, 16, 1)),
    ("resnet18", {"width": 4, "stage_sizes": (1, 1, 1, 1), "feature_dim": 16}, DIGITS, (36, 36, 1)),
    ("small_cnn", SMALL_CNN, PLANTS, SMALL_SHAPE),
    ("small_resnet", {"widths": (2, 4, 4), "feature_dim": 8}, DIGITS, (8, 8, 1)),
    ("segnet", {"filters": (4, 8)}, NYU, (16, 16, 3)),
]


@pytest.mark.parametrize(("name", "overrides", "tasks", "shape"), GRAD_CASES)
def test_forward_and_trunk_and_heads_grads(name, overrides, tasks, shape):
    model = make_model(_config(name, **overrides), tasks, shape)
    params, state = model.split(_init(model, shape, seed=1))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, *shape)), jnp.float32)
    targets = _targets(tasks, 2, shape[:2])
    trunk_and_heads = mtl.TrunkAndHeads(
        model.encoder_fn(state["encoder"], train=True),
        head_loss_fns(model, state["heads"], train=True),
    )
    fn = jax.jit(mtl.value_and_grads(trunk_and_heads, has_aux=True, representation=True))
    (losses, aux), grads = fn({"trunk": params["encoder"], "heads": params["heads"]}, x, targets)
    enc_state, rep_grads = aux["trunk"], aux["rep_grads"]
    enc_jac, head_grads = grads["trunk"], grads["heads"]
    k = len(tasks)
    assert losses.shape == (k,) and bool(jnp.all(jnp.isfinite(losses)))
    jax.tree.map(
        lambda j, p: (j.shape == (k, *p.shape)) or pytest.fail("jac shape"),
        enc_jac,
        params["encoder"],
    )
    assert all(bool(jnp.all(jnp.isfinite(j))) for j in jax.tree.leaves(enc_jac))
    assert set(head_grads) == {t.name for t in tasks}
    assert jax.tree.leaves(rep_grads)[0].shape[0] == k
    has_bn = "batch_stats" in state["encoder"]
    assert has_bn == (name in ("resnet18", "small_cnn", "small_resnet", "segnet"))
    if has_bn:
        assert jax.tree.structure(enc_state) == jax.tree.structure(state["encoder"])
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), enc_state, state["encoder"])
        assert any(jax.tree.leaves(changed))


@pytest.mark.slow
def test_jacobian_rows_are_per_task_gradients_through_batchnorm():
    shape = (4, 4, 1)
    model = make_model(_config("small_cnn", channels=(2,), feature_dim=0), DIGITS, shape)
    params, state = model.split(_init(model, shape, seed=3))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, *shape)), jnp.float32)
    targets = _targets(DIGITS, 3, shape[:2], seed=5)
    trunk_and_heads = mtl.TrunkAndHeads(
        model.encoder_fn(state["encoder"], True), head_loss_fns(model, state["heads"], True)
    )
    fn = mtl.value_and_grads(trunk_and_heads, has_aux=True)
    (losses, _), grads = fn({"trunk": params["encoder"], "heads": params["heads"]}, x, targets)
    enc_jac, head_grads = grads["trunk"], grads["heads"]

    def all_losses(p):  # the plain full-model losses, differentiated by jax.jacrev
        preds, _ = model.apply(model.merge(p, state), x, train=True)
        return jnp.stack([task_loss(t, preds[t.name], targets[t.name]) for t in DIGITS])

    np.testing.assert_allclose(losses, all_losses(params), rtol=1e-5)
    jac = jax.jacrev(all_losses)(params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, enc_jac, jac["encoder"])
    for i, t in enumerate(DIGITS):
        jax.tree.map(lambda g, j, i=i: close(g, j[i]), head_grads[t.name], jac["heads"][t.name])


# --------------------------------------------------------------------------- small_resnet

TRANSFORMS = (
    TaskSpec("digit", "classification", 10),
    TaskSpec("rotation", "classification", 4),
    TaskSpec("thickness", "classification", 3),
)
TINY_RESNET = {"widths": (2, 4, 4), "feature_dim": 8}


def test_small_resnet_blocks_and_recon_layers():
    model = make_model(default_model_config("small_resnet"), TRANSFORMS, (16, 16, 1))
    params, state = model.split(_abstract_init(model, (16, 16, 1)))
    assert set(params["encoder"]) == {"stem", "block1", "block2", "block3", "neck"}
    groups = mtl.gramian.group_names({"params": params["encoder"]}, mtl.gramian.by_module)
    # stem conv + bn; block1 2 convs + 2 BNs; block2/3 also a downsample conv + BN; neck fc
    assert len(groups) == 19
    assert sum(g.endswith(("bn", "bn1", "bn2", "downsample_1")) for g in groups) == 9
    assert set(state["encoder"]) == {"batch_stats"}
    # widths 8/16/32, 3x3 convs without bias, 1x1 downsample
    enc = params["encoder"]
    assert enc["stem"]["conv"]["kernel"].shape == (3, 3, 1, 8)
    assert enc["block3"]["conv2"]["kernel"].shape == (3, 3, 32, 32)
    assert enc["block3"]["downsample_0"]["kernel"].shape == (1, 1, 16, 32)
    assert enc["neck"]["fc"]["kernel"].shape == (32, 32)
    assert _num_params(params["heads"]["rotation"]) == 32 * 4 + 4


def test_small_resnet_encoder_blocks_chain_to_the_encoder():
    from experiments.models.small_resnet import BLOCK_NAMES, encoder_blocks

    config = _config("small_resnet", **TINY_RESNET)
    model = make_model(config, TRANSFORMS, (8, 8, 1))
    variables = _init(model, (8, 8, 1), seed=2)["encoder"]
    blocks = encoder_blocks(config, (8, 8, 1))
    assert [b.name for b in blocks] == list(BLOCK_NAMES)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
    y = x
    for block in blocks:  # each block applied with its own slice of the encoder's variables
        own = {k: v[block.name] for k, v in variables.items() if block.name in v}
        y = block.apply(own, y, train=False)
    np.testing.assert_allclose(y, model.encoder.apply(variables, x, train=False), rtol=1e-6)
    assert y.shape == (3, 8)


def test_small_resnet_bad_configs():
    with pytest.raises(ValueError, match="widths must be three"):
        make_model(_config("small_resnet", widths=(4, 8)), TRANSFORMS, (16, 16, 1))
    with pytest.raises(ValueError, match="strides must be three values"):
        make_model(_config("small_resnet", strides=(1, 3, 2)), TRANSFORMS, (16, 16, 1))
    with pytest.raises(ValueError, match="too small for 3 stride-2 blocks"):
        make_model(_config("small_resnet", strides=(2, 2, 2)), TRANSFORMS, (4, 4, 1))


@pytest.mark.slow
def test_small_resnet_nnx_matches_linen():
    """Same module names and shapes; with the Linen weights copied in, the same predictions in
    eval mode (running statistics) and train mode (batch statistics)."""
    from flax import nnx

    from experiments.models.small_resnet import make_nnx_model

    config = _config("small_resnet", **TINY_RESNET)
    shape = (8, 8, 1)
    linen = make_model(config, TRANSFORMS, shape)
    variables = _init(linen, shape, seed=4)
    x = jnp.asarray(np.random.default_rng(1).normal(1.0, 1.0, (4, *shape)), jnp.float32)
    _, variables = linen.apply(variables, x, train=True)  # non-trivial running statistics
    params, state = linen.split(variables)

    model = make_nnx_model(config, TRANSFORMS, shape, seed=0)
    nnx_params = nnx.state(model, nnx.Param)
    linen_groups = mtl.gramian.group_names({"params": params["encoder"]}, mtl.gramian.by_module)
    nnx_groups = mtl.gramian.group_names(nnx_params["encoder"], mtl.gramian.by_module)
    assert sorted(g.removeprefix("params/") for g in linen_groups) == sorted(nnx_groups)
    assert _num_params(nnx_params) == _num_params(params)
    assert [type(b).__name__ for b in model.encoder.blocks] == [
        "NNXStem",
        *["NNXBasicBlock"] * 3,
        "NNXNeck",
    ]

    pure = nnx.to_pure_dict(nnx.state(model))
    enc_stats = state["encoder"]["batch_stats"]

    def fill(tree, linen_params, stats):
        for key, value in tree.items():
            if isinstance(value, dict):
                fill(value, linen_params.get(key, {}), stats.get(key, {}) if stats else {})
            elif key in linen_params:
                tree[key] = linen_params[key]
            else:
                tree[key] = stats[key]

    fill(pure["encoder"], params["encoder"], enc_stats)
    for name in pure["heads"]:
        fill(pure["heads"][name], params["heads"][name], {})
    nnx.update(model, pure)
    for train in (False, True):
        model.train() if train else model.eval()
        got = model(x)
        want, _ = linen.apply(variables, x, train=train)
        for t in TRANSFORMS:
            np.testing.assert_allclose(got[t.name], want[t.name], rtol=1e-5, atol=1e-5)
