"""The relatedness benchmark: joint training vs single-task where sharing helps and where it hurts.

    python -m experiments.run --config experiments/configs/relatedness.py           # "mixed"
    python -m experiments.run --config experiments/configs/relatedness.py:related
    python -m experiments.run --config experiments/configs/relatedness.py:independent
    python -m experiments.run --config experiments/configs/relatedness.py:opposed

The data are MMoE's synthetic tasks (``experiments.data.relatedness``; Ma et al., KDD 2018,
section 4.1) in groups: tasks of a group have task vectors at cosine ``rho_in``, groups are at
cosine ``rho_out``. The argument after ``:`` picks the groups and cosines (:data:`SETTINGS`);
``--config.dataset.rho_in=0.5`` etc. override them. Every setting trains ``mean`` (joint
training) and ``pcgrad`` on three seeds, plus one single-task model per task (the references of
Δm), with the same MLP whose shared trunk ends in a bottleneck of :data:`TRUNK_WIDTH` = 2 units
(hidden sizes ``(64, 2)``, linear heads). That bottleneck is part of the construction: a group's
label is one scalar function of its own projection, so the trunk has room for two distinct label
functions. Sharing helps a related group (its tasks are noisy views of one label, which the
shared trunk averages, while a single-task model fits its label noise); it hurts once more
distinct label functions than trunk units share the trunk, and under the mean loss the largest
group takes a unit first ("mixed": two singletons compete for the second unit). Opposed groups
(``rho_out = -1``) need only one projection between them, so at this width they behave like
related ones (see ``experiments.data.relatedness``). About 1.5 minutes per setting on 2 CPU
cores (more on a loaded machine).

Measured (2026-12-07, 3 seeds, ``mean``; joint - single-task accuracy in points, per seed then
mean ± std, averaged over the tasks named): mixed: group t0-t2 +1.4 ± 1.0, singletons t3-t4
-8.7 ± 1.4; related: +2.0 ± 0.4; independent: -8.2 ± 0.5; opposed: +1.3 ± 0.3 (no loss).
p% is 64-72% in every setting, the related one included.
"""

from experiments.config import base_config, section_arguments

#: the width of the trunk's last layer: the capacity the groups compete for
TRUNK_WIDTH = 2

#: setting -> (groups, rho_in, rho_out).
SETTINGS = {
    # a related group of three and two tasks independent of it and of each other: three label
    # functions for two trunk units, so the group gains and the singletons lose in one run
    "mixed": ((0, 0, 0, 1, 2), 1.0, 0.0),
    # all four tasks noisy views of one label
    "related": ((0, 0, 0, 0), 1.0, 0.0),
    # four independent tasks (orthogonal task vectors)
    "independent": ((0, 1, 2, 3), 1.0, 0.0),
    # two related pairs whose task vectors are opposed (cosine -1 across the pairs)
    "opposed": ((0, 0, 1, 1), 1.0, -1.0),
}


@section_arguments
def get_config(setting: str = "mixed"):
    if setting not in SETTINGS:
        raise ValueError(
            f"Unknown relatedness setting {setting!r}; valid: {sorted(SETTINGS)} "
            "(experiments/configs/relatedness.py:<setting>)."
        )
    groups, rho_in, rho_out = SETTINGS[setting]
    config = base_config("relatedness", "mlp")
    config.dataset.groups = groups
    config.dataset.rho_in = rho_in
    config.dataset.rho_out = rho_out
    config.model.hidden_sizes = (64, TRUNK_WIDTH)
    config.model.head_hidden = 0
    config.seeds = (0, 1, 2)
    config.methods = ("mean", "pcgrad")
    config.single_task = True
    config.train.epochs = 40
    config.train.batch_size = 100
    config.train.eval_batch_size = 5_000
    config.train.lr = 3e-3
    config.train.log_every_steps = 10
    config.train.checkpoint_every_epochs = 20
    return config
