"""Recon (Shi et al., ICLR 2023) on the embedded conflict benchmark, with the small BN ResNet.

    python -m experiments.run --config experiments/configs/recon.py

Per seed: a joint-training search run over the first quarter of the epochs with a per-module
conflict tracker (S-conflict scores with S = conflict.severity), the top ``recon.k`` layers
branched into per-task copies (parameters and BatchNorm statistics), and a retraining from
scratch of joint training and PCGrad, each all-shared and with Recon, plus the RSL / RSP random
controls with joint training; single-task references for Δm. The report writes
``recon_summary.json`` (the share of cos < S and cos < -0.01 on the remaining shared
parameters, the reduction against the same method without Recon, parameter counts, test
metrics, Δm%), the layer ranking and the histograms. Add CAGrad, MGDA and GradDrop with
``--config.recon.methods='("mean", "pcgrad", "cagrad:c=0.4", "mgda", "graddrop")'`` (the
paper's five).

Paper setups for GPU users (data through TFDS, not downloadable here):

    # Multi-Fashion+MNIST, ResNet-18, S = -0.1, K = 25 (Recon's App. B)
    python -m experiments.run --config experiments/configs/recon.py:multi_fashion_mnist
    # CelebA, 40 tasks, ResNet-18, S = -0.05, K = 25
    python -m experiments.run --config experiments/configs/recon.py:celeb_a
"""

from experiments.config import section_arguments
from experiments.studies import study_config


@section_arguments
def get_config(setup: str = "embedded"):
    if setup == "embedded":
        config = study_config("recon", "digit_transforms", "small_resnet")
        config.seeds = (0, 1, 2)
        config.model.widths = (4, 8, 16)
        config.model.strides = (2, 2, 2)
        config.model.feature_dim = 32
        config.conflict.severity = -0.02
        config.recon.k = 6
        config.train.epochs = 6
        config.train.batch_size = 128
        config.train.lr = 1e-3
    elif setup == "multi_fashion_mnist":
        config = study_config("recon", "multi_fashion_mnist", "resnet18")
        config.seeds = (0, 1, 2)
        config.conflict.severity = -0.1
        config.recon.k = 25
        config.recon.search_epochs = 40  # the official code's search run
        config.recon.methods = ("mean", "pcgrad", "cagrad:c=0.2", "mgda", "graddrop")
        config.train.epochs = 120
        config.train.batch_size = 256
        config.train.optimizer = "sgd"
        config.train.momentum = 0.9
        config.train.lr = 0.1
        config.train.lr_schedule = "step"
        config.train.lr_boundaries = (60, 90)
        config.train.lr_decay = 0.1
    elif setup == "celeb_a":
        config = study_config("recon", "celeb_a", "resnet18")
        config.seeds = (0, 1, 2)
        config.conflict.severity = -0.05
        config.recon.k = 25
        config.recon.search_epochs = 2
        config.recon.methods = ("mean", "pcgrad", "cagrad:c=0.4", "graddrop")
        config.train.epochs = 30
        config.train.batch_size = 256
    else:
        raise ValueError(f"Unknown setup {setup!r}; valid: embedded, multi_fashion_mnist, celeb_a.")
    config.single_task = True
    config.eval.recompute_bn_batches = 50  # precise BN per task stream before the final eval
    config.conflict.granularity = "module"
    config.train.log_every_steps = 5
    config.train.checkpoint_every_epochs = 2
    return config
