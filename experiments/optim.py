"""Optimizers and learning-rate schedules from the ``train`` section of an experiment config."""

from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step", "cosine")


def learning_rate(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """The schedule: ``constant``; ``step`` (x ``lr_decay`` at each epoch of ``lr_boundaries``,
    as Recon's x0.1 at epochs 60 and 90); ``cosine`` (to 0 over the whole run)."""
    base = float(config.lr)
    if config.lr_schedule == "constant":
        return optax.constant_schedule(base)
    if config.lr_schedule == "step":
        boundaries = {
            int(e) * steps_per_epoch: float(config.lr_decay) for e in config.lr_boundaries
        }
        return optax.piecewise_constant_schedule(base, boundaries)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(base, max(1, int(config.epochs) * steps_per_epoch))
    raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; valid: {SCHEDULES}.")


def optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optimizer of ``config`` (the ``train`` section), with optional global-norm clipping."""
    lr = learning_rate(config, steps_per_epoch)
    name = config.optimizer
    if name == "adam":
        opt = optax.adam(lr)
    elif name == "adamw":
        opt = optax.adamw(lr, weight_decay=float(config.weight_decay))
    elif name == "sgd":
        opt = optax.sgd(lr, momentum=float(config.momentum) or None, nesterov=False)
    else:
        raise ValueError(f"Unknown optimizer {name!r}; valid: {OPTIMIZERS}.")
    if name != "adamw" and float(config.weight_decay) > 0:
        opt = optax.chain(optax.add_decayed_weights(float(config.weight_decay)), opt)
    if float(config.grad_clip) > 0:
        opt = optax.chain(optax.clip_by_global_norm(float(config.grad_clip)), opt)
    return opt
