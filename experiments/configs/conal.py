"""CoNAL (Yue, Zhang & Liang, AAAI 2023) on the embedded conflict benchmark, small BN ResNet.

    python -m experiments.run --config experiments/configs/conal.py

Per seed: the CoNAL search over the five blocks of ``small_resnet`` (stem, block1..3, neck; six
branch points) on 80% of the training set with the architecture logits on the other 20%, nocl on
the shared blocks; the argmax branch point of every task (digit, rotation, thickness); then a
retraining from scratch on the whole training set of the learned tree, the all-shared encoder (the
standard run) and the all-private encoder, with joint training (``mean``), and one single-task
reference per task (the Δm reference). The report writes ``conal_summary.json`` (branch points,
final softmax, parameter counts, test metrics, Δm% against the single-task runs), the trees and
the alpha trajectories. About 9 minutes on 2 busy CPU cores (load 7-11) without the single-task
runs (measured; XLA cache cold); add PCGrad with
``--config.conal.methods='("mean", "pcgrad")'``.

The relatedness benchmark (``experiments/data/relatedness.py``: six synthetic tasks: a related
group of three, a related pair and a singleton, independent across groups) on its narrow MLP
(hidden sizes ``(64, 2)``, each hidden layer a block: ``fc0, fc1``), with CoNAL-Pro (task
groups) as for K >= 6 tasks (measured, 3 seeds: Δm% learned -1.00 ± 2.20, all-shared -2.04 ±
0.16, all-private -0.18 ± 0.26; the search sends nearly every task to a private path:
docs/claims.md; about 4 minutes on 2 busy cores):

    python -m experiments.run --config experiments/configs/conal.py:relatedness

GPU setups (data not downloadable here):

    # CelebA, 40 binary attributes, CoNAL-Pro (progressive search, task groups)
    python -m experiments.run --config experiments/configs/conal.py:celeb_a
    # NYUv2 (segmentation, depth, normals), SegNet cut into its encoder/decoder levels
    python -m experiments.run --config experiments/configs/conal.py:nyuv2
"""

from experiments.config import section_arguments
from experiments.studies import study_config


@section_arguments
def get_config(setup: str = "embedded"):
    if setup == "embedded":
        config = study_config("conal", "digit_transforms", "small_resnet")
        config.seeds = (0, 1, 2)
        config.model.widths = (4, 8, 16)
        config.model.strides = (2, 2, 2)
        config.model.feature_dim = 32
        config.conal.search_epochs = 4
        config.conal.task_map = "unroll"  # vmapped (grouped) convolutions are slow on XLA:CPU
        config.train.epochs = 5
        config.train.batch_size = 128
        config.train.lr = 1e-3
        config.train.task_map = "unroll"
        # precise BN per stream before the final evaluation: the stored statistics were up to
        # 1.4 points off the recomputed ones per task (docs/claims.md)
        config.eval.recompute_bn_batches = 50
        config.train.log_every_steps = 5
        config.train.checkpoint_every_epochs = 5
        config.single_task = True
    elif setup == "celeb_a":
        config = study_config("conal", "celeb_a", "small_resnet")
        config.seeds = (0, 1, 2)
        config.model.widths = (32, 64, 128)
        config.model.strides = (2, 2, 2)
        config.model.feature_dim = 128
        config.conal.pro = True  # 40 tasks: progressive search, task groups
        config.conal.task_map = "vmap"
        config.conal.search_epochs = 3
        config.conal.alpha_every = 50
        config.train.epochs = 15
        config.train.batch_size = 256
        config.train.lr = 1e-3
        config.train.log_every_steps = 50
    elif setup == "nyuv2":
        config = study_config("conal", "nyuv2", "segnet")
        config.seeds = (0, 1, 2)
        config.conal.task_map = "vmap"
        config.conal.search_epochs = 40
        config.conal.alpha_every = 20
        config.train.epochs = 200
        config.train.batch_size = 2
        config.train.lr = 1e-4
        config.train.log_every_steps = 50
        config.train.checkpoint_every_epochs = 5
    elif setup == "relatedness":
        config = study_config("conal", "relatedness", "mlp")
        # a related group of three, a related pair and a singleton (rho_out = 0 across groups):
        # three label functions for the trunk's two units, so sharing helps the groups and
        # hurts whichever group loses the units (the relatedness benchmark's "mixed" effect)
        config.dataset.groups = (0, 0, 0, 1, 1, 2)
        config.dataset.rho_in = 1.0
        config.dataset.rho_out = 0.0
        config.seeds = (0, 1, 2)
        config.model.hidden_sizes = (64, 2)  # the relatedness benchmark's narrow trunk
        config.model.head_hidden = 0
        config.conal.pro = True  # six tasks: progressive search, task groups
        config.conal.task_map = "vmap"  # dense blocks: vmapped copies are fast on CPU too
        config.conal.search_epochs = 20
        config.conal.alpha_every = 10
        config.train.epochs = 40
        config.train.batch_size = 100
        config.train.eval_batch_size = 5_000
        config.train.lr = 3e-3
        config.train.log_every_steps = 10
        config.train.checkpoint_every_epochs = 20
        config.single_task = True
    else:
        raise ValueError(f"Unknown setup {setup!r}; valid: embedded, celeb_a, nyuv2, relatedness.")
    return config
