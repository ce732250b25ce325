"""``optuna-ctpe search`` over weight formats, and the uniform baseline it enqueues."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from optuna_ctpe.cli import load_exported  # noqa: E402
from optuna_ctpe.cli import main  # noqa: E402
from optuna_ctpe.cli.options import DEFAULT_FORMATS  # noqa: E402
from optuna_ctpe.cli.options import DEFAULTS  # noqa: E402
from optuna_ctpe.cli.settings import Settings  # noqa: E402
from optuna_ctpe.search_space import HessianSearchSpace  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A weight cache shared by the module's processes: the CNN is trained once, here."""
    from optuna_ctpe.tasks.digits import digits_task

    folder = tmp_path_factory.mktemp("cache")
    digits_task(seed=0, cache_dir=folder)
    return {**os.environ, "OPTUNA_CTPE_CACHE_DIR": str(folder), "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optuna_ctpe.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("ratio", [10, 7])
def test_uniform_baseline_is_enqueued_and_kept(
    ratio: int, tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "u.db"
    args = [
        "search", "--storage", f"sqlite:///{db}", "--study-name", "u", "--objective", "budget",
        "--size-budget", str(ratio), "--n-trials", "3", "--sampler", "tpe", "--widths", "1.0",
        "--no-progress",
    ]  # fmt: skip
    result = _run(args, tmp_path, env)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="u", storage=f"sqlite:///{db}")
    space = HessianSearchSpace.load_from_study(study)
    budget_bits = study.user_attrs["ctpe:settings"]["size_budget"] * space.fp32_bits
    fits = space.uniform_formats(size_bits=int(budget_bits))
    assert fits, "the digits grid has a uniform bit-width within this budget"
    baseline = [t for t in study.trials if "ctpe:uniform_baseline" in t.user_attrs]
    assert len(baseline) == 1
    trial = baseline[0]
    choice = trial.user_attrs["ctpe:uniform_baseline"]
    assert trial.number == 0 and trial.state == TrialState.COMPLETE
    assert choice in fits
    # Every searched layer takes the choice, and the pruned space still holds it there.
    assert trial.params and set(trial.params.values()) == {choice}
    for name, distribution in space.distributions.items():
        assert name not in trial.params or choice in distribution.choices
    config = space.config_from_params(trial.params)
    assert space.size(config) <= budget_bits
    assert trial.user_attrs["size_bytes"] * 8 == pytest.approx(space.size(config), rel=1e-6)
    assert "(uniform " in result.stdout


# -- --formats -----------------------------------------------------------------------------------

FORMATS = "int8-pc-sym-rtn,int4-pc-sym-rtn,int3-g32-asym-gptq,int2-g32-asym-gptq"


@pytest.fixture(scope="module")
def format_study(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One ``optuna-ctpe search --formats`` under a size budget, widths not searched."""
    cwd = tmp_path_factory.mktemp("formats")
    args = [
        "search", "--storage", f"sqlite:///{cwd / 'f.db'}", "--study-name", "f",
        "--formats", FORMATS, "--objective", "budget", "--size-budget", "7", "--n-trials", "4",
        "--sampler", "tpe", "--widths", "1.0", "--no-progress",
    ]  # fmt: skip
    return cwd, _run(args, cwd, env)


def test_format_search_stores_formats_and_reports_them(
    format_study: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    cwd, result = format_study
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="f", storage=f"sqlite:///{cwd / 'f.db'}")
    assert study.user_attrs["ctpe:settings"]["formats"] == sorted(FORMATS.split(","))
    space = HessianSearchSpace.load_from_study(study)
    assert set(space.formats) == set(FORMATS.split(","))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    for trial in complete:
        assert trial.params and all(n.startswith("format:") for n in trial.params)
        config = space.config_from_params(trial.params)
        assert trial.user_attrs["size_bytes"] * 8 == pytest.approx(space.size(config))
    # The report names each layer's format: a header per layer, the chosen trial's formats.
    line = next(row for row in result.stdout.splitlines() if row.startswith("trial "))
    chosen = study.trials[int(line.split()[1])]
    assert chosen.user_attrs["feasible"]
    config = space.config_from_params(chosen.params)
    for layer in space.sensitivities:
        assert f"format:{layer}" in result.stdout
        assert config.formats[layer] in line.split()
    assert "bits:" not in result.stdout


def test_format_search_resumes_and_refuses_other_formats(
    format_study: tuple[Path, subprocess.CompletedProcess[str]], env: dict[str, str]
) -> None:
    cwd, _ = format_study
    storage = ["--storage", f"sqlite:///{cwd / 'f.db'}", "--study-name", "f", "--no-progress"]
    other = _run(["search", *storage, "--formats", "default", "--n-trials", "1"], cwd, env)
    assert other.returncode == 2
    assert "--formats" in other.stderr and "conflicts with study 'f'" in other.stderr
    resumed = _run(["search", *storage, "--n-trials", "1"], cwd, env)
    assert resumed.returncode == 0, resumed.stderr
    study = optuna.load_study(study_name="f", storage=f"sqlite:///{cwd / 'f.db'}")
    assert len(study.trials) == 5
    assert all(n.startswith("format:") for n in study.trials[-1].params)


def test_format_export_round_trip(
    format_study: tuple[Path, subprocess.CompletedProcess[str]], env: dict[str, str]
) -> None:
    cwd, _ = format_study
    result = _run(["export", "--storage", f"sqlite:///{cwd / 'f.db'}", "-o", "out"], cwd, env)
    assert result.returncode == 0, result.stderr
    accuracy, recorded = result.stdout.split("accuracy ")[1].split(" (recorded ")
    assert float(accuracy) == float(recorded.split(")")[0])
    document = json.loads(next((cwd / "out").glob("*.json")).read_text())
    assert set(document["formats"].values()) <= set(FORMATS.split(",")) | {"int8-pc-sym-rtn"}
    from optuna_ctpe.tasks.digits import digits_task

    task = digits_task(seed=0, cache_dir=env["OPTUNA_CTPE_CACHE_DIR"])
    paths = [next((cwd / "out").glob("*.json")), next((cwd / "out").glob("*.safetensors"))]
    scores = [float(task.evaluate(load_exported(p, task=task))) for p in paths]
    assert scores == [pytest.approx(float(accuracy), abs=1e-4)] * 2


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("search --formats int4-g8-sym", "must read 'int<bits>-<pc|g<size>>-<grid>-<rounding>'"),
        ("search --formats int4-pc-sym-rtn,int4-pc-sym-rtn", "formats must not repeat"),
        ("search --formats default --bits 4,8", "--bits and --formats exclude each other"),
        (
            "search --formats default --objective latency-budget --latency-budget 1",
            "--formats does not apply to --objective latency-budget",
        ),
        (
            "search --formats default --objective budget --finetune-epochs 1",
            "--formats does not apply with --finetune-epochs",
        ),
    ],
)
def test_format_usage_errors(
    command: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        code = main(command.split())
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    db = tmp_path / "optuna-ctpe.db"
    assert not db.exists() or not optuna.get_all_study_names(f"sqlite:///{db}")


def test_settings_without_formats_store_and_read_as_before() -> None:
    plain = Settings(**DEFAULTS)
    assert "formats" not in plain.to_attr()  # a bit-width study's attribute is unchanged
    assert Settings.from_attr(plain.to_attr()) == plain
    assert Settings.from_attr(plain.to_attr()).formats is None
    formats = Settings(**{**DEFAULTS, "formats": tuple(sorted(DEFAULT_FORMATS))})
    assert formats.to_attr()["formats"] == sorted(DEFAULT_FORMATS)
    assert Settings.from_attr(json.loads(json.dumps(formats.to_attr()))) == formats


def test_a_trace_file_starts_a_format_study(tmp_path: Path, env: dict[str, str]) -> None:
    """The trace file is format-independent: ``sensitivity --output`` serves format studies."""
    traces = tmp_path / "traces.json"
    measured = _run(["sensitivity", "--max-probes", "12", "--output", str(traces)], tmp_path, env)
    assert measured.returncode == 0, measured.stderr
    db = tmp_path / "t.db"
    args = [
        "search", "--storage", f"sqlite:///{db}", "--study-name", "t", "--sensitivities",
        str(traces), "--formats", FORMATS, "--n-trials", "2", "--widths", "1.0", "--no-progress",
    ]  # fmt: skip
    result = _run(args, tmp_path, env)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    assert study.user_attrs["ctpe:sensitivity_source"]["estimator"]
    space = HessianSearchSpace.load_from_study(study)
    assert set(space.formats) == set(FORMATS.split(","))
    assert all(n.startswith("format:") for t in study.trials for n in t.params)
