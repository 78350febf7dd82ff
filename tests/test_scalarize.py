"""Loss-only methods (mtl_jax/scalarization/) against NumPy implementations of their papers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl
from mtl_jax import scalarization as S
from tests import _matrices as M
from tests import _reference as R

K = 3
LOSSES = np.array([0.5, 1.3, 2.0])


def _sequence(steps: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [LOSSES * rng.uniform(0.5, 1.5, size=K) for _ in range(steps)]


def _make(name: str):
    return mtl.scalarization.get_scalarizer(
        name, **({"nadir_steps": 1} if name == "stch_official" else {})
    )


@pytest.mark.parametrize("name", sorted(mtl.scalarization.SCALARIZERS))
def test_weights_are_the_gradient_of_the_loss_and_everything_jits(name):
    """``d loss / d L_k = weights[k]`` (what the docstrings call the effective weights), pure and
    jit-able: the same outputs with and without jit, and the state is not differentiated."""
    sc = mtl.scalarization.get_scalarizer(name)
    state = sc.init(K)
    norms = jnp.array([1.0, 2.0, 0.5])

    def objective(losses, state):
        loss, weights, new_state = sc.scalarize(losses, state, grad_norms=norms)
        return loss, (weights, new_state)

    for _ in range(3):  # also after the state has moved
        (loss, (weights, new_state)), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(
            jnp.asarray(LOSSES, jnp.float32), state
        )
        eager_loss, eager_weights, _ = sc.scalarize(jnp.asarray(LOSSES), state, grad_norms=norms)
        np.testing.assert_allclose(grad, weights, rtol=1e-5)
        np.testing.assert_allclose(eager_loss, loss, rtol=1e-5)
        np.testing.assert_allclose(eager_weights, weights, rtol=1e-5)
        assert np.isfinite(float(loss))
        state = sc.post_step(new_state, jnp.asarray(0.9 * LOSSES, jnp.float32))


def test_registry_errors():
    with pytest.raises(ValueError, match=r"Unknown scalarizer 'famo2'.*valid names.*famo"):
        mtl.scalarization.get_scalarizer("famo2")
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) \['lr'\].*'w_lr'"):
        mtl.scalarization.get_scalarizer("famo", lr=0.1)
    with pytest.raises(ValueError, match="init needs the number of tasks"):
        mtl.scalarization.get_scalarizer("uw").init(None)
    sc = mtl.scalarization.get_scalarizer("uw")
    with pytest.raises(ValueError, match="losses has 2 entries but the state was made for K=3"):
        sc.scalarize(jnp.ones(2), sc.init(3))


def test_mean_sum_gls():
    L = jnp.asarray(LOSSES)
    assert float(mtl.scalarization.get_scalarizer("mean").scalarize(L, None)[0]) == pytest.approx(
        LOSSES.mean()
    )
    assert float(mtl.scalarization.get_scalarizer("sum").scalarize(L, None)[0]) == pytest.approx(
        LOSSES.sum()
    )
    loss, w, _ = mtl.scalarization.get_scalarizer("gls").scalarize(L, None)
    gm = np.prod(LOSSES) ** (1 / K)
    np.testing.assert_allclose(loss, gm, rtol=1e-6)
    np.testing.assert_allclose(w, gm / (K * LOSSES), rtol=1e-6)


@pytest.mark.parametrize("name", ["uw", "imtl_l"])
def test_learned_weights_match_reference(name):
    seq = _sequence(6)
    ref = {"uw": R.uw_ref, "imtl_l": R.imtl_l_ref}[name](seq, 0.05)
    sc = mtl.scalarization.get_scalarizer(name, learning_rate=0.05)
    with jax.enable_x64(True):
        state = sc.init(K)
        for L, (ref_loss, ref_w) in zip(seq, ref, strict=True):
            loss, w, state = sc.scalarize(jnp.asarray(L), state)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
            np.testing.assert_allclose(w, ref_w, rtol=1e-12)


def test_uw_log_variances_converge_to_log_losses():
    sc = mtl.scalarization.get_scalarizer("uw", learning_rate=0.05)
    state = sc.init(K)
    step = jax.jit(sc.scalarize)
    for _ in range(2000):
        _, _, state = step(jnp.asarray(LOSSES, jnp.float32), state)
    np.testing.assert_allclose(state.params, np.log(LOSSES), atol=2e-3)


def test_dwa_matches_reference_with_epochs():
    seq = _sequence(9, seed=1)
    ref = R.dwa_ref(seq, temperature=2.0, steps_per_epoch=2)
    sc = mtl.scalarization.get_scalarizer("dwa", steps_per_epoch=2)
    with jax.enable_x64(True):
        state = sc.init(K)
        for L, (ref_loss, ref_w) in zip(seq, ref, strict=True):
            loss, w, state = sc.scalarize(jnp.asarray(L), state)
            np.testing.assert_allclose(w, ref_w, rtol=1e-12)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    assert not np.allclose(ref[-1][1], 1.0)  # the weights did move


@pytest.mark.parametrize("pref", [None, [0.2, 0.3, 0.5], [0.0, 1.0, 1.0]])
def test_pbi_and_cosmos_match_their_papers(pref):
    with jax.enable_x64(True):  # float64: the references are exact
        for losses in (LOSSES, np.array([1.0, 1.0, 1.0]), np.array([3.0, 0.1, 0.7])):
            for theta in (0.0, 5.0):
                sc = mtl.scalarization.get_scalarizer("pbi", theta=theta, pref_vector=pref)
                loss, weights, _ = sc.scalarize(jnp.asarray(losses, jnp.float64), sc.init(K))
                ref_loss, ref_weights = R.pbi_ref(
                    losses, theta, None if pref is None else np.array(pref)
                )
                np.testing.assert_allclose(
                    [loss, *weights], [ref_loss, *ref_weights], rtol=1e-10, atol=1e-12
                )
            for lam in (0.0, 2.0):
                sc = mtl.scalarization.get_scalarizer("cosmos", lam=lam, pref_vector=pref)
                loss, weights, _ = sc.scalarize(jnp.asarray(losses, jnp.float64), sc.init(K))
                ref_loss, ref_weights = R.cosmos_ref(
                    losses, lam, None if pref is None else np.array(pref)
                )
                np.testing.assert_allclose([loss, *weights], [ref_loss, *ref_weights], rtol=1e-10)


def test_pbi_on_the_preference_ray_is_progress_along_it_and_bad_preferences_are_errors():
    pref = np.array([1.0, 2.0, 2.0])
    losses = 0.7 * pref  # on the ray: d2 = 0, its gradient taken as 0
    sc = mtl.scalarization.get_scalarizer("pbi", theta=5.0, pref_vector=pref)
    loss, weights, _ = sc.scalarize(jnp.asarray(losses), sc.init(K))
    np.testing.assert_allclose(loss, 0.7 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(weights, pref / 3.0, rtol=1e-6)
    for name in ("pbi", "cosmos"):
        with pytest.raises(ValueError, match=r"pref_vector has shape \(2,\); expected \(3,\)"):
            mtl.scalarization.get_scalarizer(name, pref_vector=[0.5, 0.5]).init(K)
        with pytest.raises(ValueError, match="non-negative and not all zero"):
            mtl.scalarization.get_scalarizer(name, pref_vector=[0.5, -0.5, 1.0]).init(K)


def test_stch_paper_form_and_official_recipe():
    pref, ref_point = np.array([0.2, 0.3, 0.5]), np.array([0.1, 0.0, 0.5])
    for mu in (0.1, 1.0):
        sc = mtl.scalarization.get_scalarizer("stch", mu=mu, pref_vector=pref, reference=ref_point)
        with jax.enable_x64(True):
            loss, _, _ = sc.scalarize(jnp.asarray(LOSSES), sc.init(K))
        np.testing.assert_allclose(loss, R.stch_ref(LOSSES, mu, pref, ref_point), rtol=1e-12)
    # Official recipe: 2 warm-up calls, then 2 calls collect the nadir, then STCH on log(L / n).
    seq = _sequence(6, seed=2)
    sc = mtl.scalarization.get_scalarizer("stch", mu=0.5, warmup_steps=2, nadir_steps=2)
    with jax.enable_x64(True):
        state = sc.init(K)
        for t, L in enumerate(seq):
            loss, _, state = sc.scalarize(jnp.asarray(L), state)
            if t < 4:
                np.testing.assert_allclose(loss, np.sum(np.log(L)), rtol=1e-12)
            else:
                nadir = (seq[2] + seq[3]) / 2
                expected = K * 0.5 * np.log(np.sum(np.exp(np.log(L / nadir) / 0.5)))
                np.testing.assert_allclose(loss, expected, rtol=1e-10)


def test_famo_matches_official_update_with_post_step():
    rng = np.random.default_rng(3)
    pairs = []
    for _ in range(5):
        before = LOSSES * rng.uniform(0.5, 1.5, size=K)
        pairs.append((before, before * rng.uniform(0.8, 1.0, size=K)))
    ref = R.famo_ref(pairs, gamma=0.01, w_lr=0.025)
    sc = mtl.scalarization.get_scalarizer("famo")
    with jax.enable_x64(True):
        state = sc.init(K)
        for (before, after), (ref_loss, ref_w) in zip(pairs, ref, strict=True):
            loss, w, state = sc.scalarize(jnp.asarray(before), state)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
            np.testing.assert_allclose(w, ref_w, rtol=1e-10)
            np.testing.assert_allclose(np.sum(w), 1.0, rtol=1e-12)
            state = sc.post_step(state, jnp.asarray(after))
    assert not np.allclose(state.logits, 0.0)


def test_gradnorm_matches_algorithm_1_and_needs_grad_norms():
    seq = _sequence(6, seed=4)
    norms = [np.array([1.0, 3.0, 0.5]) * (1 + 0.1 * t) for t in range(6)]
    ref = R.gradnorm_ref(seq, norms, alpha=1.5, lr=0.025)
    sc = mtl.scalarization.get_scalarizer("gradnorm")
    with jax.enable_x64(True):
        state = sc.init(K)
        for L, n, ref_w in zip(seq, norms, ref, strict=True):
            loss, w, state = sc.scalarize(jnp.asarray(L), state, grad_norms=jnp.asarray(n))
            np.testing.assert_allclose(w, ref_w, rtol=1e-12)
            np.testing.assert_allclose(loss, ref_w @ L, rtol=1e-12)
        np.testing.assert_allclose(np.sum(np.asarray(state.weights)), K, rtol=1e-12)
    with pytest.raises(ValueError, match="gradnorm needs grad_norms"):
        sc.scalarize(jnp.asarray(LOSSES, jnp.float32), sc.init(K))


def test_layer_grad_norms_reads_the_rows_of_a_layer():
    J = M.sample("normal", K)
    jac = M.to_tree(J)
    expected = np.linalg.norm(J[:, :14], axis=1)  # enc/w and enc/b
    np.testing.assert_allclose(mtl.scalarization.layer_grad_norms(jac, "enc"), expected, rtol=1e-6)
    np.testing.assert_allclose(
        mtl.scalarization.layer_grad_norms(jac, lambda path: path == "head"),
        np.linalg.norm(J[:, 14:], axis=1),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="selects no leaf"):
        mtl.scalarization.layer_grad_norms(jac, "decoder")


def test_rlw_is_reproducible_and_on_the_simplex():
    sc = mtl.scalarization.get_scalarizer("rlw", seed=7)
    state = sc.init(K)
    _, w1, state1 = sc.scalarize(jnp.asarray(LOSSES), state)
    _, w1_again, _ = sc.scalarize(jnp.asarray(LOSSES), state)
    _, w2, _ = sc.scalarize(jnp.asarray(LOSSES), state1)
    np.testing.assert_array_equal(w1, w1_again)
    assert not np.allclose(w1, w2)
    np.testing.assert_allclose(np.sum(w1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["uw", "famo", "dwa", "gradnorm"])
def test_non_finite_losses_leave_the_state_unchanged(name):
    sc = mtl.scalarization.get_scalarizer(name)
    state = sc.init(K)
    bad = jnp.array([1.0, jnp.nan, 2.0])
    loss, _, new = sc.scalarize(bad, state, grad_norms=jnp.ones(K))
    assert not np.isfinite(float(loss))
    M.assert_trees_equal(new, state)


def test_train_loop_with_famo_and_a_jitted_step():
    """The documented train step: FAMO's post-step losses come from an extra forward pass."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64, K)) * np.array([1.0, 10.0, 0.1]), jnp.float32)

    def task_losses(params):
        return jnp.mean((x @ params - y) ** 2, axis=0) + 0.01

    sc = mtl.scalarization.get_scalarizer("famo")
    tx = optax.adam(0.05)

    @jax.jit
    def step(params, opt_state, sc_state):
        def objective(p):
            loss, _, new_state = sc.scalarize(task_losses(p), sc_state)
            return loss, new_state

        grads, sc_state = jax.grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, sc.post_step(sc_state, task_losses(params))

    params = jnp.zeros((5, K))
    opt_state, sc_state = tx.init(params), sc.init(K)
    start = np.asarray(task_losses(params))
    for _ in range(100):
        params, opt_state, sc_state = step(params, opt_state, sc_state)
    assert np.all(np.asarray(task_losses(params)) < start)
    assert isinstance(sc_state, S.FAMOState)


