"""Test problems for multi-task methods (not used by training).

* :mod:`mtl_jax.testing.toy`: the two-objective toy of CAGrad / Nash-MTL / FAMO (closed-form
  losses over ``x in R^2``, the papers' starting points and the Pareto front), on which any
  aggregator's trajectory can be drawn and checked.
"""

from mtl_jax.testing import toy

__all__ = ["toy"]
