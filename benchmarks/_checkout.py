"""Puts the checkout's root on ``sys.path`` for the benchmark scripts that use the experiment suite.

``experiments/`` is not installed (the wheel and the editable install hold ``mtl_jax`` only, issue
22): it runs from the checkout. ``python benchmarks/<name>.py`` puts only ``benchmarks/`` on
``sys.path``, so a script that imports ``experiments`` imports this module first.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)  # after the script's own folder, before site-packages
