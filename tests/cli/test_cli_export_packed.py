"""``optuna-ctpe export``'s packed model: written beside the JSON and the state dict, reported
with its real size, and loaded by ``load_exported`` exactly as the JSON export loads."""

from __future__ import annotations

import json
from pathlib import Path
import re

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
pytest.importorskip("safetensors")

import optuna  # noqa: E402

from optuna_ctpe.cli import load_exported  # noqa: E402
from optuna_ctpe.cli import main  # noqa: E402
from optuna_ctpe.deploy import read_packed_metadata  # noqa: E402
from optuna_ctpe.tasks import Task  # noqa: E402
from optuna_ctpe.tasks.digits import digits_task  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def task(cache_dir: Path) -> Task:
    return digits_task(seed=0, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, task: Task) -> Path:
    """A small ``optuna-ctpe search`` study, with widths, run in this process."""
    db = tmp_path_factory.mktemp("search") / "s.db"
    argv = ["search", "--storage", f"sqlite:///{db}", "--study-name", "s", "--n-trials", "4"]
    argv += ["--cache-dir", str(cache_dir), "--widths", "0.5,1.0", "--no-progress"]
    assert main(argv) == 0
    return db


def _export(db: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    capsys.readouterr()
    argv = ["export", "--storage", f"sqlite:///{db}", "-o", str(out), *extra]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_export_writes_a_packed_model_of_the_accounted_size(
    study_db: Path, task: Task, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _export(study_db, tmp_path, capsys, "--trial", "1")
    packed = tmp_path / "s-trial1.safetensors"
    config_path = tmp_path / "s-trial1.json"
    assert packed.exists() and config_path.exists() and (tmp_path / "s-trial1.pt").exists()
    trial = optuna.load_study(study_name="s", storage=f"sqlite:///{study_db}").trials[1]

    # The report: the file's size, its tensors against the accounted size, the ratio to FP32.
    line = re.search(
        r"([\d.]+) KB on disk: ([\d.]+) KB of tensors \(accounted ([\d.]+) KB\) and a "
        r"([\d.]+) KB header; ([\d.]+)x smaller than FP32",
        out,
    )
    assert line is not None, out
    on_disk, tensors, accounted, header, ratio = map(float, line.groups())
    assert on_disk == pytest.approx(packed.stat().st_size / 1024, abs=0.06)
    assert accounted == pytest.approx(trial.user_attrs["size_bytes"] / 1024, abs=0.06)
    assert abs(tensors / accounted - 1) <= 0.02  # the criterion
    assert on_disk == pytest.approx(tensors + header, abs=0.11)
    compression = trial.user_attrs["compression_ratio"]
    assert ratio == pytest.approx(compression * accounted / on_disk, rel=0.01)

    # The JSON names the packed file; the packed file holds the JSON's metrics.
    document = json.loads(config_path.read_text())
    assert document["packed"] == packed.name
    recorded = read_packed_metadata(packed)["metadata"]
    assert recorded["accuracy"] == trial.user_attrs["accuracy"]
    assert recorded["bits"] == document["bits"] and recorded["widths"] == document["widths"]

    # Both exports load to the same model, scoring the recorded metric.
    from_packed = load_exported(packed, task=task)
    from_json = load_exported(config_path, task=task)
    x = task.validation_batches[0][0]
    with torch.no_grad():
        assert torch.equal(from_packed(x), from_json(x))
    assert task.evaluate(from_packed) == trial.user_attrs["accuracy"]


def test_load_exported_rebuilds_the_task_and_refuses_other_files(
    study_db: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _export(study_db, tmp_path, capsys)  # the recommended trial
    (packed,) = tmp_path.glob("*.safetensors")
    net = load_exported(packed, cache_dir=str(cache_dir))  # task and seed from the metadata
    number = int(packed.stem.rsplit("trial", 1)[1])
    trial = optuna.load_study(study_name="s", storage=f"sqlite:///{study_db}").trials[number]
    task = digits_task(seed=0, cache_dir=cache_dir)
    assert task.evaluate(net) == trial.user_attrs["accuracy"]

    from optuna_ctpe.deploy import save_packed
    from optuna_ctpe.search_space import HessianSearchSpace

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{study_db}")
    space = HessianSearchSpace.load_from_study(study)
    foreign = tmp_path / "foreign.safetensors"
    save_packed(space, task.model, space.uniform(8), foreign)  # packed, but no export metadata
    with pytest.raises(ValueError, match="is a packed model but not an optuna-ctpe export"):
        load_exported(foreign, task=task)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(packed.read_bytes()[:-1])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_exported(damaged, task=task)


def test_export_writes_an_onnx_model_that_onnxruntime_runs(
    study_db: Path, task: Task, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = _export(study_db, tmp_path, capsys, "--trial", "1")
    path = tmp_path / "s-trial1.onnx"
    assert path.exists()
    assert json.loads((tmp_path / "s-trial1.json").read_text())["onnx"] == path.name
    assert re.search(rf"ONNX model: +{re.escape(str(path))} ", out), out
    assert "onnxruntime.InferenceSession" in out  # how to run it

    # The ONNX model computes the exported model: same predictions on the validation set.
    net = load_exported(tmp_path / "s-trial1.json", task=task)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = task.validation_batches[0][0]
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = net(x)
    assert logits.shape == tuple(expected.shape)
    assert torch.allclose(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
    assert int((torch.from_numpy(logits).argmax(1) == expected.argmax(1)).sum()) == len(x)
    # Integer weights: smaller than the float state dict of the same pruned model.
    assert path.stat().st_size < (tmp_path / "s-trial1.pt").stat().st_size
