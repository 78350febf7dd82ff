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
