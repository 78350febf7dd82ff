"""Loss-only methods: combine the K task losses into one scalar before one backward pass.

One file per method (:mod:`.equal`, :mod:`.rlw`, :mod:`.uw`, :mod:`.imtl_l`, :mod:`.dwa`,
:mod:`.gls`, :mod:`.stch`, :mod:`.famo`, :mod:`.gradnorm`, :mod:`.pbi`, :mod:`.cosmos`), all behind the interface
:class:`Scalarizer` (:mod:`.base`), selected by name with :func:`get_scalarizer` (registry
:data:`SCALARIZERS`, :mod:`.registry`), and usable as an optax aggregator of a task Jacobian with
:func:`from_scalarizer` (:mod:`.transform`). The interface, a train step and the learnable
weights: ``docs/methods.md`` ("Loss-only methods").
"""

from .auto_lambda import (
    AutoLambdaState,
    auto_lambda,
    auto_lambda_grad,
    auto_lambda_init,
    auto_lambda_step,
    auto_lambda_update,
    auto_lambda_weights,
)
from .base import Scalarizer
from .cosmos import cosmos
from .dwa import DWAState, dwa
from .equal import mean, sum_
from .famo import FAMOState, famo
from .gls import gls
from .gradnorm import GradNormState, gradnorm, layer_grad_norms
from .imtl_l import imtl_l
from .learned import LearnedState
from .pbi import pbi
from .registry import SCALARIZERS, get_scalarizer
from .rlw import RLWState, rlw
from .stch import STCHState, stch
from .transform import (
    SCALARIZER_STATE_KEY,
    from_scalarizer,
    post_step_in_state,
    scalarizer_weigh,
)
from .uw import uw

__all__ = [
    "SCALARIZERS",
    "SCALARIZER_STATE_KEY",
    "AutoLambdaState",
    "DWAState",
    "FAMOState",
    "GradNormState",
    "LearnedState",
    "RLWState",
    "STCHState",
    "Scalarizer",
    "auto_lambda",
    "auto_lambda_grad",
    "auto_lambda_init",
    "auto_lambda_step",
    "auto_lambda_update",
    "auto_lambda_weights",
    "cosmos",
    "dwa",
    "famo",
    "from_scalarizer",
    "get_scalarizer",
    "gls",
    "gradnorm",
    "imtl_l",
    "layer_grad_norms",
    "mean",
    "pbi",
    "post_step_in_state",
    "rlw",
    "scalarizer_weigh",
    "stch",
    "sum_",
    "uw",
]
