"""What a task is, shared by the data sets, the models, the losses and the metrics."""

from __future__ import annotations

import dataclasses

TASK_KINDS = ("classification", "segmentation", "depth", "normals")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task data set.

    Attributes:
      name: the key of the task's target in every example (e.g. ``"left"``, ``"species"``).
      kind: ``"classification"`` (target: int32 scalar; binary tasks are classification with
        ``num_classes=2``), ``"segmentation"`` (int32 ``[H, W]``, -1 = ignore), ``"depth"``
        (float32 ``[H, W, 1]``, 0 = missing), ``"normals"`` (float32 ``[H, W, 3]``, all-zero =
        missing).
      num_classes: number of classes for classification and segmentation; 0 otherwise.
    """

    name: str
    kind: str
    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"Unknown task kind {self.kind!r}; valid kinds: {TASK_KINDS}.")
        if self.kind in ("classification", "segmentation") and self.num_classes < 2:
            raise ValueError(f"Task {self.name!r} of kind {self.kind!r} needs num_classes >= 2.")
