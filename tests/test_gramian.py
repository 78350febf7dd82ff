"""Gram matrices per group, cosines and groupings."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mtl_jax as mtl
from tests import _matrices as M


def test_global_gramian_is_j_jt_over_all_leaves():
    J = M.sample("normal", 5)
    G = mtl.gramian.gramian(M.to_tree(J))
    np.testing.assert_allclose(G, J @ J.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(G, np.asarray(G).T)


def test_leaf_and_custom_groupings_sum_to_global():
    J = M.sample("normal", 4)
    tree = M.to_tree(J)
    per_leaf = mtl.gramian.gramian(tree, "leaf")
    assert list(per_leaf) == ["enc/b", "enc/w", "head"]  # flattening order (sorted dict keys)
    np.testing.assert_allclose(per_leaf["head"], J[:, 14:] @ J[:, 14:].T, rtol=1e-5)
    np.testing.assert_allclose(sum(per_leaf.values()), J @ J.T, rtol=1e-5, atol=1e-5)
    custom = mtl.gramian.gramian(tree, lambda path: path.split("/")[0])
    np.testing.assert_allclose(custom["enc"], J[:, :14] @ J[:, :14].T, rtol=1e-5, atol=1e-5)


def test_by_module_linen_and_nnx_paths():
    assert mtl.gramian.by_module("params/Dense_0/kernel") == "params/Dense_0"
    assert mtl.gramian.by_module("params/BatchNorm_0/scale") == "params/BatchNorm_0"
    assert mtl.gramian.by_module("encoder/l1/kernel/value") == "encoder/l1"
    assert mtl.gramian.by_module("bias") == "bias"


def test_cosine_matrix_zero_rows_are_zero_not_nan():
    J = M.sample("zero_rows", 4)
    C = np.asarray(mtl.gramian.cosine_matrix(J @ J.T))
    assert np.all(np.isfinite(C))
    assert np.all(C[0] == 0) and np.all(C[:, 2] == 0)
    np.testing.assert_allclose(
        C[1, 3], J[1] @ J[3] / np.linalg.norm(J[1]) / np.linalg.norm(J[3]), rtol=1e-6
    )


def test_bf16_jacobian_accumulates_in_float32():
    J = M.sample("normal", 3)
    tree = jax.tree.map(lambda x: x.astype("bfloat16"), M.to_tree(J))
    G = mtl.gramian.gramian(tree)
    assert G.dtype == np.float32


def test_leaves_disagreeing_on_k_are_an_error_naming_them():
    tree = M.to_tree(M.sample("normal", 3))
    tree["head"] = tree["head"][:2]
    with pytest.raises(ValueError, match=r"K=2: head.*K=3|disagree"):
        mtl.gramian.gramian(tree)


def test_unknown_granularity():
    with pytest.raises(ValueError, match="granularity"):
        mtl.gramian.gramian(M.to_tree(M.sample("normal", 2)), "layer")
