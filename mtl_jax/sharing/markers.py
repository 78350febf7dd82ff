"""Sharing-spec markers: what one parameter leaf is to the tasks.

A *sharing spec* is a pytree shaped like the parameters (or a prefix of them) whose leaves are
markers: :data:`SHARED` (one array used by every task), :data:`COPIED` (per-task copies with a
leading task axis ``[K, *shape]``, task t uses row t: Recon's branched layers, task modulation)
or :class:`Masked` ``(M)`` (one shared ``theta`` and masks ``M: [K, *shape]``, bool or 0/1;
task t uses ``theta * M_t``: LaSS). The strings ``"shared"`` and ``"copied"`` are accepted for
the first two.

Semantics and examples: ``docs/custom_loop.md``, section "Sharing specs".
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np

__all__ = ["COPIED", "SHARED", "Marker", "Masked", "Sharing"]


class Sharing(enum.StrEnum):
    """How a parameter leaf is shared across tasks (the leaves of a sharing spec)."""

    SHARED = "shared"
    COPIED = "copied"


SHARED = Sharing.SHARED
"""One array used by every task."""


COPIED = Sharing.COPIED
"""Per-task copies: the parameter leaf has a leading task axis of size K."""


@dataclasses.dataclass(frozen=True, eq=False)
class Masked:
    """A shared parameter ``theta`` that task t sees as ``theta * M_t``.

    Attributes:
      mask: ``[K, *param.shape]``, bool or 0/1, a constant of the spec (computed once, e.g. by
        :func:`mtl_jax.lass.lass_masks`); or ``None`` (``Masked()``): a *mask slot*, whose mask
        is an array given at call time (``masks=`` of :func:`per_task` and
        :func:`per_task_grads`; see :func:`split_masks`).
    """

    mask: Any = None

    def __repr__(self) -> str:
        if self.mask is None:
            return "Masked(<mask given at call time>)"
        return f"Masked(mask={tuple(np.shape(self.mask))})"


Marker = Sharing | Masked


def _is_marker(x: Any) -> bool:
    return isinstance(x, Masked | Sharing) or (isinstance(x, str) and x in ("shared", "copied"))


def _normalize(marker: Any, path: str) -> Marker:
    if isinstance(marker, Masked):
        return marker
    if isinstance(marker, str) and marker in ("shared", "copied"):
        return Sharing(marker)
    raise ValueError(
        f"Spec leaf {path!r} is {marker!r}; expected mtl.SHARED, mtl.COPIED or mtl.sharing.Masked(mask)."
    )
