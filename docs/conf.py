"""Sphinx configuration of the optuna-ctpe documentation site.

Build it from the repository root (``.ci/run`` does, with warnings as errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The build needs no network: there is no intersphinx, and the notebook is rendered with the
outputs stored in it, never executed.

The benchmark reports (``benchmarks/results/*.md`` and their figures) and the notebook
(``notebooks/quickstart.ipynb``) live outside ``docs/``; each build copies them into
``docs/benchmarks/results/`` and ``docs/notebooks/`` (both ignored by git), so that they are
pages of the site whose relative links and images resolve. Symbolic links would not do:
Sphinx resolves a link's target through them, to a file outside the source directory.
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import sys


# The package is imported from the checkout, so the reference documents the code beside it even
# when another copy is installed.
sys.path.insert(0, os.path.abspath(".."))

import optuna_ctpe  # noqa: E402


project = "optuna-ctpe"
author = "optuna-ctpe developers"
copyright = "optuna-ctpe developers, MIT licence"
version = release = optuna_ctpe.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "**/*.json"]

# -- MyST and the notebook ---------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath"]
# Heading anchors, so that pages link to a section (``page.md#section``) as on GitHub.
myst_heading_anchors = 3
# The notebook is shown with the outputs it was committed with: the test suite executes it, the
# documentation build never does (no kernel, no training, no network).
nb_execution_mode = "off"

# -- The API reference -------------------------------------------------------------------------
autodoc_default_options = {"members": True, "member-order": "bysource"}
# Type hints go into the description, beside each argument, as Optuna's reference shows them.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_class_signature = "separated"
# The docstrings are Google style ("Args:", "Returns:", "Raises:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# Every cross-reference to this package must resolve: a renamed function or a stale docstring
# reference fails the build. Names of other libraries are not checked (no intersphinx offline).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!optuna_ctpe\b).*"),
    # Private rooms (``optuna_ctpe.sampler._sampler``, ``optuna_ctpe._attrs``) are named in
    # docstrings for contributors but are not part of the reference.
    (r"py:.*", r"optuna_ctpe(\.\w+)*\._\w+.*"),
]

# -- Pages copied in from the repository ---------------------------------------------------------
_DOCS = Path(__file__).resolve().parent
_MIRRORS = {
    # source folder -> (folder under docs/, the files to copy)
    _DOCS.parent / "benchmarks" / "results": ("benchmarks/results", ("*.md", "*.png")),
    _DOCS.parent / "notebooks": ("notebooks", ("*.ipynb",)),
}


def _copy_pages() -> None:
    # Copied afresh each build, so a report deleted or renamed upstream leaves no stale page.
    for source, (target, patterns) in _MIRRORS.items():
        destination = _DOCS / target
        shutil.rmtree(destination, ignore_errors=True)
        destination.mkdir(parents=True)
        for pattern in patterns:
            for path in sorted(source.glob(pattern)):
                shutil.copy2(path, destination / path.name)


_copy_pages()

# -- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"optuna-ctpe {release}"
html_static_path: list[str] = []
