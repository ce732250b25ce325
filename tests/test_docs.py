"""The README's links and the API reference's coverage, which the documentation build cannot see.

``.ci/run`` builds ``docs/`` with warnings as errors, so a broken link *inside* the site fails
CI. The README is not part of the site: GitHub renders it, and a link to a moved page fails
silently there. And the reference lists its modules by hand, so a new public module would be
left out without a warning. Both are checked here, without Sphinx.
"""

from __future__ import annotations

from pathlib import Path
import re


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "optuna_ctpe"

# A markdown link or image: [text](target) / ![alt](target), the target up to a space or ")".
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
_DIRECTIVE = re.compile(r"^\s*\.\. auto(?:module|class|function|data|exception)::\s+(\S+)", re.M)

# Public modules that the reference shows under another name: the face's class is documented as
# ``optuna_ctpe.HessianSearchSpace``, the name users import.
_DOCUMENTED_AS = {"optuna_ctpe.search_space": "optuna_ctpe.HessianSearchSpace"}
# The command's own modules (its options, study and report rooms) are described by the command
# line's guide page, not the reference; ``optuna_ctpe.cli.load_exported`` is in the reference.
_NOT_REFERENCE = ("optuna_ctpe.cli.",)


def readme_links(text: str) -> list[str]:
    """The relative link and image targets of a markdown text, without anchors."""
    targets = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def public_modules() -> list[str]:
    """Dotted names of the package's modules with no private part (``_x``) in their path."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__"):
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        names.append(".".join(parts))
    return names


def reference_targets() -> set[str]:
    """What the reference pages document: every ``.. auto*::`` directive's target."""
    pages = (ROOT / "docs" / "reference").glob("*.rst")
    return {name for page in pages for name in _DIRECTIVE.findall(page.read_text())}


def test_readme_links_exist() -> None:
    targets = readme_links((ROOT / "README.md").read_text())
    # The README's front page links the site's sections; an empty list means the parser broke.
    assert len(targets) >= 10
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_links_parser() -> None:
    text = (
        "[a](docs/a.md) ![b](x/b.png) [c](https://e.org/c) [d](#d) [e](docs/e.md#sec) "
        '[f](f.md "title") [g](mailto:g@e.org)'
    )
    assert readme_links(text) == ["docs/a.md", "x/b.png", "docs/e.md", "f.md"]


def test_readme_stays_short() -> None:
    # The README is the front page; the guide, reference and benchmarks are the site's.
    assert len((ROOT / "README.md").read_text().splitlines()) < 250


def test_every_public_module_is_in_the_reference() -> None:
    targets = reference_targets()
    assert "optuna_ctpe.ClusterTPESampler" in targets

    def documented(module: str) -> bool:
        name = _DOCUMENTED_AS.get(module, module)
        return any(t == name or t.startswith(name + ".") for t in targets)

    modules = [m for m in public_modules() if not m.startswith(_NOT_REFERENCE)]
    assert "optuna_ctpe.nn.sensitivity" in modules  # the walk found the wings
    missing = [module for module in modules if not documented(module)]
    assert not missing, f"public modules missing from docs/reference/*.rst: {missing}"
