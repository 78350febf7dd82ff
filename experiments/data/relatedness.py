"""``relatedness``: synthetic tasks whose relatedness is a config parameter (MMoE's generator).

The construction of Ma et al., "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018, section 4.1, generalised from two tasks to K tasks in
groups. For two tasks the paper draws orthonormal ``u1, u2`` in ``R^d`` and sets

    w1 = c u1,   w2 = c (rho u1 + sqrt(1 - rho^2) u2),                          (paper, step 2)
    y_k = w_k . x + sum_{i=1}^{m} sin(alpha_i w_k . x + beta_i) + eps_k,   x ~ N(0, I_d)  (step 4)

so ``cos(w1, w2) = rho`` and the Pearson correlation of ``y1, y2`` grows with ``rho`` (their
Figure 2). Here task ``k`` belongs to group ``groups[k]``; the task vectors have the cosines

    cos(w_k, w_l) = rho_in   (same group),   rho_out   (different groups),

realised as ``W = c L U^T`` with ``L L^T = G`` (the K x K matrix of those cosines, ``G_kk = 1``)
by a semi-definite Cholesky factorisation and ``U``: K orthonormal columns of a random
orthogonal ``d x d`` matrix. With two tasks in two groups, ``L = [[1, 0], [rho_out,
sqrt(1 - rho_out^2)]]``: exactly the paper's ``w1, w2`` (tested). ``alpha_i = i`` and ``beta_i =
(i - 1)^2`` for ``i = 1..m``: the paper gives no values; these are those of the Google Research
generator of the same construction (``generate_task_pairs``).

Departures from the paper: the runner trains classification tasks only, so each task's label is
its score ``y_k`` cut into ``num_classes`` equally frequent bins (quantile thresholds of the
training scores, applied to the test scores too); ``noise_std`` is much larger than the paper's
0.1 (see below); the same ``x`` is labelled for every task (as in the paper without
``shuffle_task_data``).

Why sharing helps and hurts here, and the defaults:

* **It helps** tasks of one group: with ``rho_in = 1`` every task of a group is a noisy view of
  one latent label, with independent noise ``eps_k``. A single-task model sees one noisy label per
  ``x`` (``noise_std = 1.0`` against a score std of about 1.7 flips about 20% of binary labels)
  and only ``num_train = 1,000`` examples in ``input_dim = 32`` dimensions, so it fits the noise;
  a shared trunk trained on all of them estimates the common feature direction from ``n_group``
  labels per ``x``.
* **It hurts** tasks that need other features, through capacity: the benchmark's model
  (``experiments/configs/relatedness.py``) is an ``mlp`` whose shared trunk ends in a bottleneck
  of 2 ReLU units (hidden sizes ``(64, 2)``, linear heads). A group's label is one wiggly scalar
  function of its own projection ``w . x`` (``num_sines = 4``), which a linear head can read off
  one trunk unit at most; a single-task model has both units for its one function. With more
  distinct label functions than trunk units (``groups = (0, 0, 0, 1, 2)``: three), some task
  cannot be served, and under the mean loss the largest group takes a unit first, so the
  singletons compete for the other (which one loses varies with the seed). A wider trunk removes
  the loss (at width 8 the independent task of ``groups = (0, 0, 0, 1)`` was +0.6 ± 0.8 points
  over single-task, measured 2026-12-07).
* A negative ``rho_out`` (opposed labels) is *not* a conflict a per-task head cannot undo: the
  heads' signs absorb ``w -> -w`` and the trunk can serve ``y(-z)`` from the same projection
  ``z``. This generator's ``f(z) = z + sum_i sin(i z + (i - 1)^2)`` is close enough to odd that
  the binary labels of ``f(-z)`` are the complements of those of ``f(z)`` on 90% of the inputs
  without noise, and on 73% with ``noise_std = 1``, as often as two tasks of one group agree
  (measured, split_seed 0). So opposed groups cost no more trunk capacity than one group and
  behave like related ones in accuracy (at trunk width 1, ``groups = (0, 0, 1, 1)``,
  ``rho_out = -1`` lost at most 0.3 points against single-task); they do make the task gradients
  conflict (negative cosines, the p% the runner reports). An ``f`` whose level sets of
  ``f(-z)`` are neither super- nor sub-level sets of ``f(z)`` would need a second trunk unit
  and hurt like an independent group; it is not implemented.

The default ``groups = (0, 0, 0, 1, 2)``: a related group of three and two tasks independent of
it and of each other (``rho_in = 1``, ``rho_out = 0``), so one run shows both effects. Other
settings: ``groups=(0, 0, 0, 0)`` (all related), ``rho_in`` between 0 and 1 (partly related),
``groups=(0, 1, 2, 3)`` with ``rho_out=0`` (all independent), ``rho_out=-1`` (opposed).

Determinism: the task vectors, the inputs, the noise of the train and the test set are drawn from
generators seeded by ``split_seed`` alone (``numpy.random.SeedSequence([split_seed, 3])``), so the
same config gives bit-identical arrays; train and test inputs are independent draws.

Example: ``{"image": float32[1, input_dim, 1], "t0": int32, "t1": int32, ...}``; task ``k`` is
named ``t<k>``. :func:`generate` returns the raw arrays (inputs, scores, task vectors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from experiments.data.core import ArraySource, MultiTaskData, first_n
from experiments.tasks import TaskSpec

__all__ = [
    "DEFAULTS",
    "Generated",
    "build",
    "generate",
    "sine_parameters",
    "task_gram",
    "task_names",
    "task_scores",
    "task_vectors",
]

DEFAULTS = {
    "groups": (0, 0, 0, 1, 2),
    "rho_in": 1.0,
    "rho_out": 0.0,
    "input_dim": 32,
    "scale": 1.0,
    "num_sines": 4,
    "noise_std": 1.0,
    "num_classes": 2,
    "num_train": 1_000,
    "num_test": 5_000,
    "split_seed": 0,
    "max_train_examples": 0,
    "max_test_examples": 0,
}

_EIGEN_TOLERANCE = 1e-9


def task_names(num_tasks: int) -> tuple[str, ...]:
    """``("t0", "t1", ...)``: the task names, in loss-vector order."""
    return tuple(f"t{k}" for k in range(num_tasks))


def task_gram(groups: Sequence[int], rho_in: float, rho_out: float) -> np.ndarray:
    """``f64[K, K]`` cosines of the task vectors: 1 on the diagonal, ``rho_in`` within a group,
    ``rho_out`` across groups.

    Raises:
      ValueError: a cosine outside [-1, 1], no task, or cosines no K vectors can have (the matrix
        is not positive semi-definite; names its smallest eigenvalue).
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size < 1:
        raise ValueError(f"relatedness: groups must list one group id per task; got {groups}.")
    for key, value in (("rho_in", rho_in), ("rho_out", rho_out)):
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"relatedness: {key} is a cosine in [-1, 1]; got {value}.")
    same = groups[:, None] == groups[None, :]
    gram = np.where(same, float(rho_in), float(rho_out))
    np.fill_diagonal(gram, 1.0)
    smallest = float(np.linalg.eigvalsh(gram).min())
    if smallest < -_EIGEN_TOLERANCE:
        raise ValueError(
            f"relatedness: no {len(groups)} vectors have these cosines (groups={groups.tolist()}, "
            f"rho_in={rho_in}, rho_out={rho_out}): their matrix has the eigenvalue "
            f"{smallest:.3g} < 0. Move rho_out towards 0 (with g groups of n tasks and rho_in = 1, "
            "rho_out >= -1 / (g - 1)) or rho_in towards 1."
        )
    return gram


