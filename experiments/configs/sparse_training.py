"""Sparse training (Zhang et al. 2024, docs/design/METHODS.md section 4) on the embedded two-digit benchmark.

    python -m experiments.run --config experiments/configs/sparse_training.py

Joint training (mean), PCGrad, CAGrad (c = 0.4), MGDA and Nash-MTL, each dense and with ST: only a
fixed per-neuron top-K (PSN) subset of the encoder's weights is updated (~60% trainable, the
paper's rule of thumb for randomly initialised models; the heads train densely), all on the same
seeds; plus the joint method with the random, global top-magnitude and reverse (lowest-magnitude)
selections at the same trainable count. The report compares the conflict incidence p% over all
steps and over the last half of the epochs, the test accuracies, and checks that frozen weights
stayed bit-identical. About 3 minutes on a 2-core CPU.

What it shows on this benchmark (2026-11-24, 3 seeds): ST does *not* lower the conflict
incidence here, unlike the paper's larger models. p% over all steps, dense -> ST: mean 44.6 ->
47.2, PCGrad 44.9 -> 47.7, CAGrad 44.2 -> 48.2, MGDA 44.3 -> 48.7, Nash-MTL 46.1 -> 50.0 (last
half: 40.9 -> 44.0 for mean, 42.0 -> 44.7 for PCGrad); the mean pairwise cosine falls (0.0050 ->
0.0015 for mean) and test accuracy drops ~3 points; PSN is at least as good as the random (47.2),
global (49.7) and reverse (47.0) selections, not better. The same holds at 30% trainable, batch
512, with the incidence measured on the full instead of the masked Jacobian
(``sparse.measure_on``), and when every run starts from a jointly pre-trained model
(``sparse.pretrain_epochs``). Frozen weights stay bit-identical in every ST run.

Other data sets, when present (GPU configs):

    --config experiments/configs/sparse_training.py:dataset=multi_fashion_mnist,model=lenet  # TFDS
    --config experiments/configs/sparse_training.py:dataset=celeb_a,model=small_cnn \
        --config.dataset.num_tasks=10
    --config experiments/configs/sparse_training.py:dataset=nyuv2,model=segnet \
        --config.dataset.root=data/nyuv2
"""

from experiments.config import section_arguments
from experiments.studies import study_config


@section_arguments
def get_config():
    config = study_config("sparse_training", "multi_digits", "mlp")
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
