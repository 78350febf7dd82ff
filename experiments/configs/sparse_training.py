"""Sparse training (Zhang et al. 2024, METHODS.md section 4) on the embedded two-digit benchmark.

    python -m experiments.run --config experiments/configs/sparse_training.py

Joint training (mean), PCGrad, CAGrad (c = 0.4), MGDA and Nash-MTL, each dense and with ST: only a
fixed per-neuron top-K (PSN) subset of the encoder's weights is updated (~60% trainable, the
paper's rule of thumb for randomly initialised models; the heads train densely), all on the same
seeds; plus the joint method with the random, global top-magnitude and reverse (lowest-magnitude)
selections at the same trainable count. The report compares the conflict incidence p% over all
steps and over the last half of the epochs, the test accuracies, and checks that frozen weights
stayed bit-identical. A few minutes on a 2-core CPU.

Other data sets, when present (GPU configs):

    --config.dataset.name=multi_fashion_mnist --config.model.name=lenet        # TFDS
    --config.dataset.name=celeb_a --config.dataset.num_tasks=10 --config.model.name=small_cnn
    --config.dataset.name=nyuv2 --config.dataset.root=data/nyuv2 --config.model.name=segnet
"""

from experiments.config import base_config


def get_config():
    config = base_config("multi_digits", "mlp")
    config.study = "sparse_training"
    config.seeds = (0, 1, 2)
    config.sparse.methods = ("mean", "pcgrad", "cagrad:c=0.4", "mgda", "nash_mtl")
    config.sparse.fraction = 0.6
    config.sparse.controls = ("random", "global", "reverse")
    config.train.epochs = 20
    config.train.batch_size = 128
    config.train.lr = 1e-3
    config.train.log_every_steps = 5
    config.train.checkpoint_every_epochs = 5
    return config
