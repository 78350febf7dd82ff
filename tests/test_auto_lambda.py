"""Auto-Lambda against a NumPy reference written from the paper (Liu et al., TMLR 2022).

The model is a one-hidden-layer tanh network with K linear heads whose gradients are written by
hand in NumPy; the hypergradient reference is the paper's look-ahead,
``d L_val(theta - alpha sum_k lambda_k grad L_k(theta)) / d lambda``, checked once more by a
central finite difference of the validation loss in ``lambda`` (independent of the chain rule).
The meta optimiser is Adam written from Kingma & Ba (2015), Algorithm 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_jax as mtl

K, D, H, N = 3, 4, 5, 12

# ---------------------------------------------------------------------------------------------
# NumPy reference model and method.


def losses_ref(theta, x, y):
    w, v = theta
    z = np.tanh(x @ w)
    return np.mean((z @ v.T - y.T) ** 2, axis=0)  # [K]


def grads_ref(theta, x, y):
    """``[(dL_k/dW, dL_k/dV)]`` for every task k, by hand."""
    w, v = theta
    z = np.tanh(x @ w)
    out = []
    for k in range(v.shape[0]):
        r = z @ v[k] - y[k]
        dv = np.zeros_like(v)
        dv[k] = 2.0 / len(r) * z.T @ r
        dz = 2.0 / len(r) * r[:, None] * v[k][None, :]
        out.append((x.T @ (dz * (1.0 - z**2)), dv))
    return out


def lookahead_ref(theta, lam, train, alpha):
    g = grads_ref(theta, *train)
    return tuple(t - alpha * sum(lam[k] * g[k][i] for k in range(K)) for i, t in enumerate(theta))


def hypergrad_ref(theta, lam, train, val, alpha, primary=None):
    """Paper: -alpha grad L_k(theta; train) . grad L_val(theta') with L_val the primary sum."""
    mask = np.ones(K) if primary is None else np.isin(np.arange(K), primary).astype(float)
    ahead = lookahead_ref(theta, lam, train, alpha)
    gv = grads_ref(ahead, *val)
    v = tuple(sum(mask[k] * gv[k][i] for k in range(K)) for i in range(2))
    g = grads_ref(theta, *train)
    return np.array([-alpha * sum(np.sum(g[k][i] * v[i]) for i in range(2)) for k in range(K)])


def hypergrad_fd(theta, lam, train, val, alpha, step=1e-5):
    def val_loss(lam):
        return losses_ref(lookahead_ref(theta, lam, train, alpha), *val).sum()

    eye = np.eye(K)
    return np.array(
        [
            (val_loss(lam + step * eye[k]) - val_loss(lam - step * eye[k])) / (2 * step)
            for k in range(K)
        ]
    )


class AdamRef:
    """Kingma & Ba (2015), Algorithm 1 (eps outside the square root, as optax and PyTorch)."""

    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = self.v = 0.0
        self.t = 0

    def step(self, x, g):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g**2
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        return x - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


# ---------------------------------------------------------------------------------------------
# The same model in JAX.


def loss_fn(params, x, y):
    z = jnp.tanh(x @ params["w"])
    return jnp.mean((z @ params["v"].T - y.T) ** 2, axis=0)


def data(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    theta = (rng.normal(size=(D, H)), rng.normal(size=(K, H)) / np.sqrt(H))
    batch = lambda: (rng.normal(size=(N, D)), rng.normal(size=(K, N)))
    return theta, batch(), batch()


def as_params(theta, dtype):
    return {"w": jnp.asarray(theta[0], dtype), "v": jnp.asarray(theta[1], dtype)}


def as_batch(batch, dtype):
    return tuple(jnp.asarray(b, dtype) for b in batch)


def rel_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def test_the_reference_hypergradient_is_the_finite_difference_of_the_validation_loss():
    theta, train, val = data(0)
    lam = np.array([0.3, 0.1, 0.6])
    want = hypergrad_fd(theta, lam, train, val, alpha=0.1)
    np.testing.assert_allclose(hypergrad_ref(theta, lam, train, val, 0.1), want, rtol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("primary", [None, (0,), (1, 2)])
def test_hypergradient_matches_the_paper(dtype, primary):
    theta, train, val = data(1)
    lam = np.array([0.1, 0.4, 0.2])
    want = hypergrad_ref(theta, lam, train, val, 0.05, primary)
    with jax.enable_x64(dtype == np.float64):
        got = jax.jit(
            lambda p, w, tr, va: mtl.scalarization.auto_lambda_grad(
                loss_fn, p, w, tr, va, lookahead_lr=0.05, primary=primary
            )
        )(
            as_params(theta, dtype),
            jnp.asarray(lam, dtype),
            as_batch(train, dtype),
            as_batch(val, dtype),
        )
    err = rel_err(got, want)
    print(
        f"auto_lambda_grad primary={primary} {np.dtype(dtype).name}: worst relative error {err:.2e}"
    )
    assert err <= (1e-5 if dtype == np.float32 else 1e-12), err


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_a_training_loop_matches_the_paper_over_steps(dtype):
    """The official order: hypergradient, Adam step of lambda, then SGD on sum_k lambda_k L_k."""
    alpha, meta_lr, steps = 0.1, 1e-2, 4
    theta, _, _ = data(2)
    batches = [data(10 + t)[1:] for t in range(steps)]
    lam, adam = np.full(K, 0.1), AdamRef(meta_lr)
    ref_theta = theta
    for train, val in batches:
        lam = adam.step(lam, hypergrad_ref(ref_theta, lam, train, val, alpha))
        ref_theta = lookahead_ref(ref_theta, lam, train, alpha)  # the real step, new weights
    with jax.enable_x64(dtype == np.float64):

        @jax.jit
        def step(params, state, train, val):
            state = mtl.scalarization.auto_lambda_update(
                loss_fn, params, state, train, val, lookahead_lr=alpha, meta_lr=meta_lr
            )
            grads = jax.grad(lambda p: jnp.sum(state.weights * loss_fn(p, *train)))(params)
            return jax.tree.map(lambda p, g: p - alpha * g, params, grads), state

        params, state = as_params(theta, dtype), mtl.scalarization.auto_lambda_init(K)
        for train, val in batches:
            params, state = step(params, state, as_batch(train, dtype), as_batch(val, dtype))
        assert state.weights.dtype == dtype
    err = max(rel_err(state.weights, lam), rel_err(params["w"], ref_theta[0]))
    print(f"auto_lambda loop {np.dtype(dtype).name}: worst relative error {err:.2e}")
    assert err <= (2e-5 if dtype == np.float32 else 1e-10), err


def test_the_catalogue_transform_takes_the_meta_step_then_weighs_the_rows():
    method = mtl.get_method("auto_lambda:meta_lr=0.01", num_tasks=K)
    assert method.cost == "loss" and method.scales_heads and method.batches == 1
    assert method.inputs == ("task_losses", "lambda_grad")
    rng = np.random.default_rng(3)
    params = {"w": jnp.zeros((4, 2))}
    tx = method.transform
    state = tx.init(params)
    chain_state = optax.chain(tx, optax.sgd(0.1)).init(params)
    np.testing.assert_allclose(mtl.scalarization.auto_lambda_weights(chain_state), np.full(K, 0.1))
    adam, lam = AdamRef(0.01), np.full(K, 0.1)
    for _ in range(3):
        rows = rng.normal(size=(K, 4, 2))
        h = rng.normal(size=K)
        d, state = tx.update(
            {"w": jnp.asarray(rows, jnp.float32)},
            state,
            params,
            task_losses=jnp.ones(K),
            lambda_grad=jnp.asarray(h, jnp.float32),
        )
        lam = adam.step(lam, h)
        np.testing.assert_allclose(mtl.aggregation.weights(state), lam, rtol=1e-5)
        np.testing.assert_allclose(mtl.scalarization.auto_lambda_weights(state), lam, rtol=1e-5)
        np.testing.assert_allclose(d["w"], np.tensordot(lam, rows, 1), rtol=1e-5, atol=1e-6)


def test_non_finite_input_keeps_the_weights():
    state = mtl.scalarization.auto_lambda_init(K)
    kept = mtl.scalarization.auto_lambda_step(state, jnp.array([1.0, jnp.nan, 0.0]))
    jax.tree.map(np.testing.assert_array_equal, kept, state)
    tx = mtl.get_method("auto_lambda", num_tasks=K).transform
    params = {"w": jnp.zeros(2)}
    tx_state = tx.init(params)
    rows = {"w": jnp.ones((K, 2))}
    d, new = tx.update(
        rows, tx_state, params, task_losses=jnp.array([1.0, jnp.inf, 1.0]), lambda_grad=jnp.ones(K)
    )
    assert np.all(np.isnan(d["w"]))
    jax.tree.map(np.testing.assert_array_equal, new.inner, tx_state.inner)


def test_single_task_and_zero_gradients():
    theta, train, val = data(4)
    one = lambda p, x, y: loss_fn(p, x, y)[:1]
    params = as_params(theta, np.float32)
    h = mtl.scalarization.auto_lambda_grad(
        one,
        params,
        jnp.ones(1),
        as_batch(train, np.float32),
        as_batch(val, np.float32),
        lookahead_lr=0.1,
    )
    g = jax.grad(lambda p: one(p, *as_batch(train, np.float32))[0])(params)
    ahead = jax.tree.map(lambda p, gi: p - 0.1 * gi, params, g)
    gv = jax.grad(lambda p: one(p, *as_batch(val, np.float32))[0])(ahead)
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gv), strict=True))
    np.testing.assert_allclose(h, [-0.1 * dot], rtol=1e-5)
    zero = mtl.scalarization.auto_lambda_grad(
        lambda p, x: jnp.zeros(K) * jnp.sum(p["w"]),
        params,
        jnp.ones(K),
        (0.0,),
        (0.0,),
        lookahead_lr=0.1,
    )
    np.testing.assert_array_equal(zero, np.zeros(K))


