"""UPGrad's and DualProj's ``reg_eps`` (TorchJD's regularised problem) against a NumPy reference.

Reference written from TorchJD's definition (``torchjd/_linalg``): ``G' = G / tr(G) + eps I``,
then for every ``u``: ``v = argmin_{v >= u} v^T G' v``, solved here by SciPy's NNLS after a
Cholesky factor ``G' = L L^T``: ``x = v - u >= 0`` minimises ``|L^T x + L^T u|^2``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls

import mtl_jax as mtl
from mtl_jax.weighting.base import EmptyState


def projection_reference(gram: np.ndarray, u: np.ndarray, eps: float) -> np.ndarray:
    g = gram / np.trace(gram) + eps * np.eye(len(gram))
    L = np.linalg.cholesky(g)
    x, _ = nnls(L.T, -L.T @ u)
    return x + u


def weights(name: str, gram: np.ndarray, **kwargs) -> np.ndarray:
    w = mtl.weighting.get_weighting(name, **kwargs)
    return np.asarray(w.weigh(jnp.asarray(gram), EmptyState(), jax.random.key(0), None)[0])


def iwrm_like_gram(seed: int, num: int = 12) -> np.ndarray:
    """Conflicting rows whose norms span 1e-6 to 1e2, as per-sample gradients late in training."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(num, 6)) * np.logspace(-6, 2, num)[:, None]
    return rows @ rows.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upgrad_and_dualproj_with_reg_eps_match_the_reference(seed):
    with jax.enable_x64(True):
        gram = iwrm_like_gram(seed)
        num = len(gram)
        upgrad_ref = sum(projection_reference(gram, np.eye(num)[i] / num, 1e-4) for i in range(num))
        dual_ref = projection_reference(gram, np.full(num, 1.0 / num), 1e-4)
        np.testing.assert_allclose(weights("upgrad", gram, reg_eps=1e-4), upgrad_ref, rtol=1e-7)
        np.testing.assert_allclose(weights("dualproj", gram, reg_eps=1e-4), dual_ref, rtol=1e-7)


def test_the_ridge_caps_the_weight_of_a_near_zero_gradient():
    """Exact UPGrad puts a weight growing like 1/|g| on a tiny gradient another row conflicts
    with; TorchJD's ridge keeps every weight O(1 / eps)."""
    with jax.enable_x64(True):
        a, b = np.array([1.0, 0.0]), np.array([-1.0, 1e-3])
        for tiny in (1e-3, 1e-5):
            gram = np.stack([a, tiny * b]) @ np.stack([a, tiny * b]).T
            exact = weights("upgrad", gram)
            ridge = weights("upgrad", gram, reg_eps=1e-4)
            assert exact[1] > 0.1 / tiny  # grows as the gradient shrinks
            assert np.max(np.abs(ridge)) < 1e4


def test_reg_eps_zero_is_the_exact_method_and_negative_is_refused():
    gram = iwrm_like_gram(3)
    np.testing.assert_array_equal(weights("upgrad", gram, reg_eps=0.0), weights("upgrad", gram))
    with pytest.raises(ValueError, match="reg_eps must be >= 0"):
        mtl.weighting.get_weighting("upgrad", reg_eps=-1.0)
