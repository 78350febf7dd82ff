"""The mtl_jax experiment suite: data, models, the train loop, metrics and reports.

Run ``python -m experiments.run --config experiments/configs/<name>.py [--config.key=value ...]``.
"""

import importlib.util as _importlib_util

_MISSING = [
    name
    for name in ("ml_collections", "absl", "orbax.checkpoint", "grain", "tensorflow_datasets")
    if _importlib_util.find_spec(name.split(".")[0]) is None
]
if _MISSING:
    raise ImportError(
        f"The experiment suite needs {_MISSING}, which are not installed: install the "
        "'experiments' extra (`pip install -e '.[experiments]'`) or `pip install -r "
        "requirements.txt`. The library alone (`import mtl_jax`) needs neither."
    )
