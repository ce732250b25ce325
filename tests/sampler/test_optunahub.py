"""The OptunaHub package that ``python -m optuna_ctpe.optunahub`` writes."""

from __future__ import annotations

from pathlib import Path
import runpy
import subprocess
import sys

import optuna
import pytest
import yaml

from optuna_ctpe import ClusterTPESampler
from optuna_ctpe import optunahub as hub


optunahub = pytest.importorskip("optunahub")
REPO_LICENSE = Path(__file__).resolve().parents[2] / "LICENSE"


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    hub.write_package(tmp_path)
    return tmp_path


def front_matter(readme: Path) -> dict:
    _, header, _ = readme.read_text().split("---\n", 2)
    return yaml.safe_load(header)


def test_the_command_writes_the_registry_layout(tmp_path: Path):
    subprocess.run([sys.executable, "-m", "optuna_ctpe.optunahub", str(tmp_path)], check=True)
    folder = tmp_path / "samplers" / "cluster_tpe"
    assert sorted(p.name for p in folder.iterdir()) == [
        "LICENSE",
        "README.md",
        "__init__.py",
        "example.py",
        "requirements.txt",
    ]
    assert (folder / "LICENSE").read_text() == REPO_LICENSE.read_text()
    assert (folder / "requirements.txt").read_text().startswith("optuna-ctpe>=")


def test_readme_front_matter_passes_the_registry_header_check(registry: Path):
    # The checks of optunahub-registry's header_confirm.py, plus its tag rule for samplers.
    post = front_matter(registry / hub.PACKAGE / "README.md")
    for key in ("author", "title", "description", "license"):
        assert isinstance(post[key], str), key
    assert post["license"] == "MIT License"
    for key in ("tags", "optuna_versions"):
        assert isinstance(post[key], list) and all(isinstance(v, str) for v in post[key]), key
    assert "sampler" in post["tags"]
    assert post["optuna_versions"] == list(hub.OPTUNA_VERSIONS)
    text = (registry / hub.PACKAGE / "README.md").read_text()
    for section in ("Abstract", "Class or Function Names", "Installation", "Example", "Others"):
        assert f"\n## {section}\n" in text


def test_optunahub_loads_the_package_and_runs_a_study(registry: Path):
    module = optunahub.load_local_module(package=hub.PACKAGE, registry_root=str(registry))
    assert module.ClusterTPESampler is ClusterTPESampler
    study = optuna.create_study(sampler=module.ClusterTPESampler(seed=0, n_startup_trials=3))
    study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.5) ** 2, n_trials=10)
    assert len(study.trials) == 10


def test_the_example_runs_against_the_written_package(registry: Path, monkeypatch, capsys):
    def load_from_registry(package: str, **_: object):
        return optunahub.load_local_module(package=package, registry_root=str(registry))

    monkeypatch.setattr(optunahub, "load_module", load_from_registry)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runpy.run_path(str(registry / hub.PACKAGE / "example.py"))
    assert "bits" in capsys.readouterr().out
