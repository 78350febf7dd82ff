"""Systematic task conflict on the embedded ``digit_transforms`` benchmark, with a small
residual BatchNorm CNN (``small_resnet``): joint training, PCGrad, CAGrad and MGDA plus
single-task references, on three seeds.

    python -m experiments.run --config experiments/configs/conflict.py

No download: one scikit-learn 8x8 digit per image, zoomed to 12 px, eroded / left / dilated,
rotated by a multiple of 90 degrees, on a 16x16 canvas; three tasks -- what the digit is
(10 classes), its rotation (4) and its stroke thickness (3) -- that compete for the shared
features (``experiments.data.digit_transforms``). The model, at widths 4/8/16 with every block
at stride 2, has 21 encoder modules (10 convs, 10 BatchNorm layers, 1 fc) in five named blocks; conflicts are tracked on the whole encoder and
per module (Recon's S-conflict score with S = -0.02).

BatchNorm statistics are recomputed on 50 training batches before the final evaluation
(``eval.recompute_bn_batches``): the stored running averages moved a task's test accuracy by
up to 1.3 points (median 0.3, mean +0.2 for recomputed) on the 21 runs of 3 seeds
(``experiments.bn_check``).

What it shows (BUILD.md, "Conflict benchmark"): under joint training every task pair's mean
gradient cosine over training is clearly negative on every seed, and single-task training beats
joint training on the digit task by a wide margin (negative transfer).
"""

from experiments.config import base_config, section_arguments


@section_arguments
def get_config():
    config = base_config("digit_transforms", "small_resnet")
    config.seeds = (0, 1, 2)
    config.methods = ("mean", "pcgrad", "cagrad:c=0.4", "mgda")
    config.single_task = True
    config.model.widths = (4, 8, 16)
    config.model.strides = (2, 2, 2)
    config.model.feature_dim = 32
    config.conflict.granularity = "module"
    config.conflict.severity = -0.02
    config.train.epochs = 5
    config.train.batch_size = 128
    config.train.lr = 1e-3
    config.train.log_every_steps = 5
    config.train.checkpoint_every_epochs = 5
    config.eval.recompute_bn_batches = 50
    return config
