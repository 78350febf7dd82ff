"""Instance-wise objectives on the embedded digits: every (sample, task) pair of a batch is an
objective (``train.objectives = "instances"``): mean, exact UPGrad and UPGrad on TorchJD's
regularised Gram matrix (``upgrad:reg_eps=1e-4``), two seeds.

    python -m experiments.run --config experiments/configs/iwrm.py --workdir workdirs/iwrm
    # IWRM proper (one task, K = batch): the digit of the transformed-digits set
    python -m experiments.run --config experiments/configs/iwrm.py:dataset=digit_transforms \
        --config.dataset.tasks='("digit",)'

The default setup is instance-wise MTL (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024, Section 5, with T = 2 tasks): the two digits of the canvas, the MLP trunk
and its two heads, batch 32, so K = 32 x 2 = 64 objectives per step, weighed by the Gramian
engine (``mtl_jax.autogram``) on the [64, 64] Gram matrix of all parameters' per-pair
gradients, then one weighted backward pass. With one task this is IWRM proper (K = batch); the library
recipe (docs/recipes/iwrm.md) shows it on the left digit.

The batch is sized for UPGrad's QP on the CPU (K quadratic programs of size K per step):
tens of milliseconds per step at K = 64 on 2 cores, while K = 256 (batch 128) took 20 s per step
(docs/recipes/iwrm.md, "From the runner"). Training uses 4,096 of the digits for 10 epochs with
Adam (1e-3): Adam's step does not grow with the weights' sum, which for UPGrad is several times
mean's (SGD 0.05 with momentum 0.9, the library recipe's, diverged once in our runs).
"""

from experiments.config import base_config, section_arguments


@section_arguments
def get_config():
    config = base_config("multi_digits", "mlp")
    config.seeds = (0, 1)
    # exact UPGrad puts weights ~1/|g| on the samples it already fits (docs/recipes/iwrm.md)
    config.methods = ("mean", "upgrad", "upgrad:reg_eps=1e-4")
    config.single_task = False
    config.dataset.max_train_examples = 4096
    config.train.objectives = "instances"
    config.train.epochs = 10
    config.train.batch_size = 32
    config.train.optimizer = "adam"  # scale-free: UPGrad's weights sum to more than mean's
    config.train.lr = 1e-3
    config.train.log_every_steps = 16
    config.train.checkpoint_every_epochs = 1
    return config
