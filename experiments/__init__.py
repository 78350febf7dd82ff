"""The mtl_jax experiment suite: data, models, the train loop, metrics and reports.

Run ``python -m experiments.run --config experiments/configs/<name>.py [--config.key=value ...]``.
"""
