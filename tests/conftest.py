import os

# Tests run on the CPU; a few tests start subprocesses with several virtual devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile

import jax

# Compiled programs are cached on disk for the session: the experiment tests train many runs
# whose step programs are identical (the same method and model on other seeds or stages).
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "MTL_JAX_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "mtl_jax_test_xla_cache")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
