"""Evaluation metrics (host-side NumPy, streamed over an epoch of batches) and Δm%.

One accumulator per task kind, made by :func:`make_task_metric`; each has
``update(prediction, target)`` (NumPy arrays in the formats of :mod:`experiments.models` and
:mod:`experiments.tasks`) and ``result() -> dict[str, float]``:

==============  ===========================================================================
kind            metrics (unit)
==============  ===========================================================================
classification  ``accuracy`` (%), ``macro_f1`` ([0, 1]), ``f1_per_class`` (list, [0, 1])
segmentation    ``miou`` (%), ``pixel_acc`` (%)
depth           ``abs_err``, ``rel_err`` (target units)
normals         ``angle_mean``, ``angle_median`` (degrees), ``within_11_25``,
                ``within_22_5``, ``within_30`` (% of valid pixels)
==============  ===========================================================================

Units follow the papers' tables (NYUv2 mIoU 38.30, Multi-MNIST accuracy 98%, plant_leaves F1
0.847), so published references plug into :func:`delta_m` unchanged. :data:`METRIC_DIRECTIONS`
names each metric's direction (+1: higher is better).

How this compares with the reference code (MTAN, CAGrad, Nash-MTL, LibMTL):

* classification: scikit-learn's ``accuracy_score`` and ``f1_score`` on all predictions of the
  epoch (labels and predictions are kept as int32, 8 bytes per example). ``macro_f1`` is sklearn's default macro average over the classes present in the targets or
  predictions; ``f1_per_class`` has one entry per class ``0..C-1`` (0.0 for a class absent from
  both).
* segmentation: one confusion matrix over all valid pixels of the epoch (as Nash-MTL's
  ``ConfMatrix`` and LibMTL's ``SegMetric``; MTAN's original code averaged per-image mIoU).
  ``miou`` averages the IoU over the classes with a non-empty union (the reference code's
  ``torch.mean`` gives NaN when a class never occurs in targets or predictions).
* depth: errors summed over all valid pixels (``depth != 0``) and divided by their count. The
  reference code averages per-batch means (Nash-MTL/CAGrad/MTAN: equal weight per batch; LibMTL:
  weighted by batch size), which differs when batches hold different numbers of valid pixels.
* normals: angles of all valid pixels (target not all-zero) between the normalised prediction and
  the normalised target. The mean and the threshold fractions are running sums. The median is exact over all
  valid pixels of the epoch, as LibMTL's ``NormalMetric`` (concatenate then ``np.median``);
  MTAN, CAGrad and Nash-MTL report the mean over test batches of per-batch medians (batch size 2),
  which is not the median of the test set. Exactness costs 4 bytes per valid pixel (float32; the
  654 NYUv2 test images at 288x384 are ~72M pixels, ~290 MB, twice that while the median is
  taken); ``median="histogram"`` bounds memory to a fixed histogram (the median to within
  ``1 / histogram_bins_per_degree`` degrees).

Δm% (Maninis et al. 2019) with both aggregations the papers use, see :func:`delta_m`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from experiments.tasks import TaskSpec

__all__ = [
    "DELTA_M_AGGREGATIONS",
    "METRIC_DIRECTIONS",
    "METRIC_UNITS",
    "ClassificationMetric",
    "DepthMetric",
    "MultiTaskMetrics",
    "NormalsMetric",
    "SegmentationMetric",
    "TaskMetric",
    "delta_m",
    "make_task_metric",
    "relative_improvements",
]

METRIC_DIRECTIONS: dict[str, int] = {
    "accuracy": +1,
    "macro_f1": +1,
    "miou": +1,
    "pixel_acc": +1,
    "abs_err": -1,
    "rel_err": -1,
    "angle_mean": -1,
    "angle_median": -1,
    "within_11_25": +1,
    "within_22_5": +1,
    "within_30": +1,
}
"""+1 when higher is better, -1 when lower is better (``f1_per_class`` is a list and has none)."""

METRIC_UNITS: dict[str, str] = {
    "accuracy": "%",
    "macro_f1": "[0, 1]",
    "f1_per_class": "[0, 1]",
    "miou": "%",
    "pixel_acc": "%",
    "abs_err": "target units",
    "rel_err": "ratio",
    "angle_mean": "degrees",
    "angle_median": "degrees",
    "within_11_25": "%",
    "within_22_5": "%",
    "within_30": "%",
}

NORMAL_THRESHOLDS = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}

DELTA_M_AGGREGATIONS = ("per_task", "flat")


class TaskMetric(Protocol):
    """A streaming accumulator: ``update`` once per batch, ``result`` at the end of the epoch."""

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None: ...

    def result(self) -> dict[str, Any]: ...


def _shape_error(name: str, what: str, prediction: np.ndarray, target: np.ndarray) -> ValueError:
    return ValueError(
        f"{name}: expected {what}; got prediction {prediction.shape} and target {target.shape}."
    )


class ClassificationMetric:
    """Accuracy, macro F1 and per-class F1 (scikit-learn) over every example seen.

    ``update(prediction, target)``: ``prediction`` logits ``[B, C]`` (argmax taken) or labels
    ``[B]``; ``target`` labels ``[B]``. Examples with a negative target are skipped.
    """

    def __init__(self, num_classes: int, name: str = "classification"):
        self.num_classes = int(num_classes)
        self.name = name
        self._true: list[np.ndarray] = []
        self._pred: list[np.ndarray] = []

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        prediction, target = np.asarray(prediction), np.asarray(target)
        if prediction.ndim == 2:
            prediction = prediction.argmax(axis=-1)
        if prediction.ndim != 1 or target.shape != prediction.shape:
            raise _shape_error(
                self.name, "logits [B, C] or labels [B] and labels [B]", prediction, target
            )
        keep = target >= 0
        self._true.append(target[keep].astype(np.int32))
        self._pred.append(prediction[keep].astype(np.int32))

    def result(self) -> dict[str, Any]:
        from sklearn.metrics import accuracy_score, f1_score  # imported here: ~1 s to import

        if not self._true or sum(t.size for t in self._true) == 0:
            raise ValueError(f"{self.name}: no examples were seen; call update() first.")
        y_true, y_pred = np.concatenate(self._true), np.concatenate(self._pred)
        per_class = f1_score(
            y_true, y_pred, labels=np.arange(self.num_classes), average=None, zero_division=0.0
        )
        return {
            "accuracy": 100.0 * float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0.0)),
            "f1_per_class": [float(f) for f in per_class],
        }


class SegmentationMetric:
    """mIoU and pixel accuracy from one confusion matrix over every valid pixel seen.

    ``update(prediction, target)``: ``prediction`` logits ``[B, H, W, C]`` (argmax taken) or labels
    ``[B, H, W]``; ``target`` labels ``[B, H, W]``, ``-1`` (any label outside ``[0, C)``) ignored.
    """

    def __init__(self, num_classes: int, name: str = "segmentation"):
        self.num_classes = int(num_classes)
        self.name = name
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)  # [true, pred]

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        prediction, target = np.asarray(prediction), np.asarray(target)
        if prediction.ndim == target.ndim + 1:
            prediction = prediction.argmax(axis=-1)
        if prediction.shape != target.shape:
            raise _shape_error(
                self.name, "logits [B, H, W, C] and labels [B, H, W]", prediction, target
            )
        n = self.num_classes
        valid = (target >= 0) & (target < n)
        index = n * target[valid].astype(np.int64) + prediction[valid].astype(np.int64)
        self.confusion += np.bincount(index, minlength=n * n).reshape(n, n)

    def result(self) -> dict[str, float]:
        h = self.confusion.astype(np.float64)
        total = h.sum()
        if total == 0:
            raise ValueError(f"{self.name}: no valid pixel was seen.")
        tp = np.diag(h)
        union = h.sum(0) + h.sum(1) - tp
        present = union > 0
        return {
            "miou": 100.0 * float(np.mean(tp[present] / union[present])),
            "pixel_acc": 100.0 * float(tp.sum() / total),
        }


class DepthMetric:
    """Absolute and relative depth error over every pixel with ``target != 0``.

    ``update(prediction, target)``: both ``[B, H, W, 1]`` (or ``[B, H, W]``).
    ``abs_err = sum|p - t| / n``, ``rel_err = sum(|p - t| / t) / n`` over the n valid pixels.
    """

    def __init__(self, name: str = "depth"):
        self.name = name
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.count = 0

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        prediction, target = np.asarray(prediction), np.asarray(target)
        if prediction.shape != target.shape:
            raise _shape_error(
                self.name, "prediction and target of the same shape", prediction, target
            )
        valid = target != 0
        t = target[valid].astype(np.float64)
        err = np.abs(prediction[valid].astype(np.float64) - t)
        self.abs_sum += float(err.sum())
        self.rel_sum += float((err / t).sum())
        self.count += int(valid.sum())

    def result(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError(f"{self.name}: no valid pixel (depth != 0) was seen.")
        return {"abs_err": self.abs_sum / self.count, "rel_err": self.rel_sum / self.count}


def _unit_rows(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


class NormalsMetric:
    """Angular error statistics (degrees) over every pixel whose target normal is not all-zero.

    ``update(prediction, target)``: both ``[B, H, W, 3]``. Both are L2-normalised (a no-op for
    the model's and NYUv2's unit normals; LibMTL normalises the prediction only, MTAN neither), the
    angle is ``degrees(arccos(clip(<p, t>, -1, 1)))`` and ``within_*`` count the angles strictly
    below the threshold (MTAN's ``error < 11.25``).

    Args:
      median: ``"exact"`` (keep every angle as float32: 4 bytes per valid pixel, plus one
        transient copy while the median is taken) or
        ``"histogram"`` (fixed memory; the median is interpolated inside a bin of width
        ``1 / histogram_bins_per_degree`` degrees).
      histogram_bins_per_degree: resolution of the histogram median.
    """

    def __init__(
        self, name: str = "normals", median: str = "exact", histogram_bins_per_degree: int = 1000
    ):
        if median not in ("exact", "histogram"):
            raise ValueError(f"{name}: median must be 'exact' or 'histogram'; got {median!r}.")
        self.name = name
        self.median = median
        self.bins_per_degree = int(histogram_bins_per_degree)
        self.count = 0
        self.angle_sum = 0.0
        self.below = dict.fromkeys(NORMAL_THRESHOLDS, 0)
        self._angles: list[np.ndarray] = []
        self._hist = (
            np.zeros(180 * self.bins_per_degree, np.int64) if median == "histogram" else None
        )

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        prediction, target = np.asarray(prediction), np.asarray(target)
        if prediction.shape != target.shape or prediction.shape[-1:] != (3,):
            raise _shape_error(self.name, "prediction and target [..., 3]", prediction, target)
        valid = np.any(target != 0, axis=-1)
        p, t = (_unit_rows(a[valid]) for a in (prediction, target))
        cos = np.clip(np.sum(p * t, axis=-1), -1.0, 1.0)
        angles = np.degrees(np.arccos(cos))
        self.count += angles.size
        self.angle_sum += float(angles.sum())
        for key, threshold in NORMAL_THRESHOLDS.items():
            self.below[key] += int(np.count_nonzero(angles < threshold))
        if self._hist is None:
            self._angles.append(angles.astype(np.float32))
        else:
            idx = np.minimum((angles * self.bins_per_degree).astype(np.int64), self._hist.size - 1)
            self._hist += np.bincount(idx, minlength=self._hist.size)

    def _median(self) -> float:
        if self._hist is None:
            # one float32 buffer, partitioned in place (no sorted copy)
            return float(np.median(np.concatenate(self._angles), overwrite_input=True))
        cdf = np.cumsum(self._hist)
        half = 0.5 * self.count
        b = int(np.searchsorted(cdf, half))  # first bin where the cdf reaches half
        before = cdf[b - 1] if b > 0 else 0
        frac = (half - before) / max(self._hist[b], 1)
        return (b + frac) / self.bins_per_degree

    def result(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError(f"{self.name}: no valid pixel (non-zero target normal) was seen.")
        out = {"angle_mean": self.angle_sum / self.count, "angle_median": self._median()}
        out.update({k: 100.0 * v / self.count for k, v in self.below.items()})
        return out


def make_task_metric(task: TaskSpec, **kwargs: Any) -> TaskMetric:
    """A fresh accumulator for ``task`` (``kwargs`` go to :class:`NormalsMetric`)."""
    if task.kind == "classification":
        return ClassificationMetric(task.num_classes, task.name)
    if task.kind == "segmentation":
        return SegmentationMetric(task.num_classes, task.name)
    if task.kind == "depth":
        return DepthMetric(task.name)
    if task.kind == "normals":
        return NormalsMetric(task.name, **kwargs)
    raise ValueError(f"Unknown task kind {task.kind!r} for task {task.name!r}.")


class MultiTaskMetrics:
    """One accumulator per task: ``update({task: prediction}, {task: target})``, ``result()``."""

    def __init__(self, tasks: Sequence[TaskSpec], **kwargs: Any):
        self.tasks = tuple(tasks)
        self.metrics = {t.name: make_task_metric(t, **kwargs) for t in self.tasks}

    def update(self, predictions: Mapping[str, Any], targets: Mapping[str, Any]) -> None:
        for name, metric in self.metrics.items():
            metric.update(np.asarray(predictions[name]), np.asarray(targets[name]))

    def result(self) -> dict[str, dict[str, Any]]:
        return {name: metric.result() for name, metric in self.metrics.items()}


def relative_improvements(
    results: Mapping[str, Mapping[str, float]],
    reference: Mapping[str, Mapping[str, float]],
    directions: Mapping[str, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Per-metric relative improvement in %: ``r = 100 * d * (M - S) / S`` (``d = +1`` higher-better).

    The metrics are those of ``reference`` (per task); list-valued ones (``f1_per_class``) are
    skipped, metrics only in ``results`` are ignored.

    Raises:
      ValueError: a reference task or metric missing from ``results``, a metric with no known
        direction, or a zero reference value.
    """
    dirs = {**METRIC_DIRECTIONS, **(directions or {})}
    out: dict[str, dict[str, float]] = {}
    for task, ref in reference.items():
        if task not in results:
            raise ValueError(f"delta_m: task {task!r} is in the reference but not in the results.")
        out[task] = {}
        for metric, s in ref.items():
            if isinstance(s, list | tuple | np.ndarray):
                continue
            if metric not in dirs:
                raise ValueError(
                    f"delta_m: no direction for metric {metric!r} of task {task!r}; pass "
                    f"directions={{{metric!r}: +1 or -1}} (known: {sorted(dirs)})."
                )
            if metric not in results[task]:
                raise ValueError(
                    f"delta_m: metric {metric!r} of task {task!r} is not in the results."
                )
            if s == 0:
                raise ValueError(f"delta_m: reference {task}/{metric} is 0; Δm divides by it.")
            m = float(results[task][metric])
            out[task][metric] = 100.0 * dirs[metric] * (m - float(s)) / float(s)
        if not out[task]:
            raise ValueError(f"delta_m: task {task!r} has no scalar reference metric.")
    if not out:
        raise ValueError("delta_m: the reference has no task.")
    return out


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    reference: Mapping[str, Mapping[str, float]],
    aggregation: str,
    directions: Mapping[str, int] | None = None,
) -> float:
    """Δm%: the mean relative improvement over a single-task reference (Maninis et al. 2019).

    For every metric k of every task, ``r_k = 100 * d_k * (M_k - S_k) / S_k`` with ``d_k = +1``
    when higher is better and ``-1`` when lower is better (:data:`METRIC_DIRECTIONS`), ``M`` the
    multi-task result and ``S`` the single-task reference. **Sign: an improvement, higher is
    better** (positive = the multi-task model beats the single-task models).

    Aggregations (they differ a lot when tasks have different numbers of metrics; NYUv2 has
    2 + 2 + 5):

    * ``"per_task"``: two-level; the mean over the metrics of each task, then the mean over tasks.
      What Recon reports (improvement, higher is better).
    * ``"flat"``: the mean over all metrics of all tasks at once. What MTAN-style tables report
      (CAGrad, Nash-MTL, FAMO and Sparse Training; Nash-MTL's ``delta_fn`` is a flat mean over the
      9 NYUv2 metrics) -- but as a **drop** (lower is better): their number is
      ``-delta_m(results, reference, "flat")``. E.g. the NYUv2 joint (LS) row against the STL row
      gives ``delta_m = -5.59``, printed as ``Δm% = 5.59``.

    Args:
      results: ``{task: {metric: value}}`` of the model (extra metrics are ignored).
      reference: ``{task: {metric: value}}`` of the single-task models; its metrics are the ones
        compared (in the same units as ``results``).
      aggregation: ``"per_task"`` or ``"flat"``.
      directions: extra or overriding metric directions.

    Returns:
      Δm in percent (a float; higher is better).
    """
    if aggregation not in DELTA_M_AGGREGATIONS:
        raise ValueError(
            f"Unknown Δm aggregation {aggregation!r}; valid: {DELTA_M_AGGREGATIONS} "
            "('per_task': mean over metrics within each task, then over tasks, as Recon; "
            "'flat': mean over all metrics, as the MTAN/CAGrad/Nash-MTL/ST tables)."
        )
    r = relative_improvements(results, reference, directions)
    if aggregation == "per_task":
        return float(np.mean([np.mean(list(t.values())) for t in r.values()]))
    return float(np.mean([v for t in r.values() for v in t.values()]))
