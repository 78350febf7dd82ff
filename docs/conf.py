"""Sphinx configuration for the mtl_jax documentation site.

Build (warnings are errors, as in ``.ci/run``)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST); the API pages are generated from the Google-style docstrings by
autodoc + napoleon. Every ``python`` code block in the pages is executed by ``tests/test_docs.py``.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "mtl_jax"
author = "mtl_jax authors"
copyright = "mtl_jax authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "design"]  # design notes: plain Markdown in the repository

# Markdown: GitHub-style heading anchors so pages can link to sections; ``$...$`` maths.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# Google-style docstrings (``Args:`` / ``Returns:`` / ``Raises:``).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# ``Attributes:`` of NamedTuples become ``:ivar:`` fields, not a second description of the
# fields autodoc already lists.
napoleon_use_ivar = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": False}

# The docstrings cross-reference each other with :func:`mtl_jax.x`; an unresolved reference
# renders as text rather than failing the build (nitpicky stays off).
nitpicky = False

# Docstrings write magnitudes as |w| (top-|w|, largest-|w|); in reStructuredText that is a
# substitution reference, so define it as the literal text.
rst_prolog = r"""
.. |w| replace:: \|w\|
"""

html_theme = "alabaster"
html_title = "mtl_jax"


def _lengthen_short_underlines(app, what, name, obj, options, lines):
    """Extends a section underline shorter than its title (a docutils warning) to the title.

    Docstrings are written as plain text first; a title edited without its underline would
    otherwise fail the ``-W`` build for a cosmetic reason.
    """
    for i in range(1, len(lines)):
        line, title = lines[i].strip(), lines[i - 1].rstrip()
        if (
            len(line) >= 3
            and len(set(line)) == 1
            and line[0] in "=-~^\"'`#*+"
            and title.strip()
            and len(line) < len(title.strip())
        ):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            lines[i] = indent + line[0] * len(title.strip())


def setup(app):
    app.connect("autodoc-process-docstring", _lengthen_short_underlines)
