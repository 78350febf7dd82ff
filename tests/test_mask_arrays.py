"""Masks as arrays: ``mtl.sharing.split_masks`` and the ``masks=`` keyword of per_task / per_task_grads.

A spec's masks are constants of the program; split off, they are arguments: no constant of the
mask's size in the traced program, the same values bit for bit, no recompilation when the mask
values change, and clear errors for masks that do not fit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_jax as mtl
from tests._programs import traced_consts

K, B, D, H = 2, 5, 8, 32  # mask of dense1: bool[2, 8, 32]


def _params(seed: int = 0) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "dense1": {"kernel": jax.random.normal(k1, (D, H)), "bias": jnp.zeros((H,))},
        "dense2": {"kernel": jax.random.normal(k2, (H, H)) / H**0.5},
        "head": jax.random.normal(k3, (K, H, 1)),  # one head per task: copied
    }


def _apply(p: dict, x: jax.Array) -> jax.Array:  # one task's view; head [H, 1]
    z = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
    z = jnp.tanh(z @ p["dense2"]["kernel"])
    return z @ p["head"]


def _random_masks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((K, D, H)) < 0.5, rng.random((K, H, H)) < 0.7


def _spec(m1: np.ndarray, m2: np.ndarray) -> dict:
    return {
        "dense1": {"kernel": mtl.sharing.Masked(m1), "bias": mtl.SHARED},
        "dense2": {"kernel": mtl.sharing.Masked(m2)},
        "head": mtl.COPIED,
    }


def _task_loss(view: dict, t: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((_apply(view, x) - y[t]) ** 2)


def _data() -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.PRNGKey(7))
    return jax.random.normal(kx, (B, D)), jax.random.normal(ky, (K, B, 1))


def _reference_forward(params: dict, m1: np.ndarray, m2: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Plain NumPy: task t's forward with theta * M_t (float64)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    outs = []
    for t in range(K):
        z = np.tanh(x @ (p["dense1"]["kernel"] * m1[t]) + p["dense1"]["bias"])
        z = np.tanh(z @ (p["dense2"]["kernel"] * m2[t]))
        outs.append(z @ p["head"][t])
    return np.stack(outs)


def test_split_masks_gives_a_structure_and_array_masks_that_join_back():
    m1, m2 = _random_masks(0)
    spec = _spec(m1, m2)
    structure, masks = mtl.sharing.split_masks(spec)
    assert isinstance(structure["dense1"]["kernel"], mtl.sharing.Masked)
    assert structure["dense1"]["kernel"].mask is None
    assert structure["head"] is mtl.COPIED and structure["dense1"]["bias"] is mtl.SHARED
    assert masks["head"] is None and masks["dense1"]["bias"] is None
    assert isinstance(masks["dense1"]["kernel"], jax.Array)
    np.testing.assert_array_equal(masks["dense2"]["kernel"], m2)
    joined = mtl.sharing.with_masks(structure, masks)
    np.testing.assert_array_equal(joined["dense1"]["kernel"].mask, m1)
    sizes_spec, sizes_masks = mtl.lass.subnetwork_sizes(spec), mtl.lass.subnetwork_sizes(masks)
    np.testing.assert_array_equal(sizes_spec["kept"], sizes_masks["kept"])
    np.testing.assert_array_equal(sizes_spec["overlap"], sizes_masks["overlap"])
    with pytest.raises(ValueError, match=r"dense1/kernel.*mask slots.*pass the masks"):
        mtl.lass.subnetwork_sizes(structure)
    with pytest.raises(ValueError, match=r"already mask slots"):
        mtl.sharing.split_masks(structure)


def test_array_masks_equal_the_constant_masks_and_a_numpy_reference():
    params, (x, y) = _params(), _data()
    m1, m2 = _random_masks(1)
    spec = _spec(m1, m2)
    structure, masks = mtl.sharing.split_masks(spec)
    old = jax.jit(mtl.per_task(_apply, spec, K))(params, x)
    new = jax.jit(mtl.per_task(_apply, structure, K))(params, x, masks=masks)
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    ref = _reference_forward(params, m1, m2, np.asarray(x, np.float64))
    np.testing.assert_allclose(np.asarray(new), ref, rtol=1e-5, atol=1e-5)
    # task_params with the masks: task 1's view gives row 1
    view = mtl.sharing.task_params(params, structure, 1, masks=masks)
    np.testing.assert_array_equal(
        view["dense1"]["kernel"] == 0, ~m1[1] | (params["dense1"]["kernel"] == 0)
    )
    for unroll in (False, True):
        g_old = jax.jit(
            mtl.value_and_grads(
                mtl.PerTaskLosses(_task_loss, spec, K), task_map="unroll" if unroll else "vmap"
            )
        )(params, x, y)
        g_new = jax.jit(
            mtl.value_and_grads(
                mtl.PerTaskLosses(_task_loss, structure, K), task_map="unroll" if unroll else "vmap"
            )
        )(params, x, y, masks=masks)
        for a, b in zip(jax.tree.leaves(g_old), jax.tree.leaves(g_new), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # task t's gradient is exactly zero outside M_t
        jac = np.asarray(g_new[1]["dense2"]["kernel"])
        assert np.all(jac[0][~m2[0]] == 0) and np.all(jac[1][~m2[1]] == 0)
        assert np.any(jac[0][m2[0]] != 0)


def _large_consts(fn, *args, min_size: int, **kwargs) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of each constant of ``min_size`` or more elements the traced program of
    ``fn`` closes over: what ``jit`` embeds in the program (read from the jaxpr, not XLA's text)."""
    return [
        (c.shape, c.dtype.name) for c in traced_consts(fn, *args, **kwargs) if c.size >= min_size
    ]


