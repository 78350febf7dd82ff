"""PCGrad x Modulation x LaSS on plant_leaves (Alison et al. 2024, docs/design/METHODS.md section 3).

    python -m experiments.run --config experiments/configs/leaf_combinations.py

Two tasks from TFDS ``plant_leaves`` (4,502 leaf photos): species (12 classes, the P-code) and
health (healthy / diseased), on a fixed stratified 70/15/15 split; a small BatchNorm CNN
(``small_cnn``) at 64 px. All 8 on/off subsets of {PCGrad, Modulation (per-task channel scales
after conv blocks 1-3), LaSS (train 20 epochs, fine-tune a copy per task for 5, prune 30% of
every weight tensor per task, continue 10 epochs with theta * M_t)} on three seeds; the report has
per-task macro F1, their mean, and a bar chart, with the paper's numbers (PCGrad + LaSS 0.847,
PCGrad 0.828, LaSS 0.823, Modulation 0.820).

Needs the data: ``tfds build plant_leaves --file_format=array_record`` (6.6 GiB download; the
loader downloads it itself with ``download=True``). A GPU run; on a 2-core CPU it takes hours.
"""

from experiments.studies import study_config


def get_config():
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
    config.train.jacobian_strategy = "vmap"
    return config
