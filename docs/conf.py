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

import ast
import os
from pathlib import Path
import shutil
import sys

from docutils.nodes import Element
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util.nodes import make_refnode


# The package is imported from the checkout, so the reference documents the code beside it even
# when another copy is installed.
_DOCS = Path(__file__).resolve().parent
sys.path.insert(0, os.fspath(_DOCS.parent))

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
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

# -- MyST and the notebook ---------------------------------------------------------------------
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
# reference fails the build. Names of other libraries are not checked (no intersphinx offline):
# dotted ones here, short ones (``Study`` from an annotation) by _short_reference below.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(?!optuna_ctpe\b)\w+\..*"),
    # Private rooms (``optuna_ctpe.sampler._sampler``, ``optuna_ctpe._attrs``) are named in
    # docstrings for contributors but are not part of the reference.
    (r"py:.*", r"optuna_ctpe(\.\w+)*\._\w+.*"),
]


def _defined_names() -> frozenset[str]:
    """Every name the package's public modules define: functions, classes, constants, fields.

    Private modules (``nn/_output_hessian.py``) are left out: what they define is not in the
    reference, so a short name of theirs stays unlinked, as a private dotted name does.
    """
    names: set[str] = set()
    package = _DOCS.parent / "optuna_ctpe"
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if any(part.startswith("_") and part != "__init__" for part in parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(names)


def _short_reference(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: Element
) -> Element | None:
    """Resolve a short name (``:func:`export_onnx```) that Sphinx looked up in the wrong module.

    Docstrings name objects of other modules without their module; Sphinx only looks in the
    current one. A short name that exactly one documented object of the package has links
    there; a name no public module of the package defines (``Study``, ``Module`` from
    annotations; ``MAX_OUTPUTS`` of a private module) stays unlinked; anything else, a name
    the package defines but the reference does not show, stays a warning.
    """
    target = node.get("reftarget", "")
    # Not a name, such as a sentence napoleon took for a type: an attribute docstring whose
    # first line reads "Its size: ..." declares the type "Its size". Let it fail.
    if node.get("refdomain") != "py" or not target.isidentifier():
        return None
    domain = env.get_domain("py")
    objtypes = domain.objtypes_for_role(node.get("reftype", "obj")) or ()
    matches = [
        (name, entry)
        for name, entry in domain.objects.items()
        if name.startswith("optuna_ctpe.")
        and name.rsplit(".", 1)[-1] == target
        and (node.get("reftype") == "obj" or entry.objtype in objtypes)
    ]
    if len(matches) == 1:
        name, entry = matches[0]
        return make_refnode(
            app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name
        )
    if target not in _DEFINED_NAMES:
        return contnode
    return None


_DEFINED_NAMES = _defined_names()

# -- Pages copied in from the repository ---------------------------------------------------------
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


def setup(app: Sphinx) -> None:
    app.connect("missing-reference", _short_reference)
