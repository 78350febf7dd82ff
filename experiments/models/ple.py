"""``cgc`` and ``ple``: Customized Gate Control and Progressive Layered Extraction (Tang et al.,
RecSys 2020), LibMTL's ``CGC`` and ``PLE``. One file: CGC is PLE with one level.

**CGC** (paper Sec. 4.1, Eqs. 1-3): ``m_s`` shared experts ``E^s`` and ``m_t`` experts ``E^k`` per
task on the flattened input; task k's gate mixes its own experts and the shared ones::

    w^k(x) = softmax(W^k x)                            # [m_s + m_t]
    S^k(x) = [E^s_1(x), ..., E^s_ms(x), E^k_1(x), ..., E^k_mt(x)]
    y^k    = t^k( w^k(x) S^k(x) )                      # t^k: task k's tower

**PLE** (Sec. 4.2, Eqs. 4-5): L extraction levels. Level j reads the previous level's outputs
(``g^{k,0} = g^{s,0} = x``): task k's experts read ``g^{k,j-1}``, the shared experts
``g^{s,j-1}``; task k's gate (read from ``g^{k,j-1}``) mixes ``[E^{s,j}, E^{k,j}]`` into
``g^{k,j}``; at levels j < L a *shared gate* (read from ``g^{s,j-1}``) mixes every expert of the
level, ``[E^{s,j}, E^{1,j}, ..., E^{K,j}]``, into ``g^{s,j}``. Towers read ``g^{k,L}``.

**Which leaves are shared** (the encoder: K Jacobian rows) and which task-specific (head k: task
k's gradient only) -- exactly the leaves every task's loss reaches, no more:

* shared: every shared expert; at levels j < L the shared gate and every task's experts (they
  feed the shared gate, hence every task); at levels j < L-1 the task gates too (``g^{k,j}``
  feeds ``E^{k,j+1}``, which feeds the shared gate of level j+1).
* task k's (head k): the level L-1 task gate (``g^{k,L-1}`` feeds only level L's task-k experts and
  gate: level L has no shared gate), the level L task experts and gate, and the tower.

So for L >= 2 the encoder returns ``z = {"gate_in": g^{k,L-2} stacked [B, K, D'], "task_experts":
E^{k,L-1} stacked [B, K, m_t, D], "prev_shared_experts": E^{s,L-1} [B, m_s, D], "shared_experts":
E^{s,L}(g^{s,L-1}) [B, m_s, D]}`` and head k computes ``g^{k,L-1}`` from its slice, then level L;
for CGC (L = 1) ``z = {"x": [B, D_in], "shared_experts": [B, m_s, D]}`` and head k computes its
own experts from ``z["x"]``. Each expert is an MLP (``Dense -> ReLU`` per entry of
``expert_sizes``; every level's experts have the same widths).

Departures from LibMTL: LibMTL's ``PLE`` is ResNet-only (its levels are a ResNet's stages) and has
*no shared gate*: each task's path runs the shared experts on its own previous representation,
task experts feed only their task, and gates read the previous representation at every level;
we follow the paper (shared gates at levels < L, as above). LibMTL's ``CGC`` builds each task's
experts as ``nn.ModuleList([encoder] * n)`` (one object repeated); every expert here has its own
weights, as in the paper. One ``num_task_experts`` for every task (LibMTL takes one count per
task). The gates read the flattened input (CGC, PLE level 1) or the previous level's output, as in
LibMTL and the paper; concatenation order ``[shared, task]`` as LibMTL.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.base import ClassifierHead, MultiTaskModel
from experiments.models.mmoe import (
    ExpertBank,
    check_expert_config,
    flatten,
    mix_experts,
    softmax_gate,
)
from experiments.tasks import TaskSpec

DEFAULTS = {
    "num_levels": 2,  # L extraction levels (1 = CGC)
    "num_shared_experts": 2,  # m_s per level
    "num_task_experts": 2,  # m_t per task per level
    "expert_sizes": (64,),  # every expert: Dense -> ReLU per width
    "tower_hidden": 32,  # per-task tower hidden width; 0 = linear tower
}
CGC_DEFAULTS = {k: v for k, v in DEFAULTS.items() if k != "num_levels"}
TASK_KINDS = ("classification",)

__all__ = ["CGC_DEFAULTS", "DEFAULTS", "TASK_KINDS", "PLEEncoder", "PLEHead", "build", "build_cgc"]


def _gated(gate_logits: jax.Array, experts: Sequence[jax.Array]) -> jax.Array:
    """``softmax(gate_logits) [B, E]`` mixes the concatenated ``experts`` (each ``[B, E_i, D]``)."""
    return mix_experts(jax.nn.softmax(gate_logits, axis=-1), jnp.concatenate(experts, axis=1))


class PLEEncoder(nn.Module):
    """The shared part of CGC/PLE (see the module docstring): ``x [B, H, W, C] -> z``.

    Parameter names: ``level{j}_shared_experts``, ``level{j}_task{k}_experts``,
    ``level{j}_shared_gate``, ``level{j}_task{k}_gate`` (j counted from 0).
    """

    num_tasks: int
    num_levels: int
    num_shared_experts: int
    num_task_experts: int
    expert_sizes: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        del train
        flat = flatten(x)
        last = self.num_levels - 1
        ms, mt, sizes = self.num_shared_experts, self.num_task_experts, self.expert_sizes
        if self.num_levels == 1:  # CGC: the task experts and gates are all in the heads
            return {
                "x": flat,
                "shared_experts": ExpertBank(ms, sizes, name="level0_shared_experts")(flat),
            }
        task_in = [flat] * self.num_tasks  # g^{k,j-1}: [B, D']
        shared_in = flat  # g^{s,j-1}
        for level in range(last):
            shared = ExpertBank(ms, sizes, name=f"level{level}_shared_experts")(shared_in)
            tasks = [
                ExpertBank(mt, sizes, name=f"level{level}_task{k}_experts")(task_in[k])
                for k in range(self.num_tasks)
            ]  # K x [B, m_t, D]
            gate = softmax_gate(ms + self.num_tasks * mt, f"level{level}_shared_gate")
            next_shared = _gated(gate(shared_in), [shared, *tasks])
            if level < last - 1:  # level L-1's task gates are task-specific: in the heads
                task_in = [
                    _gated(
                        softmax_gate(ms + mt, f"level{level}_task{k}_gate")(task_in[k]),
                        [shared, tasks[k]],
                    )
                    for k in range(self.num_tasks)
                ]
            shared_in = next_shared
        return {
            "gate_in": jnp.stack(task_in, axis=1),  # g^{k,L-2}: [B, K, D']
            "task_experts": jnp.stack(tasks, axis=1),  # E^{k,L-1}: [B, K, m_t, D]
            "prev_shared_experts": shared,  # E^{s,L-1}: [B, m_s, D]
            "shared_experts": ExpertBank(ms, sizes, name=f"level{last}_shared_experts")(shared_in),
        }


class PLEHead(nn.Module):
    """Task k's part: (PLE) the level L-1 gate ``gate_prev``, then the level L experts
    ``experts``, gate ``gate`` and the tower: ``z -> logits [B, num_classes]``."""

    num_classes: int
    task_index: int
    num_levels: int
    num_shared_experts: int
    num_task_experts: int
    expert_sizes: Sequence[int]
    tower_hidden: int = 0

    @nn.compact
    def __call__(self, z: dict[str, jax.Array], train: bool = False) -> jax.Array:
        del train
        ms, mt = self.num_shared_experts, self.num_task_experts
        if self.num_levels == 1:
            g = z["x"]
        else:  # g^{k,L-1} = gate^{k,L-1}(g^{k,L-2}) . [E^{s,L-1}, E^{k,L-1}]
            k = self.task_index
            logits = softmax_gate(ms + mt, "gate_prev")(z["gate_in"][:, k])
            g = _gated(logits, [z["prev_shared_experts"], z["task_experts"][:, k]])
        own = ExpertBank(mt, self.expert_sizes, name="experts")(g)
        mixed = _gated(softmax_gate(ms + mt, "gate")(g), [z["shared_experts"], own])
        return ClassifierHead(self.num_classes, self.tower_hidden, name="tower")(mixed)


def _build(model: str, config, num_levels: int, tasks: Sequence[TaskSpec]) -> MultiTaskModel:
    sizes = check_expert_config(
        model,
        config.expert_sizes,
        config.tower_hidden,
        num_levels=num_levels,
        num_shared_experts=config.num_shared_experts,
        num_task_experts=config.num_task_experts,
    )
    ms, mt = int(config.num_shared_experts), int(config.num_task_experts)
    encoder = PLEEncoder(len(tasks), num_levels, ms, mt, sizes)
    heads = {
        t.name: PLEHead(t.num_classes, k, num_levels, ms, mt, sizes, int(config.tower_hidden))
        for k, t in enumerate(tasks)
    }
    return MultiTaskModel(encoder, heads, tuple(tasks))


def build(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    """``ple``: ``config.num_levels`` extraction levels."""
    del input_shape  # any image shape: level 1 reads the flattened input
    return _build("ple", config, int(config.num_levels), tasks)


def build_cgc(config, tasks: Sequence[TaskSpec], input_shape: tuple[int, ...]) -> MultiTaskModel:
    """``cgc``: PLE with one level (:data:`CGC_DEFAULTS` has no ``num_levels``)."""
    del input_shape
    return _build("cgc", config, 1, tasks)