def _forward_and_args(spec_or_structure):
    params, (x, _) = _params(), _data()
    return mtl.per_task(_apply, spec_or_structure, K), (params, x)


def _grads_and_args(spec_or_structure):
    params, (x, y) = _params(), _data()
    return mtl.value_and_grads(mtl.PerTaskLosses(_task_loss, spec_or_structure, K)), (params, x, y)


@pytest.mark.parametrize("make", [_forward_and_args, _grads_and_args], ids=["per_task", "grads"])
def test_constant_masks_are_in_the_program_array_masks_are_not(make):
    spec = _spec(*_random_masks(2))
    structure, masks = mtl.sharing.split_masks(spec)
    mask_aval = ((K, D, H), "bool")
    old, args = make(spec)
    new, _ = make(structure)
    old_consts = _large_consts(old, *args, min_size=K * D * H)
    assert mask_aval in old_consts, "the constant-mask path embeds the mask"
    assert not _large_consts(new, *args, masks=masks, min_size=K * D * H)  # none that large
    in_avals = jax.make_jaxpr(new)(*args, masks=masks).in_avals
    assert mask_aval in [(a.shape, a.dtype.name) for a in in_avals]  # an argument instead


def test_new_mask_values_do_not_recompile():
    params, (x, y) = _params(), _data()
    structure, masks_a = mtl.sharing.split_masks(_spec(*_random_masks(3)))
    _, masks_b = mtl.sharing.split_masks(_spec(*_random_masks(4)))
    traces = []

    def loss(view, t, x, y):
        traces.append(1)  # a side effect at trace time only
        return _task_loss(view, t, x, y)

    fn = jax.jit(mtl.value_and_grads(mtl.PerTaskLosses(loss, structure, K)))
    losses_a, _ = fn(params, x, y, masks=masks_a)
    losses_b, _ = fn(params, x, y, masks=masks_b)
    assert len(traces) == 1
    assert fn._cache_size() == 1
    assert not np.array_equal(np.asarray(losses_a), np.asarray(losses_b))  # the masks are used
    expected_b = jax.jit(
        mtl.value_and_grads(mtl.PerTaskLosses(_task_loss, _spec(*_random_masks(4)), K))
    )(params, x, y)
    np.testing.assert_array_equal(np.asarray(losses_b), np.asarray(expected_b[0]))


def test_masks_as_a_tree_of_the_masked_leaves_only():
    params, (x, _) = _params(), _data()
    m1, m2 = _random_masks(5)
    structure, _ = mtl.sharing.split_masks(_spec(m1, m2))
    only = {
        "dense1": {"kernel": jnp.asarray(m1)},
        "dense2": {"kernel": jnp.asarray(m2, jnp.float32)},
    }
    out = mtl.per_task(_apply, structure, K)(params, x, masks=only)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(mtl.per_task(_apply, _spec(m1, m2), K)(params, x))
    )


def test_masks_that_do_not_fit_raise_naming_the_leaf_and_shapes():
    params, (x, y) = _params(), _data()
    m1, m2 = _random_masks(6)
    structure, masks = mtl.sharing.split_masks(_spec(m1, m2))
    fwd = mtl.per_task(_apply, structure, K)
    grads = mtl.value_and_grads(mtl.PerTaskLosses(_task_loss, structure, K))
    wrong = {**masks, "dense2": {"kernel": jnp.ones((K, H, H + 1), bool)}}
    msg = r"dense2/kernel: got shape \(2, 32, 33\), expected \(2, 32, 32\)"
    with pytest.raises(ValueError, match=msg):
        fwd(params, x, masks=wrong)
    with pytest.raises(ValueError, match=msg):
        jax.jit(grads)(params, x, y, masks=wrong)
    wrong_k = {**masks, "dense1": {"kernel": jnp.ones((K + 1, D, H), bool), "bias": None}}
    with pytest.raises(
        ValueError, match=r"dense1/kernel: got shape \(3, 8, 32\), expected \(2, 8, 32\)"
    ):
        fwd(params, x, masks=wrong_k)
    missing = {"dense1": {"kernel": masks["dense1"]["kernel"]}}
    with pytest.raises(ValueError, match=r"without a mask: \[dense2/kernel\]"):
        fwd(params, x, masks=missing)
    extra = {**masks, "head": jnp.ones((K, H, 1), bool)}
    with pytest.raises(ValueError, match=r"masks without a masked leaf: \[head\]"):
        fwd(params, x, masks=extra)
    with pytest.raises(ValueError, match=r"PerTaskLosses.*dense1/kernel, dense2/kernel.*masks="):
        grads(params, x, y)  # mask slots and no masks
    with pytest.raises(ValueError, match=r"dense2/kernel: dtype"):
        fwd(params, x, masks={**masks, "dense2": {"kernel": np.full((K, H, H), "a")}})


def test_masks_keyword_passes_through_without_masked_leaves():
    """Backward compatible: a spec without Masked leaves leaves ``masks=`` to apply_fn."""
    params, (x, _) = _params(), _data()
    spec = {"dense1": mtl.SHARED, "dense2": mtl.SHARED, "head": mtl.COPIED}
    seen = []

    def apply(p, x, masks=None):
        seen.append(masks)
        return _apply(p, x)

    mtl.per_task(apply, spec, K)(params, x, masks="apply's own")
    assert seen == ["apply's own"]


def test_a_spec_holding_masks_takes_replacement_masks():
    params, (x, _) = _params(), _data()
    spec_a, spec_b = _spec(*_random_masks(8)), _spec(*_random_masks(9))
    _, masks_b = mtl.sharing.split_masks(spec_b)
    out = mtl.per_task(_apply, spec_a, K)(params, x, masks=masks_b)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(mtl.per_task(_apply, spec_b, K)(params, x))
    )
