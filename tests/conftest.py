import os

# Tests run on the CPU; a few tests start subprocesses with several virtual devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
