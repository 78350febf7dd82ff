"""Small Flax modules the conflict-removal methods need (docs/design/DESIGN.md section 5)."""

from mtl_jax.modules.modulation import (
    PARAM_NAME,
    NNXTaskModulation,
    TaskModulation,
    is_modulation,
    modulation_spec,
)

__all__ = [
    "PARAM_NAME",
    "NNXTaskModulation",
    "TaskModulation",
    "is_modulation",
    "modulation_spec",
]
