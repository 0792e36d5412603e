"""Sphinx configuration for trio_ktls's documentation (``nox -s docs``).

The build is offline and strict: ``-W`` turns every warning into an error and
``nitpicky`` makes every unresolved cross-reference one. Intersphinx is not used (its
inventories cannot be fetched where this builds); ``_ext/ktls_docs.py`` links the standard
library's and trio's names instead, and generates the compatibility and benchmark tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import trio_ktls  # noqa: E402

project = "trio_ktls"
author = "the trio_ktls authors"
copyright = "the trio_ktls authors; MIT or Apache-2.0"
release = trio_ktls.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "myst_parser",
    "ktls_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# docs/bench/bench.md is spliced into benchmarks.md, not a page of its own.
exclude_patterns = ["_build", "bench/*.md", "Thumbs.db", ".DS_Store"]

# `name` in docstrings is a cross-reference (trio's convention), checked by nitpicky.
default_role = "py:obj"
nitpicky = True
nitpick_ignore = [
    # typing constructs autodoc writes into signatures; they have no page of their own.
    ("py:class", "Ellipsis"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": True}
# Private modules' names in signatures are shown by their public name.
python_use_unqualified_type_names = True

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"trio_ktls {release}"
