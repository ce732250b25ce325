"""Sensitivities measured once, searches started from them: the trace file, ``from_model(traces=)``
and ``optuna-ctpe sensitivity --output`` / ``optuna-ctpe search --sensitivities``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

import optuna  # noqa: E402

from optuna_ctpe import _attrs  # noqa: E402
from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.cli import main  # noqa: E402
from optuna_ctpe.nn.sensitivity import hutchinson_traces  # noqa: E402
from optuna_ctpe.nn.trace_file import read_trace_file  # noqa: E402
from optuna_ctpe.nn.trace_file import write_trace_file  # noqa: E402
from optuna_ctpe.nn.traces import LayerTrace  # noqa: E402
from optuna_ctpe.tasks import Task  # noqa: E402
from optuna_ctpe.tasks.digits import digits_task  # noqa: E402


pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def task(cache_dir: Path) -> Task:
    return digits_task(seed=0, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def traces(task: Task) -> dict[str, LayerTrace]:
    return hutchinson_traces(task.model, task.loss_fn, task.calibration_batches, max_probes=4)


def test_round_trip_keeps_every_trace_and_the_metadata(
    traces: dict[str, LayerTrace], tmp_path: Path
) -> None:
    path = write_trace_file(
        tmp_path / "t.json", traces, estimator="hutchinson", metadata={"task": "m:f", "seed": 3}
    )
    content = read_trace_file(path)
    assert dict(content.traces) == traces
    assert list(content.traces) == list(traces)  # model order kept
    assert content.estimator == "hutchinson"
    assert content.metadata == {"task": "m:f", "seed": 3}
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves nothing behind


def _document(measured: dict[str, LayerTrace], **changes: object) -> str:
    trace_list = [t.to_dict() for t in measured.values()]
    document = {"schema": "optuna-ctpe/sensitivities", "version": 1, "estimator": "hutchinson"}
    document |= {"metadata": {}, "traces": trace_list, **changes}
    return json.dumps(document)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (lambda t: "{not json", "not JSON"),
        (lambda t: json.dumps([1, 2]), "is not a sensitivity file"),
        (lambda t: _document(t, schema="optuna-ctpe/hessian-search-space"), "not a sensitivity"),
        (lambda t: _document(t, version=2), "version 2.*upgrade optuna-ctpe"),
        (lambda t: _document(t, version=True), "version True"),
        (lambda t: _document(t, traces=[]), "non-empty list"),
        (lambda t: _document(t, traces=[{"name": "x"}]), "trace 0 is malformed"),
        (lambda t: _document(t, metadata=[1]), "'metadata' must be an object"),
    ],
)
def test_a_bad_file_is_named(
    traces: dict[str, LayerTrace], tmp_path: Path, text: object, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text(traces))  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        read_trace_file(path)


def test_repeated_and_non_finite_traces_are_refused(
    traces: dict[str, LayerTrace], tmp_path: Path
) -> None:
    first = next(iter(traces.values())).to_dict()
    path = tmp_path / "dup.json"
    path.write_text(_document(traces, traces=[first, first]))
    with pytest.raises(ValueError, match="has two traces"):
        read_trace_file(path)
    path.write_text(_document(traces, traces=[{**first, "trace": math.inf}]))
    with pytest.raises(ValueError, match="must be finite"):
        read_trace_file(path)
    with pytest.raises(ValueError, match="is named"):
        write_trace_file(
            tmp_path / "x.json", {"other": traces[first["name"]]}, estimator="hutchinson"
        )
    with pytest.raises(ValueError, match="empty"):
        write_trace_file(tmp_path / "x.json", {}, estimator="hutchinson")


def test_from_model_uses_the_given_traces_without_measuring(
    task: Task, traces: dict[str, LayerTrace], monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna_ctpe.nn.measure as measure

    def no_estimator(name: str) -> object:
        raise AssertionError("the estimator ran although traces were given")

    monkeypatch.setattr(measure, "_estimator", lambda name: no_estimator)
    space = HessianSearchSpace.from_model(
        task.model,
        task.loss_fn,
        task.calibration_batches,
        example_inputs=task.example_inputs,
        traces=traces,
    )
    for name, s in space.sensitivities.items():
        assert s.mean_trace == max(0.0, traces[name].trace / traces[name].n_params)
        assert s.trace_stderr == traces[name].stderr / traces[name].n_params
    assert space.groups  # width groups are measured from the model as usual


def test_traces_of_another_model_are_refused(task: Task, traces: dict[str, LayerTrace]) -> None:
    some = {n: t for n, t in traces.items() if n != "conv2"}
    with pytest.raises(ValueError, match=r"lack 1 of the 5 layers.*'conv2'"):
        HessianSearchSpace.from_model(
            task.model, task.loss_fn, task.calibration_batches, widths=(1.0,), traces=some
        )
    wrong = dict(traces)
    wrong["fc1"] = LayerTrace("fc1", 1.0, 0.1, n_params=7, n_probes=4)
    with pytest.raises(ValueError, match=r"'fc1' is of 7 parameters.*has 32768"):
        HessianSearchSpace.from_model(
            task.model, task.loss_fn, task.calibration_batches, widths=(1.0,), traces=wrong
        )


def test_cli_search_starts_from_a_sensitivity_file(
    cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.json"
    common = ["--cache-dir", str(cache_dir)]
    argv = ["sensitivity", "--max-probes", "3", "--output", str(path), *common]
    assert main(argv) == 0
    content = read_trace_file(path)
    assert content.metadata["task"] == "optuna_ctpe.tasks.digits:digits_task"
    # The default estimator 'auto' is recorded as the one it resolved to: the GGN, for the
    # digits task's cross-entropy.
    assert content.metadata["seed"] == 0 and content.estimator == "ggn"

    db = f"sqlite:///{tmp_path / 's.db'}"
    search = ["search", "--storage", db, "--study-name", "s", "--n-trials", "2", "--no-progress"]
    capsys.readouterr()
    assert main([*search, "--sensitivities", str(path), *common]) == 0
    assert "from ggn traces of a sensitivity file" in capsys.readouterr().err
    study = optuna.load_study(study_name="s", storage=db)
    assert study.user_attrs[_attrs.SENSITIVITY_SOURCE]["max_probes"] == 3
    space = HessianSearchSpace.load_from_study(study)
    for name, trace in content.traces.items():
        assert space.sensitivities[name].mean_trace == max(0.0, trace.trace / trace.n_params)

    # Resuming keeps the stored space; the file is then ignored, and says so.
    assert main([*search, "--sensitivities", str(path), *common]) == 0
    assert "--sensitivities is ignored" in capsys.readouterr().err

    # Another seed trains other weights: its traces do not apply.
    other = ["search", "--storage", db, "--study-name", "t", "--seed", "1", "--n-trials", "1"]
    assert main([*other, "--sensitivities", str(path), *common]) == 2
    assert "measured on task optuna_ctpe.tasks.digits:digits_task with seed 0" in (
        capsys.readouterr().err
    )
    (tmp_path / "bad.json").write_text("[]")
    bad = ["search", "--storage", db, "--study-name", "u", "--n-trials", "1"]
    assert main([*bad, "--sensitivities", str(tmp_path / "bad.json"), *common]) == 2
    assert "is not a sensitivity file" in capsys.readouterr().err
