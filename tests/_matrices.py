"""Families of task Jacobians for property tests (TorchJD's ``_inputs.py`` idea, for pytrees).

Every sample is a float64 NumPy matrix ``J[K, P]`` (rows = task gradients) and is split into a
small parameter pytree by :func:`to_tree`, so aggregators are always exercised across several
leaves of different shapes.
"""

from __future__ import annotations

import zlib

import numpy as np

P = 30  # parameters per sample: 10 + 4 + 16 in three leaves
KS = (1, 2, 3, 5, 10, 40)
SCALES = (1e-8, 1.0, 1e8)
KINDS = (
    "normal",
    "conflicting",
    "aligned",
    "parallel",
    "opposite",
    "zero_rows",
    "rank_deficient",
    "zero",
)


def sample(kind: str, k: int, seed: int = 0) -> np.ndarray:
    """A ``[k, P]`` Jacobian of the named family."""
    rng = np.random.default_rng(zlib.crc32(f"{kind}/{k}/{seed}".encode()))
    v = rng.normal(size=P)
    if kind == "normal":
        return rng.normal(size=(k, P))
    if kind == "conflicting":  # alternating around +v / -v, so many pairs have cos < 0
        signs = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)[:, None]
        return signs * v + 0.5 * rng.normal(size=(k, P))
    if kind == "aligned":  # all pairwise cosines positive
        return v + 0.1 * rng.normal(size=(k, P))
    if kind == "parallel":
        return rng.uniform(0.5, 3.0, size=(k, 1)) * v
    if kind == "opposite":
        signs = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)[:, None]
        return signs * rng.uniform(0.5, 3.0, size=(k, 1)) * v
    if kind == "zero_rows":
        j = rng.normal(size=(k, P))
        j[::2] = 0.0  # rows 0, 2, 4, ... are zero (all rows when k = 1)
        return j
    if kind == "rank_deficient":
        r = max(1, k // 2)
        return rng.normal(size=(k, r)) @ rng.normal(size=(r, P))
    if kind == "zero":
        return np.zeros((k, P))
    raise ValueError(kind)


def to_tree(j: np.ndarray, dtype=np.float32) -> dict:
    """Splits ``J[K, 30]`` into ``{'enc': {'w': [K,2,5], 'b': [K,4]}, 'head': [K,16]}``."""
    k = j.shape[0]
    j = np.asarray(j, dtype=dtype)
    return {
        "enc": {"w": j[:, :10].reshape(k, 2, 5), "b": j[:, 10:14]},
        "head": j[:, 14:],
    }


def params_like(k_tree: dict) -> dict:
    """Parameters (no task axis) matching a Jacobian tree."""
    import jax

    return jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), k_tree)


def from_tree(tree: dict) -> np.ndarray:
    """Flattens an (aggregated) update tree in the order of :func:`to_tree`."""
    return np.concatenate(
        [np.ravel(tree["enc"]["w"]), np.ravel(tree["enc"]["b"]), np.ravel(tree["head"])]
    ).astype(np.float64)


def all_samples(ks=KS, kinds=KINDS, scales=SCALES):
    for k in ks:
        for kind in kinds:
            for scale in scales:
                yield k, kind, scale, scale * sample(kind, k)


def plain(x) -> np.ndarray:
    """A leaf as a NumPy array; a typed PRNG key as its key data (``uint32``)."""
    import jax

    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def assert_trees_equal(a, b) -> None:
    """Leaf-by-leaf exact equality of two pytrees; typed PRNG keys compared by their key data."""
    import jax

    jax.tree.map(lambda x, y: np.testing.assert_array_equal(plain(x), plain(y)), a, b)
