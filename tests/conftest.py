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


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module. A pytest-xdist worker runs hundreds
    of tests in one process, and each XLA:CPU executable keeps its own memory mappings (about 10
    per program): over a whole worker's share of the suite they reached the kernel's limit of
    65,530 (`vm.max_map_count`), after which LLVM failed with "Cannot allocate memory" and the
    worker crashed. Within a module the caches still serve repeated programs."""
    yield
    jax.clear_caches()
    gc.collect()
