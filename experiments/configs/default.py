"""The default experiment: the embedded two-digit benchmark, mean vs PCGrad, on three seeds.

    python -m experiments.run                                   # this config
    python -m experiments.run --config.methods='("mean", "pcgrad", "mgda", "cagrad")'

No download: the data are scikit-learn's bundled 8x8 handwritten digits composed into two-digit
images (``experiments.data``, ``multi_digits``); a small MLP trunk with two heads; about a
minute on a 2-core CPU.
"""

from experiments.config import base_config, section_arguments


@section_arguments
def get_config():
    config = base_config("multi_digits", "mlp")
    config.seeds = (0, 1, 2)
    config.methods = ("mean", "pcgrad")
    config.single_task = True
    config.train.epochs = 30
    config.train.batch_size = 128
    config.train.lr = 1e-3
    config.train.log_every_steps = 5
    config.train.checkpoint_every_epochs = 5
    return config