def _semidefinite_cholesky(gram: np.ndarray) -> np.ndarray:
    """Lower-triangular ``L`` with ``L L^T = gram`` for a positive *semi*-definite ``gram``
    (a zero pivot gives a zero column; ``np.linalg.cholesky`` refuses singular matrices, e.g.
    ``rho_in = 1``)."""
    k = len(gram)
    lower = np.zeros_like(gram)
    for j in range(k):
        pivot = gram[j, j] - lower[j, :j] @ lower[j, :j]
        if pivot <= _EIGEN_TOLERANCE:
            continue
        lower[j, j] = np.sqrt(pivot)
        lower[j + 1 :, j] = (gram[j + 1 :, j] - lower[j + 1 :, :j] @ lower[j, :j]) / lower[j, j]
    return lower


def task_vectors(gram: np.ndarray, dim: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``f64[K, dim]`` task vectors ``w_k = scale * sum_j L_kj u_j`` with ``cos(w_k, w_l) =
    gram[k, l]`` and ``|w_k| = scale``; ``u_j``: orthonormal, from the QR factorisation of a
    Gaussian ``dim x K`` matrix (signs fixed so that the draw is unique)."""
    k = len(gram)
    if dim < k:
        raise ValueError(
            f"relatedness: input_dim={dim} cannot hold {k} orthonormal task directions; use "
            f"input_dim >= {k}."
        )
    q, r = np.linalg.qr(rng.standard_normal((dim, k)))
    basis = q * np.sign(np.diag(r))  # [dim, K], orthonormal columns
    return scale * _semidefinite_cholesky(gram) @ basis.T


def sine_parameters(num_sines: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, beta)``, ``f64[m]`` each: ``alpha_i = i``, ``beta_i = (i - 1)^2``, ``i = 1..m``."""
    i = np.arange(1, num_sines + 1, dtype=np.float64)
    return i, (i - 1.0) ** 2


def task_scores(
    x: np.ndarray,
    vectors: np.ndarray,
    num_sines: int,
    noise_std: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """``f64[N, K]``: ``y_k = w_k . x + sum_i sin(alpha_i w_k . x + beta_i) + eps_k`` (the paper's
    step 4) for ``x: [N, d]``, ``vectors: [K, d]``, ``eps ~ N(0, noise_std^2)`` i.i.d."""
    alpha, beta = sine_parameters(num_sines)
    z = x @ vectors.T  # [N, K]
    wiggle = np.sin(z[..., None] * alpha + beta).sum(axis=-1)  # [N, K]
    return z + wiggle + noise_std * rng.standard_normal(z.shape)


@dataclasses.dataclass(frozen=True)
class Generated:
    """The raw draw behind one data set.

    Attributes:
      vectors: ``f64[K, d]`` task vectors ``w_k``.
      train_x, test_x: ``f64[N, d]`` inputs.
      train_scores, test_scores: ``f64[N, K]`` the paper's real-valued labels ``y_k``.
      thresholds: ``f64[K, num_classes - 1]`` class boundaries (quantiles of the train scores).
    """

    vectors: np.ndarray
    train_x: np.ndarray
    test_x: np.ndarray
    train_scores: np.ndarray
    test_scores: np.ndarray
    thresholds: np.ndarray

    def labels(self, scores: np.ndarray) -> np.ndarray:
        """``int32[N, K]``: the bin of every score (0 .. num_classes - 1)."""
        columns = [np.searchsorted(t, s) for t, s in zip(self.thresholds, scores.T, strict=True)]
        return np.stack(columns, axis=1).astype(np.int32)


def generate(
    *,
    groups: Sequence[int],
    rho_in: float,
    rho_out: float,
    input_dim: int,
    scale: float,
    num_sines: int,
    noise_std: float,
    num_classes: int,
    num_train: int,
    num_test: int,
    split_seed: int,
) -> Generated:
    """Draws the task vectors, the inputs and the scores (see the module docstring)."""
    if num_train < num_classes or num_test < 1:
        raise ValueError(
            f"relatedness: need num_train >= num_classes and num_test >= 1; got "
            f"num_train={num_train}, num_test={num_test}, num_classes={num_classes}."
        )
    if num_classes < 2 or num_sines < 0 or noise_std < 0 or scale <= 0:
        raise ValueError(
            f"relatedness: need num_classes >= 2, num_sines >= 0, noise_std >= 0, scale > 0; got "
            f"{num_classes}, {num_sines}, {noise_std}, {scale}."
        )
    gram = task_gram(groups, rho_in, rho_out)
    rngs = [
        np.random.default_rng(s) for s in np.random.SeedSequence([split_seed, 3]).spawn(5)
    ]  # vectors, train x, test x, train noise, test noise
    vectors = task_vectors(gram, input_dim, scale, rngs[0])
    train_x = rngs[1].standard_normal((num_train, input_dim))
    test_x = rngs[2].standard_normal((num_test, input_dim))
    train_scores = task_scores(train_x, vectors, num_sines, noise_std, rngs[3])
    test_scores = task_scores(test_x, vectors, num_sines, noise_std, rngs[4])
    levels = np.arange(1, num_classes) / num_classes
    thresholds = np.quantile(train_scores, levels, axis=0).T.reshape(len(gram), num_classes - 1)
    return Generated(vectors, train_x, test_x, train_scores, test_scores, thresholds)


def _source(x: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> ArraySource:
    arrays = {"image": x.astype(np.float32)[:, None, :, None]}  # [N, 1, d, 1]
    arrays.update({name: labels[:, k] for k, name in enumerate(names)})
    return ArraySource(arrays)


def build(
    *,
    name: str = "relatedness",
    groups: Sequence[int],
    rho_in: float,
    rho_out: float,
    input_dim: int,
    scale: float,
    num_sines: int,
    noise_std: float,
    num_classes: int,
    num_train: int,
    num_test: int,
    split_seed: int,
    max_train_examples: int,
    max_test_examples: int,
) -> MultiTaskData:
    """Builds the benchmark (see the module docstring for the construction and the defaults).

    Raises:
      ValueError: cosines outside [-1, 1] or not realisable by vectors, ``input_dim`` below the
        number of tasks, ``num_classes < 2``, negative noise, or too few examples.
    """
    groups = tuple(int(g) for g in groups)
    draw = generate(
        groups=groups,
        rho_in=rho_in,
        rho_out=rho_out,
        input_dim=input_dim,
        scale=scale,
        num_sines=num_sines,
        noise_std=noise_std,
        num_classes=num_classes,
        num_train=num_train,
        num_test=num_test,
        split_seed=split_seed,
    )
    names = task_names(len(groups))
    train = _source(draw.train_x, draw.labels(draw.train_scores), names)
    test = _source(draw.test_x, draw.labels(draw.test_scores), names)
    train, test = first_n(train, max_train_examples), first_n(test, max_test_examples)
    return MultiTaskData(
        name=name,
        tasks=tuple(TaskSpec(t, "classification", num_classes) for t in names),
        train=train,
        test=test,
        val=None,
        input_shape=(1, input_dim, 1),
        info={
            "source": "generated (Ma et al., KDD 2018, section 4.1, K tasks in groups)",
            "sizes": {"train": len(train), "test": len(test)},
            "split_seed": split_seed,
            "groups": {name: g for name, g in zip(names, groups, strict=True)},
            "rho_in": rho_in,
            "rho_out": rho_out,
            "task_cosines": np.round(task_gram(groups, rho_in, rho_out), 6).tolist(),
            "label_correlation_train": np.round(np.corrcoef(draw.train_scores.T), 4).tolist(),
            "preprocessing": f"x ~ N(0, I_{input_dim}); labels: {num_classes} quantile bins of y_k",
        },
    )
