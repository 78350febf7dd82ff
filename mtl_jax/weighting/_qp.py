"""Exact projections onto the dual cone in weight space: ``argmin_{v >= u} v^T G v``, jit-able.

UPGrad and DualProj (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
Proposition 1) project ``J^T u`` onto ``{d : J d >= 0}`` as ``J^T v``; ``v = u + x`` turns the
K x K QP into a non-negative least-squares problem in Gram form. Problems sharing ``G`` (UPGrad's
K rows ``u = p_i e_i``) are solved in two stages:

1. Primal-dual active-set warm start (Hintermueller, Ito & Kunisch 2002), all rows at once: each
   step solves every row's passive system ``G_FF z_F = -(G u)_F`` by Jacobi-preconditioned
   conjugate gradients, one ``[N, K] x [K, K]`` product per iteration for all rows, and swaps
   every index that breaks a sign condition. A row is *certified* when its point passes the same
   optimality test as Lawson-Hanson's (``z_F > 0``, ``|(G v)_F|`` and ``-(G v)_j`` off F within
   the rounding level ``_mu_tolerance``). At K = 256 on per-sample Gramians it certifies every
   row in 5-8 steps of ~40-160 CG iterations, each one ``[N, K] x [K, K]`` product, where
   stage 2 pays ``O(N K^2)`` per *single index change* (issue 24, K = 256, float32: 25 s ->
   0.2-0.4 s; ``benchmarks/upgrad_qp.py``). It stops early when its number of swaps stops
   falling (cycling, or rank(G) << K, where it certifies few rows and costs up to ~3x stage 2).
2. Only if some row is not certified (it may cycle, or stall on rank-deficient G), those rows run
   the Lawson-Hanson active-set method (1974, ch. 23) from scratch: exact KKT point after
   finitely many steps, ``G_FF`` non-singular even for rank-deficient G. ``(G_FF)^-1`` is updated
   in ``O(K^2)`` by Schur-complement bordering and downdating (with one refinement step per
   solve) instead of a LAPACK solve per iteration; bounded ``lax`` loops under one ``vmap``.

Accuracy: float64 agrees with SciPy's NNLS to ~1e-13 relative, float32 to ~1e-5 (~1e-4 on the
worst rank-deficient samples). The algorithm, its safeguards and the accuracy measurements:
``docs/methods.md``, "Method notes".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.weighting.base import diag_scale

__all__ = ["project_weights"]


def _onehot(t: jax.Array, like: jax.Array) -> jax.Array:
    """``e_t`` in ``like``'s dtype. The loops index with one-hot products instead of gathers and
    scatters: under ``vmap`` (UPGrad's K problems) a per-lane index becomes a scatter, which is
    several times slower on CPU than the dense ``O(K^2)`` arithmetic (1.5x on the whole solve)."""
    return jax.nn.one_hot(t, like.shape[0], dtype=like.dtype)


def _add_to_inverse(H: jax.Array, G: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Bordering: ``(G_FF)^{-1}`` (embedded in ``H``, zero outside F) -> ``(G_{F+t,F+t})^{-1}``.

    Returns the new inverse and the Schur complement ``s = G_tt - G_tF H G_Ft``: the squared
    distance (in gradient space) from ``g_t`` to the span of the passive gradients.
    """
    e = _onehot(t, G)
    col = G @ e
    h = H @ col
    s = e @ col - col @ h
    safe = jnp.where(s > 0, s, 1.0)
    # h_t = 0 (H is zero outside F and t is not in F), so the bordered inverse is
    # H + b b^T / s with b = e_t - h: -h / s in row and column t, 1 / s at (t, t).
    b = e - h
    grown = H + jnp.outer(b, b) / safe
    return grown, s


def _remove_from_inverse(H: jax.Array, r: jax.Array) -> jax.Array:
    """``(G_FF)^{-1}`` -> ``(G_{F-r,F-r})^{-1}`` (Schur complement of the ``r`` block)."""
    e = _onehot(r, H)
    col = H @ e
    hrr = e @ col
    shrunk = H - jnp.outer(col, col) / jnp.where(hrr > 0, hrr, 1.0)
    keep = 1.0 - e
    return shrunk * keep[:, None] * keep[None, :]


def _restricted_minimiser(G: jax.Array, Gu: jax.Array, H: jax.Array, free: jax.Array) -> jax.Array:
    """``z``: zero outside F, ``G_FF z_F = -(G u)_F`` inside, with one step of refinement."""
    f = free.astype(G.dtype)
    rhs = -Gu * f
    z = H @ rhs
    residual = (rhs - G @ z) * f
    return (z + H @ residual) * f


def _fresh_inverse(G: jax.Array, free: jax.Array) -> jax.Array:
    """``(G_FF)^{-1}`` embedded in a ``[K, K]`` array, rebuilt by bordering from the empty set.

    Only additions, in index order, on the exact ``G`` (block elimination of an SPD matrix, no
    accumulated downdates): the accuracy of a fresh factorisation, without a LAPACK call.
    """
    num = G.shape[0]

    def add(j, H):
        grown, schur = _add_to_inverse(H, G, j)
        return jnp.where(free[j] & (schur > 0), grown, H)

    return jax.lax.fori_loop(0, num, add, jnp.zeros_like(G))


class _Tolerances(NamedTuple):
    tiny: jax.Array  # a coordinate of x at or below this is zero
    dependent: float  # relative Schur complement below which a column is in the passive span


def _mu_tolerance(G: jax.Array, v: jax.Array) -> jax.Array:
    """Rounding level of ``mu = G v``: a few ulps of ``sqrt(K) sum_k |G_jk v_k|`` per entry."""
    eps = float(jnp.finfo(G.dtype).eps)
    return 4.0 * eps * jnp.sqrt(float(G.shape[0])) * (jnp.abs(G) @ jnp.abs(v))


def _violations(G: jax.Array, u: jax.Array, x: jax.Array, free: jax.Array) -> jax.Array:
    """Coordinates outside F whose multiplier ``mu_j = (G v)_j`` is negative beyond rounding."""
    v = u + x
    return (~free) & (G @ v < -_mu_tolerance(G, v))


def _active_set_loop(G, u, Gu, tols, x, free, H, fixing, budget):
    """Lawson-Hanson iterations from a feasible state, with rank-one updates of ``H = G_FF^-1``.

    Returns ``(x, free, H, iterations, drifted)``; ``drifted`` reports a negative Schur complement
    (impossible in exact arithmetic: ``H`` has lost accuracy and must be recomputed).
    """
    num = G.shape[0]

    def objective(x: jax.Array) -> jax.Array:
        v = u + x
        return 0.5 * v @ G @ v

    def cond(carry):
        *_, it, done, _ = carry
        return (~done) & (it < budget)

    def body(carry):
        x, free, H, excluded, fixing, f_start, it, _, _ = carry
        candidates = _violations(G, u, x, free) & (~excluded)
        mu = G @ (u + x)
        t = jnp.argmin(jnp.where(candidates, mu, jnp.inf))
        optimal = ~jnp.any(candidates)
        # Adding mode (``fixing`` False): the candidate t enters F. Fixing mode: F stays.
        adding = ~fixing
        grown, schur = _add_to_inverse(H, G, t)
        trial = jnp.where(adding, free.at[t].set(True), free)
        H_trial = jnp.where(adding, grown, H)
        z = _restricted_minimiser(G, Gu, H_trial, trial)
        broken = ~jnp.all(jnp.isfinite(z))
        drifted = adding & ~optimal & (schur < -tols.dependent * G[t, t])
        dependent = schur <= tols.dependent * G[t, t]
        entry_failed = adding & (broken | dependent | (z[t] <= tols.tiny))
        positive = (~broken) & jnp.all(jnp.where(trial, z > tols.tiny, True))

        # Partial step from x towards z, up to the first passive coordinate that reaches 0; that
        # coordinate leaves F (one per iteration: others that reach 0 leave in later steps of
        # length 0).
        blocking = trial & (z <= tols.tiny)
        ratio = jnp.where(blocking, x / jnp.where(blocking, x - z, 1.0), jnp.inf)
        first = jnp.argmin(ratio)
        theta = jnp.clip(ratio[first], 0.0, 1.0)
        moved = jnp.where(trial, jnp.maximum(x + theta * (z - x), 0.0), 0.0)
        moved = moved.at[first].set(0.0)
        moved_free = trial.at[first].set(False)
        H_moved = _remove_from_inverse(H_trial, first)

        new_x = jnp.where(positive, z, moved)
        new_free = jnp.where(positive, trial, moved_free)
        new_H = jnp.where(positive, H_trial, H_moved)
        # A completed outer step must decrease the objective; rounding can break that near
        # degeneracy, and then the search stops at the last accepted point.
        no_progress = positive & (objective(z) >= f_start)
        stop_here = (adding & optimal) | no_progress | (fixing & broken) | drifted
        keep = stop_here | entry_failed
        x_out = jnp.where(keep, x, new_x)
        free_out = jnp.where(keep, free, new_free)
        H_out = jnp.where(keep, H, new_H)
        fixing_out = jnp.where(keep, False, ~positive)
        excluded_out = jnp.where(
            entry_failed, excluded.at[t].set(True), jnp.where(positive, False, excluded)
        )
        f_out = jnp.where(keep | ~positive, f_start, objective(x_out))
        return x_out, free_out, H_out, excluded_out, fixing_out, f_out, it + 1, stop_here, drifted

    no = jnp.zeros(num, bool)
    # A resumed search (fixing) first re-solves on its passive set, which need not decrease the
    # objective; the progress test starts with the next outer step.
    f0 = jnp.where(fixing, jnp.inf, objective(x))
    carry = (x, free, H, no, fixing, f0, jnp.int32(0), jnp.bool_(False), jnp.bool_(False))
    x, free, H, _, _, _, it, _, drifted = jax.lax.while_loop(cond, body, carry)
    return x, free, H, it, drifted


def _lawson_hanson(
    G: jax.Array,
    u: jax.Array,
    max_iter: int,
    x0: jax.Array,
    settled: jax.Array,
    max_passes: int = 4,
) -> jax.Array:
    """One projection ``v = u + x`` for a normalised ``G`` (``max_k G_kk <= 1``), from a feasible
    warm start ``x0 >= 0`` (passive set ``x0 > 0``; ``settled``: ``x0`` already solves its
    passive system, so only the optimality test remains).

    The active-set loop runs with cheap rank-one updates of ``(G_FF)^{-1}``. When they lose
    accuracy (ill-conditioned passive blocks in float32) or the result still violates the
    optimality conditions, ``(G_FF)^{-1}`` is rebuilt from scratch and the loop resumes from the
    current point (at most ``max_passes`` passes in all).
    """
    dtype = G.dtype
    eps = float(jnp.finfo(dtype).eps)
    num = G.shape[0]
    scale_u = jnp.maximum(jnp.max(jnp.abs(u)), jnp.finfo(dtype).tiny)
    tols = _Tolerances(tiny=8.0 * eps * scale_u, dependent=4.0 * (num**0.5) * eps)
    Gu = G @ u

    def cond(carry):
        x, free, used, passes, settled = carry
        unfinished = (~settled) | jnp.any(_violations(G, u, x, free))
        return unfinished & (passes < max_passes) & (used < max_iter)

    def body(carry):
        x, free, used, passes, _ = carry
        H = _fresh_inverse(G, free)
        x, free, _, more, _ = _active_set_loop(
            G, u, Gu, tols, x, free, H, jnp.any(free), max_iter - used
        )
        return x, free, used + more, passes + 1, jnp.bool_(True)

    x0 = jnp.maximum(x0, 0.0)
    start = (x0, x0 > 0, jnp.int32(0), jnp.int32(0), settled)
    x, *_ = jax.lax.while_loop(cond, body, start)
    return u + x


class _Batch(NamedTuple):
    """Problems sharing ``G``: ``U[N, K]`` rows ``u``, their tolerances, and ``|G|``."""

    G: jax.Array  # [K, K], normalised
    absG: jax.Array  # [K, K]
    U: jax.Array  # [N, K]
    tiny: jax.Array  # [N, 1]: a coordinate of x at or below this is zero


def _mu_tolerances(batch: _Batch, V: jax.Array) -> jax.Array:
    """``_mu_tolerance`` of every row of ``V[N, K]``."""
    eps = float(jnp.finfo(V.dtype).eps)
    return 4.0 * eps * jnp.sqrt(float(V.shape[-1])) * (jnp.abs(V) @ batch.absG)


def _passive_solve(batch: _Batch, F: jax.Array, Z: jax.Array, max_iter: int) -> jax.Array:
    """``Z[N, K]``: zero outside ``F[N, K]``, ``G_FF z_F = -(G u)_F`` on every row, by
    Jacobi-preconditioned conjugate gradients from ``Z`` (one ``[N, K] x [K, K]`` product per
    iteration for all rows: ``G`` is shared). A row stops when its recurrence residual is within
    half the rounding level of its passive multipliers ``(G (u + z))_F`` (``_mu_tolerances`` at
    the start; the caller checks the true residual), all rows after ``max_iter``. Singular
    ``G_FF`` is fine: the system is consistent (``(G u)_F`` is in the range of ``G_FF``).
    """
    G, U = batch.G, batch.U
    f = F.astype(G.dtype)
    diag = jnp.diagonal(G)
    precond = f / jnp.where(diag > 0, diag, 1.0)  # [N, K]
    Z = Z * f
    V = U + Z
    r = -(V @ G) * f
    tol = 0.5 * _mu_tolerances(batch, V)

    def converged(r):  # [N, 1]
        return jnp.all(jnp.abs(r) <= tol, axis=-1, keepdims=True)

    def cond(carry):
        _, r, _, _, it = carry
        return (it < max_iter) & ~jnp.all(converged(r))

    def body(carry):
        Z, r, p, rz, it = carry
        Ap = (p @ G) * f
        pAp = jnp.sum(p * Ap, axis=-1, keepdims=True)
        # A row that has converged stays put (further steps on rounding noise can diverge).
        moving = (pAp > 0) & ~converged(r)
        alpha = jnp.where(moving, rz / jnp.where(moving, pAp, 1.0), 0.0)
        Z = Z + alpha * p
        r = r - alpha * Ap
        s = precond * r
        rz_new = jnp.sum(r * s, axis=-1, keepdims=True)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        return Z, r, s + beta * p, rz_new, it + 1

    s = precond * r
    rz = jnp.sum(r * s, axis=-1, keepdims=True)
    Z, *_ = jax.lax.while_loop(cond, body, (Z, r, s, rz, jnp.int32(0)))
    return Z


def _primal_dual_active_set(
    batch: _Batch, max_steps: int, cg_iter: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Warm start for every row: the primal-dual active-set method (Hintermueller, Ito & Kunisch,
    SIAM J. Optim. 13(3), 2002: a semismooth Newton method for the KKT conditions), all rows at
    once. Each step solves every row's passive system (``_passive_solve``) and swaps all the
    indices that break a sign condition at once (``z_j <= 0`` leaves, ``mu_j < 0`` enters),
    where Lawson-Hanson swaps one per step. It usually ends in a few steps but may cycle, so
    it stops when the total number of swaps stops falling, and its answer is only trusted per
    row when it passes the optimality test (``certified``).

    Returns ``(X[N, K] >= 0, certified[N], steps)``.
    """
    G, U = batch.G, batch.U

    def check(F, Z):
        V = U + Z
        mu = V @ G
        tol = _mu_tolerances(batch, V)
        positive = jnp.all(jnp.where(F, Z > batch.tiny, True), axis=-1)
        optimal = jnp.all(jnp.where(F, jnp.abs(mu) <= tol, mu >= -tol), axis=-1)
        moved = (F & (Z <= batch.tiny)) | (~F & (mu < -tol))
        return positive & optimal, F ^ moved

    def cond(carry):
        *_, ok, steps, swaps, last_swaps = carry
        # Stop when the number of swaps stops falling: the method is cycling (or stalling on a
        # rank-deficient G), and Lawson-Hanson is cheaper than more steps.
        return (steps < max_steps) & ~jnp.all(ok) & (swaps < last_swaps)

    def body(carry):
        F, Z, _, steps, swaps, _ = carry
        Z = _passive_solve(batch, F, Z, cg_iter)
        ok, F_next = check(F, Z)
        F_next = jnp.where(ok[:, None], F, F_next)
        return F_next, Z, ok, steps + 1, jnp.sum(F_next ^ F, dtype=jnp.int32), swaps

    F0 = (U @ G) < -_mu_tolerances(batch, U)
    most = jnp.iinfo(jnp.int32).max
    none = jnp.zeros(U.shape[0], bool)
    start = (F0, jnp.zeros_like(U), none, jnp.int32(0), jnp.int32(most - 1), jnp.int32(most))
    F, Z, ok, steps, *_ = jax.lax.while_loop(cond, body, start)
    finite = jnp.all(jnp.isfinite(Z), axis=-1, keepdims=True)
    X = jnp.where(F & finite, jnp.maximum(Z, 0.0), 0.0)
    return X, ok & finite[:, 0], steps


@functools.partial(jax.jit, static_argnames=("max_iter",))
def project_weights(gram: jax.Array, u: jax.Array, max_iter: int | None = None) -> jax.Array:
    """``v = argmin_{v >= u} v^T G v``: ``J^T v`` is the projection of ``J^T u`` onto ``{d : J d >= 0}``.

    Args:
      gram: ``G[K, K]``, symmetric positive semi-definite.
      u: ``[K]``, or a batch ``[..., K]`` of problems sharing ``G`` (solved together).
      max_iter: bound on the active-set iterations (default ``4 K + 20``).

    Returns:
      ``v`` shaped like ``u``, with ``v >= u`` and ``(G v)_j >= 0`` for every ``j`` up to rounding
      (``(G v)_j = 0`` where ``v_j > u_j``). The result does not depend on the scale of ``G``;
      all-zero ``G`` gives ``v = u``.
    """
    num = gram.shape[0]
    if u.shape[-1] != num:
        raise ValueError(f"u has {u.shape[-1]} entries but G is {num} x {num}.")
    limit = max_iter if max_iter is not None else 4 * num + 20
    G = gram / diag_scale(gram)
    G = 0.5 * (G + G.T)
    u = u.astype(G.dtype)
    flat = jnp.reshape(u, (-1, num))
    X, _, _ = _solve(G, flat, limit)
    return jnp.reshape(flat + X, u.shape)


def _solve(
    G: jax.Array, U: jax.Array, limit: int, warm_steps: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``X[N, K]`` with ``v = u + x`` for every row of ``U[N, K]`` (``G`` normalised): the
    primal-dual active-set warm start for all rows (at most ``warm_steps`` steps), then
    Lawson-Hanson (exact, finite) from it, only when some row's warm start failed the optimality
    test. Also returns ``certified[N]`` (the rows the warm start solved) and its steps."""
    dtype = G.dtype
    eps = float(jnp.finfo(dtype).eps)
    scale_u = jnp.maximum(jnp.max(jnp.abs(U), axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
    batch = _Batch(G=G, absG=jnp.abs(G), U=U, tiny=8.0 * eps * scale_u)
    steps_cap = _PDAS_STEPS if warm_steps is None else warm_steps
    X, certified, steps = _primal_dual_active_set(batch, steps_cap, _cg_budget(G.shape[0]))

    def finish(X):
        # Rows the warm start did not certify start Lawson-Hanson from scratch (x = 0, F empty):
        # a warm start from an uncertified point can hold more passive columns than rank(G)
        # (seen on rank-deficient G), which the rank-one updates cannot recover from exactly.
        x0 = jnp.where(certified[:, None], X, 0.0)
        solve = lambda u, x, ok: _lawson_hanson(G, u, limit, x, ok) - u
        return jax.vmap(solve)(U, x0, certified)

    X = jax.lax.cond(jnp.all(certified), lambda X: X, finish, X)
    return X, certified, steps


_PDAS_STEPS = 12


def _cg_budget(num: int) -> int:
    """CG iterations per passive solve: exact after ``|F| <= K`` in exact arithmetic."""
    return num + 10