def test_package_names_are_the_registered_factories_and_no_builtin_is_shadowed():
    """``mtl_jax.scalarization.<name>`` is the factory registered as ``name`` (not the module of
    the same name), and the summed loss is ``sum_`` (registry name ``"sum"``)."""
    for name, factory in mtl.scalarization.SCALARIZERS.items():
        assert getattr(S, "sum_" if name == "sum" else name) is factory, name
    assert not hasattr(S, "sum")
    assert set(S.__all__) <= set(dir(S))


def _famo_chain():
    sc = mtl.scalarization.get_scalarizer("famo")
    tx = optax.chain(
        mtl.scalarization.from_scalarizer(sc, num_tasks=K, name="famo"), optax.sgd(0.1)
    )
    params = {"w": jnp.zeros((4,))}
    jac = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(K, 4)), jnp.float32)}
    state = tx.init(params)
    _, state = tx.update(jac, state, params, task_losses=jnp.asarray(LOSSES, jnp.float32))
    return sc, tx, state


def test_post_step_in_state_steps_the_famo_state_inside_a_chain():
    sc, _, state = _famo_chain()
    after = jnp.asarray(LOSSES * np.array([0.9, 0.6, 0.95]), jnp.float32)
    inner = state[0].inner["scalarizer"]  # the chain's first transform: the aggregator
    expected = sc.post_step(inner, after)
    assert not np.allclose(expected.logits, inner.logits)  # the post-step does move the logits
    jitted = jax.jit(mtl.scalarization.post_step_in_state, static_argnums=1)
    for fn, rtol in (
        (mtl.scalarization.post_step_in_state, 0.0),
        (jitted, 1e-6),
    ):  # jit: XLA's rounding
        new = fn(state, sc, after)
        close = functools.partial(np.testing.assert_allclose, rtol=rtol)
        jax.tree.map(close, new[0].inner["scalarizer"], expected)
        # everything else is untouched, the structure included
        assert jax.tree.structure(new) == jax.tree.structure(state)
        for field in ("key", "weights", "gram"):
            M.assert_trees_equal(getattr(new[0], field), getattr(state[0], field))
        M.assert_trees_equal(new[1], state[1])


def test_post_step_in_state_steps_every_scalarizer_and_ignores_other_states():
    sc, _, state = _famo_chain()
    after = jnp.asarray(LOSSES * np.array([0.9, 0.6, 0.95]), jnp.float32)
    expected = sc.post_step(state[0].inner["scalarizer"], after)
    # two chains side by side (e.g. two partitions), and one decoy dict with the same key
    nested = {"a": state, "b": (optax.EmptyState(), state), "decoy": {"scalarizer": jnp.ones(3)}}
    new = mtl.scalarization.post_step_in_state(nested, sc, after)
    for chain_state in (new["a"], new["b"][1]):
        M.assert_trees_equal(chain_state[0].inner["scalarizer"], expected)
    np.testing.assert_array_equal(new["decoy"]["scalarizer"], jnp.ones(3))
    # an optax state without a scalarizer comes back unchanged
    plain = optax.adam(0.1).init({"w": jnp.zeros(2)})
    assert mtl.scalarization.post_step_in_state(plain, sc, after) is plain