def test_bad_input_is_named():
    theta, train, val = data(5)
    params = as_params(theta, np.float32)
    tr, va = as_batch(train, np.float32), as_batch(val, np.float32)
    with pytest.raises(ValueError, match=r"primary must list distinct task indices in \[0, 3\)"):
        mtl.scalarization.auto_lambda_grad(
            loss_fn, params, jnp.ones(K), tr, va, lookahead_lr=0.1, primary=(3,)
        )
    with pytest.raises(ValueError, match="loss_fn must return the K = 2 task losses"):
        mtl.scalarization.auto_lambda_grad(loss_fn, params, jnp.ones(2), tr, va, lookahead_lr=0.1)
    with pytest.raises(ValueError, match="lookahead_lr must be >= 0"):
        mtl.scalarization.auto_lambda_grad(loss_fn, params, jnp.ones(K), tr, va, lookahead_lr=-1.0)
    with pytest.raises(ValueError, match=r"lambda_grad has shape \(2,\); expected \(3,\)"):
        mtl.scalarization.auto_lambda_step(mtl.scalarization.auto_lambda_init(K), jnp.ones(2))
    with pytest.raises(ValueError, match="auto_lambda keeps per-task state.*num_tasks=K"):
        mtl.scalarization.auto_lambda()
    tx = mtl.get_method("auto_lambda", num_tasks=K).transform
    state = tx.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="auto_lambda reads the hypergradient: pass lambda_grad="):
        tx.update({"w": jnp.ones((K, 2))}, state, {"w": jnp.zeros(2)}, task_losses=jnp.ones(K))
    with pytest.raises(ValueError, match="expected one"):
        mtl.scalarization.auto_lambda_weights(optax.sgd(0.1).init({"w": jnp.zeros(2)}))


