"""Plain NumPy implementations written from the papers' equations, used as test oracles."""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize


def pcgrad_ref(J: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Yu et al. 2020, Algorithm 1: project g_i' on the normal plane of every conflicting g_j."""
    out = np.zeros(J.shape[1])
    for i in range(J.shape[0]):
        g = J[i].copy()
        for j in orders[i]:
            dot = g @ J[j]
            nsq = J[j] @ J[j]
            if dot < 0 and nsq > 0:
                g = g - dot / nsq * J[j]
        out += g
    return out


def mgda_two_closed_form(g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
    """Sener & Koltun 2018, Algorithm 1 (two tasks): min-norm point of the segment [g1, g2]."""
    diff = g1 - g2
    denom = diff @ diff
    if denom == 0:
        return g1.copy()
    alpha = np.clip(((g2 - g1) @ g2) / denom, 0.0, 1.0)
    return alpha * g1 + (1 - alpha) * g2


def mgda_bruteforce_weights(G: np.ndarray) -> np.ndarray:
    """Exact min_{w in simplex} w^T G w by enumerating supports and solving each KKT system."""
    k = G.shape[0]
    G = G / (np.max(np.diag(G)) or 1.0)  # the weights do not depend on the scale of G
    best_val, best_w = np.inf, None
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            s = list(support)
            n = len(s)
            kkt = np.zeros((n + 1, n + 1))
            kkt[:n, :n] = G[np.ix_(s, s)]
            kkt[:n, n] = 1.0
            kkt[n, :n] = 1.0
            rhs = np.zeros(n + 1)
            rhs[n] = 1.0
            sol, *_ = np.linalg.lstsq(kkt, rhs, rcond=None)
            y = sol[:n]
            if not np.allclose(kkt @ sol, rhs, atol=1e-9) or np.any(y < -1e-12):
                continue
            w = np.zeros(k)
            w[s] = np.clip(y, 0, None)
            w /= w.sum()
            val = w @ G @ w
            if val < best_val - 1e-15:
                best_val, best_w = val, w
    return best_w


def cagrad_dual_ref(J: np.ndarray, c: float) -> np.ndarray:
    """Liu et al. 2021, Alg. 1: the dual min_{w in simplex} g_w.g0 + c|g0||g_w|, by SLSQP."""
    k = J.shape[0]
    G = J @ J.T
    g0 = J.mean(axis=0)
    s = c * np.linalg.norm(g0)
    b = J @ g0

    def objective(w):
        return w @ b + s * np.sqrt(max(w @ G @ w, 0.0))

    best = None
    for start in [np.full(k, 1.0 / k), *np.eye(k)]:
        res = minimize(
            objective,
            start,
            bounds=[(0.0, 1.0)] * k,
            constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x


def cagrad_ref(J: np.ndarray, c: float) -> np.ndarray:
    """CAGrad's update d = g0 + c|g0| g_w/|g_w| at the SLSQP dual solution."""
    g0 = J.mean(axis=0)
    s = c * np.linalg.norm(g0)
    gw = J.T @ cagrad_dual_ref(J, c)
    norm = np.linalg.norm(gw)
    return g0 + (s / norm * gw if norm > 0 else 0.0)


def cagrad_primal_ref(J: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """Liu et al. 2021, eq. 3 (the primal): ``max_d min_i g_i . d`` s.t. ``|d - g0| <= c |g0|``.

    Solved by SLSQP on ``(d, t)``: maximise ``t`` s.t. ``J d >= t`` and the ball, from ``d = g0``
    and (when ``c >= 1``) from ``d = 0``. Returns ``(d, optimal value)``; the value is unique even
    where ``d`` is not (a Pareto-stationary point with ``c >= 1``: every feasible ``d`` in the
    dual cone is optimal, value 0).
    """
    g0 = J.mean(axis=0)
    r2 = (c * np.linalg.norm(g0)) ** 2
    scale = float(np.max(np.abs(J))) or 1.0  # an all-zero J: any d is optimal, value 0
    Js, g0s, r2s = J / scale, g0 / scale, r2 / scale**2

    constraints = [
        {
            "type": "ineq",
            "fun": lambda z: Js @ z[:-1] - z[-1],
            "jac": lambda z: np.hstack([Js, -np.ones((Js.shape[0], 1))]),
        },
        {
            "type": "ineq",
            "fun": lambda z: r2s - np.sum((z[:-1] - g0s) ** 2),
            "jac": lambda z: np.append(-2.0 * (z[:-1] - g0s), 0.0),
        },
    ]
    starts = [g0s] + ([np.zeros_like(g0s)] if c >= 1 else [])
    best = None
    for d0 in starts:
        z0 = np.append(d0, np.min(Js @ d0) if len(Js) else 0.0)
        res = minimize(
            lambda z: -z[-1],
            z0,
            jac=lambda z: np.append(np.zeros(len(z) - 1), -1.0),
            constraints=constraints,
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 2000},
        )
        value = float(np.min(Js @ res.x[:-1]))
        if best is None or value > best[1]:
            best = (res.x[:-1], value)
    return best[0] * scale, best[1] * scale**2


def imtl_g_ref(J: np.ndarray) -> np.ndarray:
    """Liu et al. 2021 (IMTL), Sec. 3.2 closed form: a_{2:K} = g_1 U^T (D U^T)^{-1}."""
    u = J / np.linalg.norm(J, axis=1, keepdims=True)
    D = J[0] - J[1:]
    U = u[0] - u[1:]
    a_rest = J[0] @ U.T @ np.linalg.inv(D @ U.T)
    a = np.concatenate([[1.0 - a_rest.sum()], a_rest])
    return a @ J


def graddrop_ref(J: np.ndarray, U: np.ndarray, leak: np.ndarray) -> np.ndarray:
    """Chen et al. 2020, eqs. 1-3 per coordinate, with given uniforms U."""
    total = J.sum(axis=0)
    mass = np.abs(J).sum(axis=0)
    P = 0.5 * (1.0 + np.divide(total, mass, out=np.zeros_like(total), where=mass > 0))
    keep = ((P > U) & (J > 0)) | ((P < U) & (J < 0))
    return ((leak[:, None] + (1 - leak[:, None]) * keep) * J).sum(axis=0)


# ---------------------------------------------------------------------------------------------
# The full method set (issue 4): NumPy/SciPy implementations from the papers' equations.


def dual_cone_projection_ref(J: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Quinton & Rey 2024, Prop. 1: weights ``v`` of the projection of ``J^T u`` onto
    ``{d : J d >= 0}``, via Moreau: ``v = u + x``, ``x = argmin_{x >= 0} |J^T u + J^T x|`` (NNLS)."""
    from scipy.optimize import nnls

    x, _ = nnls(-J.T, J.T @ u, maxiter=100 * J.shape[0])
    return u + x


def qp_bruteforce_ref(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``argmin_{v >= u} v^T G v`` for positive-definite G by enumerating the free sets (KKT)."""
    k = G.shape[0]
    for r in range(k + 1):
        for free in itertools.combinations(range(k), r):
            f = list(free)
            v = u.astype(float).copy()
            if f:
                rest = [i for i in range(k) if i not in f]
                v[f] = np.linalg.solve(G[np.ix_(f, f)], -G[np.ix_(f, rest)] @ u[rest])
            mu = G @ v
            if np.all(v[f] >= u[f] - 1e-12) and np.all(mu >= -1e-10 * np.abs(G).max()):
                return v
    raise AssertionError("no KKT point found")


def upgrad_ref(J: np.ndarray, pref: np.ndarray | None = None) -> np.ndarray:
    """UPGrad (eq. 5): ``sum_i p_i pi_J(g_i)``, each projection by NNLS."""
    k = J.shape[0]
    pref = np.full(k, 1.0 / k) if pref is None else pref
    return sum(J.T @ dual_cone_projection_ref(J, p * np.eye(k)[i]) for i, p in enumerate(pref))


def dualproj_ref(J: np.ndarray, pref: np.ndarray | None = None) -> np.ndarray:
    """DualProj: ``pi_J(J^T p)`` by NNLS."""
    k = J.shape[0]
    pref = np.full(k, 1.0 / k) if pref is None else pref
    return J.T @ dual_cone_projection_ref(J, pref)


def nash_weights_ref(G: np.ndarray) -> np.ndarray:
    """Navon et al. 2022, eq. 2: ``G alpha = 1 / alpha``, ``alpha > 0``, by scipy's root finder."""
    from scipy.optimize import root

    k = G.shape[0]
    start = np.full(k, np.sqrt(k / max(G.sum(), 1e-300)))
    sol = root(lambda a: G @ a - 1.0 / a, start, jac=lambda a: G + np.diag(1.0 / a**2))
    alpha = sol.x
    for _ in range(5):  # polish: plain Newton steps on G a - 1/a = 0
        alpha = alpha - np.linalg.solve(G + np.diag(1.0 / alpha**2), G @ alpha - 1.0 / alpha)
    assert np.all(alpha > 0) and np.allclose(G @ alpha * alpha, 1.0, rtol=1e-10), sol.message
    return alpha


def nash_mtl_ref(J: np.ndarray, max_norm: float = 1.0) -> np.ndarray:
    """Nash-MTL's update: the bargaining solution, clipped to ``max_norm`` (official code)."""
    d = J.T @ nash_weights_ref(J @ J.T)
    norm = np.linalg.norm(d)
    return d * (max_norm / norm) if 0 < max_norm < norm else d


def fairgrad_ref(J: np.ndarray, alpha: float) -> np.ndarray:
    """Ban & Ji 2024, Alg. 1 as in the official code: ``least_squares(G w - w^(-1/alpha))``
    from ``w = 1/K`` with ``w >= 0`` (tolerances tightened)."""
    from scipy.optimize import least_squares

    k = J.shape[0]
    G = J @ J.T
    res = least_squares(
        lambda w: G @ w - (1.0 / w) ** (1.0 / alpha),
        np.full(k, 1.0 / k),
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=20000,
    )
    return J.T @ res.x


def aligned_mtl_weights_ref(G: np.ndarray, pref=None) -> np.ndarray:
    """Senushkin et al. 2023, Alg. 1 in weight space (``scale_mode="min"``): with
    ``G = V diag(lam) V^T`` (NumPy eigh), ``w = sqrt(lam_min) V_r diag(lam_r^-1/2) V_r^T p`` over
    the kept eigenvalues (rank tolerance ``max(lam) K eps``, official); ``J^T w`` is then
    ``sqrt(lam_min) U V^T p`` of :func:`aligned_mtl_ref`."""
    k = G.shape[0]
    pref = np.ones(k) if pref is None else pref
    lam, V = np.linalg.eigh(G)
    kept = lam > lam.max() * k * np.finfo(float).eps
    if not np.any(kept):
        return pref.astype(float)
    Vr, lr = V[:, kept], lam[kept]
    return np.sqrt(lr.min()) * Vr @ ((Vr.T @ pref) / np.sqrt(lr))


def aligned_mtl_ref(J: np.ndarray, scale_mode: str = "min", pref=None) -> np.ndarray:
    """Senushkin et al. 2023, Alg. 1 from the SVD ``J^T = U S V^T``: ``sigma U V^T p`` with sigma
    the smallest / (lower) median / root-mean-square kept singular value; rank tolerance
    ``max(S^2) K eps`` on the eigenvalues ``S^2`` (official)."""
    k = J.shape[0]
    pref = np.ones(k) if pref is None else pref
    U, S, Vt = np.linalg.svd(J.T, full_matrices=False)
    lam = S**2
    kept = lam > lam.max() * k * np.finfo(float).eps if lam.size else lam > 0
    if not np.any(kept):
        return J.T @ pref
    U, S, Vt, lam = U[:, kept], S[kept], Vt[kept], lam[kept]
    ascending = np.sort(lam)
    sigma2 = {
        "min": ascending[0],
        "median": ascending[(len(ascending) - 1) // 2],
        "rmse": lam.mean(),
    }[scale_mode]
    return np.sqrt(sigma2) * U @ (Vt @ pref)


def config_ref(J: np.ndarray, pref=None) -> np.ndarray:
    """Liu, Chu & Thuerey (ConFIG), eq. 2 / official ``ConFIG_update``: least-squares direction
    of the unit gradients, scaled by the sum of the projections."""
    k = J.shape[0]
    pref = np.ones(k) if pref is None else pref
    norms = np.linalg.norm(J, axis=1, keepdims=True)
    units = np.divide(J, norms, out=np.zeros_like(J), where=norms > 0)
    best = np.linalg.lstsq(units, pref, rcond=None)[0]
    unit = best / np.linalg.norm(best)
    return np.sum(J @ unit) * unit


def gradvac_ref(J, orders, targets, beta):
    """Wang et al. 2021, Algorithm 1 with vectors: returns ``(sum_i g_i', new_targets)``."""
    k = J.shape[0]
    targets = targets.copy()
    out = np.zeros(J.shape[1])
    for i in range(k):
        g = J[i].copy()
        for j in orders[i]:
            ni, nj = np.linalg.norm(g), np.linalg.norm(J[j])
            phi = g @ J[j] / (ni * nj) if ni > 0 and nj > 0 else 0.0
            hat = targets[i, j]
            if ni > 0 and nj > 0 and phi < hat and abs(hat) < 1:
                coef = ni * (hat * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - hat**2))
                g = g + coef / (nj * np.sqrt(1 - hat**2)) * J[j]
            targets[i, j] = (1 - beta) * hat + beta * phi
        out += g
    return out, targets


def nocl_ref(J: np.ndarray) -> np.ndarray:
    """CoNAL's NOCLGrad: zero if any pair conflicts, else the mean."""
    k = J.shape[0]
    for i in range(k):
        for j in range(i + 1, k):
            if J[i] @ J[j] < 0:
                return np.zeros(J.shape[1])
    return J.mean(axis=0)


def excess_mtl_ref(Js, robust_step_size=1e-2, warmup_steps=1):
    """He et al. 2024, eqs. 6-9 as in the official code/LibMTL (weights on the simplex)."""
    k = Js[0].shape[0]
    S = np.zeros_like(Js[0])
    lam = np.full(k, 1.0 / k)
    warm = np.zeros(k)
    base = None
    outs = []
    for step, J in enumerate(Js):
        S = S + J**2
        e = np.sum(J**2 / np.sqrt(S + 1e-7), axis=1)
        if step < warmup_steps:
            warm += e
        else:
            if base is None:
                base = warm / warmup_steps if warmup_steps else e
                r = e / np.where(base > 0, base, 1.0) * (base > 0) if warmup_steps else e
            else:
                r = e / np.where(base > 0, base, 1.0) * (base > 0)
            lam = lam * np.exp(robust_step_size * r)
            lam = lam / lam.sum()
        outs.append(lam @ J)
    return outs


def adam_ref(grad, state, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    """``torch.optim.Adam`` (coupled L2 weight decay) on one parameter vector."""
    param, m, v, t = state
    g = grad + weight_decay * param
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    t = t + 1
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return param - lr * m_hat / (np.sqrt(v_hat) + eps), m, v, t


def uw_ref(loss_seq, lr):
    """Kendall et al. 2018 with log-variances s (init 0) trained by Adam on the analytic gradient."""
    k = len(loss_seq[0])
    state = (np.zeros(k), np.zeros(k), np.zeros(k), 0)
    out = []
    for L in loss_seq:
        s = state[0]
        out.append((np.sum(0.5 * np.exp(-s) * L + 0.5 * s), 0.5 * np.exp(-s)))
        state = adam_ref(0.5 - 0.5 * np.exp(-s) * L, state, lr)
    return out


def imtl_l_ref(loss_seq, lr):
    """Liu et al. 2021 (IMTL-L): ``sum e^s L - s``, s (init 0) trained by Adam."""
    k = len(loss_seq[0])
    state = (np.zeros(k), np.zeros(k), np.zeros(k), 0)
    out = []
    for L in loss_seq:
        s = state[0]
        out.append((np.sum(np.exp(s) * L - s), np.exp(s)))
        state = adam_ref(np.exp(s) * L - 1.0, state, lr)
    return out


def dwa_ref(loss_seq, temperature, steps_per_epoch):
    """Liu et al. 2019, eq. 7 with epoch averages (weights 1 for the first two epochs)."""
    k = len(loss_seq[0])
    averages, current, out = [], [], []
    for L in loss_seq:
        if len(averages) >= 2:
            r = averages[-1] / averages[-2]
            e = np.exp(r / temperature)
            w = k * e / e.sum()
        else:
            w = np.ones(k)
        out.append((w @ L, w))
        current.append(L)
        if len(current) == steps_per_epoch:
            averages.append(np.mean(current, axis=0))
            current = []
    return out


def stch_ref(L, mu, pref=None, ref=None):
    """Lin et al. 2024, eq. 7: ``mu log sum exp(lambda (L - z) / mu)`` (direct, not shifted)."""
    k = len(L)
    pref = np.full(k, 1.0 / k) if pref is None else pref
    ref = np.zeros(k) if ref is None else ref
    y = pref * (L - ref)
    return mu * np.log(np.sum(np.exp(y / mu)))


def pbi_ref(L, theta, pref=None, ref=None):
    """Zhang & Li 2007 (MOEA/D), eq. 6: ``(loss, weights)`` of ``d1 + theta d2``; the weights
    (``d loss / d L``) by hand: ``d d1 / d L = u`` and ``d d2 / d L = (I - u u^T) v / |v|``."""
    k = len(L)
    lam = np.full(k, 1.0 / k) if pref is None else np.asarray(pref, float)
    u = lam / np.linalg.norm(lam)
    shifted = L - (np.zeros(k) if ref is None else ref)
    d1 = shifted @ u
    v = shifted - d1 * u
    d2 = np.linalg.norm(v)
    grad_d2 = (np.eye(k) - np.outer(u, u)) @ v / d2 if d2 > 0 else np.zeros(k)
    return d1 + theta * d2, u + theta * grad_d2


def cosmos_ref(L, lam, pref=None):
    """Ruchte & Grabocka 2021, eq. 3: ``(loss, weights)`` of ``r . L - lam cos(r, L)``; weights
    by hand: ``d cos / d L = r / (|r| |L|) - (r . L) L / (|r| |L|^3)``."""
    k = len(L)
    r = np.full(k, 1.0 / k) if pref is None else np.asarray(pref, float)
    nr, nl = np.linalg.norm(r), np.linalg.norm(L)
    cos = r @ L / (nr * nl)
    dcos = r / (nr * nl) - (r @ L) * L / (nr * nl**3)
    return r @ L - lam * cos, r - lam * dcos


def famo_ref(pairs, gamma, w_lr, min_losses=0.0):
    """Liu et al. 2023, official ``famo.py``: ``pairs`` = [(losses before, losses after)]; returns
    the (loss, weights) of every step."""
    k = len(pairs[0][0])
    state = (np.zeros(k), np.zeros(k), np.zeros(k), 0)
    out = []
    for before, after in pairs:
        xi = state[0]
        z = np.exp(xi - xi.max())
        z = z / z.sum()
        D = before - min_losses + 1e-8
        c = np.sum(z / D)
        out.append((np.sum(np.log(D) * z / c), z / (c * D)))
        delta = np.log(before - min_losses + 1e-8) - np.log(after - min_losses + 1e-8)
        grad = z * (delta - z @ delta)  # softmax VJP
        state = adam_ref(grad, state, w_lr, weight_decay=gamma)
    return out


def gradnorm_ref(loss_seq, norm_seq, alpha, lr):
    """Chen et al. 2018, Algorithm 1: weights (init 1) stepped by Adam on ``d L_grad / d w`` with
    constant targets, then renormalised to sum to K. Returns the weights used at every step."""
    k = len(loss_seq[0])
    state = (np.ones(k), np.zeros(k), np.zeros(k), 0)
    L0 = None
    used = []
    for L, n in zip(loss_seq, norm_seq, strict=True):
        w = state[0]
        used.append(w.copy())
        L0 = L if L0 is None else L0
        r = (L / L0) / np.mean(L / L0)
        G = w * n
        target = G.mean() * r**alpha
        state = adam_ref(np.sign(G - target) * n, state, lr)
        state = (k * state[0] / state[0].sum(), *state[1:])
    return used


def krum_ref(J: np.ndarray, n_byzantine: int, n_selected: int = 1) -> np.ndarray:
    """Blanchard et al. 2017, Sec. 4: score(i) = sum of |g_i - g_j|^2 over the K - f - 2 closest
    j != i; (Multi-)Krum = the mean of the n_selected rows of smallest score (ties: lowest index)."""
    k = J.shape[0]
    scores = []
    for i in range(k):
        dists = sorted(float(np.sum((J[i] - J[j]) ** 2)) for j in range(k) if j != i)
        scores.append(sum(dists[: k - n_byzantine - 2]))
    chosen = sorted(range(k), key=lambda i: (scores[i], i))[:n_selected]
    return J[chosen].mean(axis=0)


def trimmed_mean_ref(J: np.ndarray, trim_number: int) -> np.ndarray:
    """Yin et al. 2018, Definition 2: per coordinate, drop the b largest and b smallest, average."""
    out = np.empty(J.shape[1])
    for j in range(J.shape[1]):
        column = sorted(J[:, j])
        out[j] = np.mean(column[trim_number : len(column) - trim_number])
    return out


def mgda_normalized_ref(J: np.ndarray, losses: np.ndarray, normalization: str) -> np.ndarray:
    """Sener & Koltun's official code: min-norm weights of g_k / n_k (gradient_normalizers), then
    the RAW losses weighted by them (train_multi_task.py), i.e. d = sum_k w_k g_k."""
    norms = np.linalg.norm(J, axis=1)
    n = {"none": np.ones(len(J)), "l2": norms, "loss": losses, "loss+": losses * norms}[
        normalization
    ]
    Jn = J / n[:, None]
    return mgda_bruteforce_weights(Jn @ Jn.T) @ J


def db_mtl_ref(Js, losses_seq, beta=0.9, beta_sigma=0.0):
    """LibMTL's DB_MTL.backward, step by step: the update of every step."""
    buf = np.zeros_like(Js[0])
    outs = []
    for t, (J, L) in enumerate(zip(Js, losses_seq, strict=True), start=1):
        grads = J / (L + 1e-8)[:, None]  # the gradient of log(L + 1e-8)
        buf = grads + (beta / t**beta_sigma) * (buf - grads)
        u = np.linalg.norm(buf, axis=1)
        alpha = u.max() / (u + 1e-8)
        outs.append(sum(alpha[i] * buf[i] for i in range(len(J))))
    return outs


def simplex_projection_ref(v: np.ndarray) -> np.ndarray:
    """argmin_{w in simplex} |w - v|^2, by SLSQP (independent of the sort-based formula)."""
    k = len(v)
    res = minimize(
        lambda w: np.sum((w - v) ** 2),
        np.full(k, 1.0 / k),
        jac=lambda w: 2 * (w - v),
        bounds=[(0.0, None)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return res.x


def moco_ref(
    Js,
    losses_seq,
    beta=0.5,
    beta_sigma=0.5,
    gamma=0.1,
    gamma_sigma=0.5,
    rho=0.0,
    weight_map="softmax",
):
    """LibMTL's MoCo.backward (the authors' code), step by step; ``weight_map="simplex"``: the
    paper's projection (eq. 8) instead of the softmax. Returns the update of every step."""
    k = Js[0].shape[0]
    y = np.zeros_like(Js[0])
    lambd = np.full(k, 1.0 / k)
    outs = []
    for t, (J, L) in enumerate(zip(Js, losses_seq, strict=True), start=1):
        grads = J / (np.linalg.norm(J, axis=1, keepdims=True) + 1e-8) * L[:, None]
        y = y - (beta / t**beta_sigma) * (y - grads)
        moved = lambd - (gamma / t**gamma_sigma) * (y @ y.T + rho * np.eye(k)) @ lambd
        if weight_map == "softmax":
            e = np.exp(moved - moved.max())
            lambd = e / e.sum()
        else:
            lambd = simplex_projection_ref(moved)
        outs.append(y.T @ lambd)
    return outs
