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

# The quick tier, `python -m pytest -q -n 2 -m quick tests`: the specification of the library.
# Whole modules (every test in them not marked `slow`); chosen by `--durations=0` of `-m "not slow"`:
# these are ~40% of its test time, the rest is models, data, docs, studies and CLI subprocesses.
QUICK_MODULES = frozenset(
    {
        "test_methods_reference.py",  # every method against an independent NumPy reference
        "test_methods_properties.py",  # invariances and guarantees, per method
        "test_methods_catalogue.py",  # get_method builds every method
        "test_aggregators.py",  # aggregators: paper references, properties, degenerate input
        "test_scalarize.py",  # loss-only methods against their papers
        "test_weighting_qp.py",  # the dual-cone QP against SciPy's NNLS
        "test_optax_contract.py",  # init/update shapes, jit, chaining with optax
        "test_gradients.py",  # value_and_grads against per-task jax.grad
        "test_grads_tree.py",  # one gradient tree, O(K) task-specific leaves
        "test_grads_cut.py",  # the loss vector differentiated at its cut, no [K, K, ...]
        "test_autogram_at_cut.py",  # the Gramian engine below the cut vs jacrev rows
        "test_upgrad_reg_eps.py",  # UPGrad / DualProj on TorchJD's regularised G vs NNLS
        "test_cross_batch.py",  # SDMGrad and MoDo against their NumPy references
        "test_gramian.py",  # Gram matrices and groupings
        "test_conflict.py",  # conflict metrics against a NumPy recount
        "test_sharing.py",  # specs, masks, copies, shared_rows
        "test_mask_arrays.py",  # masks as arguments, not constants
        "test_memory_paths.py",  # no [K, P_total] copy on any path
        "test_mistakes_library.py",  # the library's one-line errors
        "test_errors.py",  # bad input: a clear error, never a silent wrong answer
    }
)
# ... and single tests of modules that are otherwise too slow for it (node ids under tests/).
QUICK_TESTS = frozenset(
    {
        "test_mistakes_cli.py::test_mistake[unknown config key]",  # one CLI error, exit 2
        "test_train.py::test_resume_after_interruption_is_bit_identical",  # tiny run, resumed
        # a weights-first method's state and update equal the Jacobian path's
        "test_weights_first.py::test_weigh_gives_the_weights_and_state_of_update[uw]",
        "test_weights_first.py::test_weigh_gives_the_weights_and_state_of_update[mgda_ub]",
    }
)


_missing = sorted(
    name
    for name in QUICK_MODULES | {test.split("::")[0] for test in QUICK_TESTS}
    if not os.path.isfile(os.path.join(os.path.dirname(__file__), name))
)
if _missing:
    raise RuntimeError(f"tests/conftest.py's quick tier names missing modules {_missing}; fix it")


def pytest_collection_modifyitems(config, items):
    """Marks the quick tier (``QUICK_MODULES``, ``QUICK_TESTS``) with ``quick``, never a test
    marked ``slow``. Runs before ``-m``/``-k`` deselect anything."""
    for item in items:
        module = item.path.name
        if item.get_closest_marker("slow") is not None:
            continue
        if module in QUICK_MODULES or f"{module}::{item.name}" in QUICK_TESTS:
            item.add_marker(pytest.mark.quick)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module. A pytest-xdist worker runs hundreds
    of tests in one process, and each XLA:CPU executable keeps its own memory mappings (about 10
    per program): over a whole worker's share of the suite they reached the kernel's limit of
    65,530 (`vm.max_map_count`), after which LLVM failed with "Cannot allocate memory" and the
    worker crashed. Within a module the caches still serve repeated programs.

    Still needed (issue 22, measured 2026-12-07, `-m quick`, 1,082 tests, 2 workers): with it a
    worker peaked at 23,772 maps; without it one reached 65,146 of 65,530 and segfaulted in
    `compilation_cache.get_executable_and_time` near the end of the tier (the full suite is larger)."""
    yield
    jax.clear_caches()
    gc.collect()