def test_the_weights_favour_the_task_that_helps_the_primary_one():
    """Auxiliary learning (the paper's Sec. 4.2 setting, in miniature): task 0 is primary,
    task 1 has the same targets (helps), task 2 pure noise (hurts); after training with
    Auto-Lambda the helpful task's weight exceeds the harmful one's."""
    rng = np.random.default_rng(7)
    true_w = rng.normal(size=(D, 1))

    def batch(n):
        x = rng.normal(size=(n, D))
        t = (x @ true_w)[:, 0]
        return x, np.stack([t, t, rng.normal(size=n) * 3.0])

    theta, _, _ = data(6)
    params = as_params(theta, np.float32)
    state = mtl.scalarization.auto_lambda_init(K)

    @jax.jit
    def step(params, state, train, val):
        state = mtl.scalarization.auto_lambda_update(
            loss_fn, params, state, train, val, lookahead_lr=0.05, meta_lr=3e-3, primary=(0,)
        )
        grads = jax.grad(lambda p: jnp.sum(state.weights * loss_fn(p, *train)))(params)
        return jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), state

    for _ in range(200):
        params, state = step(
            params, state, as_batch(batch(32), np.float32), as_batch(batch(32), np.float32)
        )
    w = np.asarray(state.weights)
    print("auto_lambda auxiliary weights (primary, helpful, noise):", w)
    assert w[1] > w[2], w
