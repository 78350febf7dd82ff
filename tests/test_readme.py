"""The README's example runs as written and trains."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_optax_example_runs_and_lowers_every_loss():
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks, "the README has no python example"
    code = blocks[0].replace("print(", "_print(")
    namespace = {"_print": lambda *a: None}
    exec(compile(code, "README.md", "exec"), namespace)
    first = np.asarray(
        namespace["task_losses"](namespace["params"], namespace["x"], namespace["y"])
    )
    assert first.shape == (3,)
    # trained for 100 steps: every task's loss is below its value at initialisation
    jax = namespace["jax"]
    init = {
        "shared": jax.random.normal(jax.random.split(jax.random.PRNGKey(0), 4)[0], (8, 16)),
        "heads": jax.random.normal(jax.random.split(jax.random.PRNGKey(0), 4)[1], (3, 16, 1)),
    }
    before = np.asarray(namespace["task_losses"](init, namespace["x"], namespace["y"]))
    assert np.all(first < before)
    assert namespace["mtl"].aggregation.weights(namespace["opt_state"]).shape == (3,)
    assert namespace["method"].cost == "jacobian"
    # one gradient tree: rows for the shared leaf, the heads' own gradient (no task axis added)
    _, grads = namespace["grad_fn"](namespace["params"], namespace["x"], namespace["y"])
    assert grads["shared"].shape == (3, 8, 16)
    assert grads["heads"].shape == namespace["params"]["heads"].shape == (3, 16, 1)
