"""The ``optuna-ctpe`` command: end to end in subprocesses, resume, workers, export, errors."""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import signal
import sqlite3
import subprocess
import sys
import time

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from conftest import StorageTarget  # noqa: E402

from optuna_ctpe.cli import main  # noqa: E402
from optuna_ctpe.search_space import HessianSearchSpace  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.slow]

STUDY_ATTRS = {
    "ctpe:settings",
    "ctpe:search_space",
    "ctpe:sensitivities",
    "ctpe:baselines",
    "ctpe:search_space_size",
}
TRIAL_ATTRS = {"accuracy", "size_bytes", "size_kb", "compression_ratio", "sampler"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weight cache shared by the module's processes: the CNN is trained once, here."""
    from optuna_ctpe.tasks.digits import digits_task

    folder = tmp_path_factory.mktemp("cache")
    digits_task(seed=0, cache_dir=folder)
    return folder


@pytest.fixture
def env(cache_dir: Path) -> dict[str, str]:
    return {**os.environ, "OPTUNA_CTPE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}


def _command() -> list[str]:
    # The console script pip installed beside this interpreter; `python -m` where it is absent
    # (a source checkout run without installing).
    script = Path(sys.executable).with_name("optuna-ctpe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "optuna_ctpe.cli"]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command() + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _spawn(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _command() + args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _load(db: Path, name: str = "optuna-ctpe") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def _states(db: Path) -> dict[str, int]:
    """Trial counts per state, read with sqlite3 directly (cheap enough to poll)."""
    if not db.exists():
        return {}
    with sqlite3.connect(db, timeout=30) as con:
        try:
            rows = con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
        except sqlite3.OperationalError:
            return {}  # tables not created yet
    return dict(rows)


def _wait_for(predicate: object, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def pareto_study(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One ``optuna-ctpe search`` with the default storage in a fresh working directory."""
    cwd = tmp_path_factory.mktemp("search")
    env = {**os.environ, "OPTUNA_CTPE_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    result = _run(["search", "--n-trials", "6"], cwd, env)
    return cwd, result


def test_search_end_to_end(pareto_study: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    cwd, result = pareto_study
    assert result.returncode == 0, result.stderr
    db = cwd / "optuna-ctpe.db"  # the documented default storage
    study = _load(db)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    assert len(study.directions) == 2
    assert STUDY_ATTRS <= set(study.user_attrs)
    for trial in study.trials:
        assert TRIAL_ATTRS <= set(trial.user_attrs), trial.user_attrs
        # The sampler's recorded decision; enqueued warm starts never reach the sampler.
        assert ("ctpe:mode" in trial.user_attrs) != ("ctpe:warm_start" in trial.user_attrs)
        assert trial.values == [trial.user_attrs["accuracy"], trial.user_attrs["size_kb"]]
    space = HessianSearchSpace.load_from_study(study)
    assert set(study.trials[-1].params) == set(space.distributions)
    baselines = study.user_attrs["ctpe:baselines"]
    assert baselines["fp32"]["accuracy"] > 0.95
    # Below 4: biases and the per-channel scales of each weight stay float32.
    assert baselines["uniform8"]["compression_ratio"] == pytest.approx(4, rel=0.03)
    out = result.stdout
    for text in ("FP32", "uniform 8-bit", "Pareto front", "bits:conv2", "width:fc1", "size KB"):
        assert text in out, out
    assert f"optuna-dashboard sqlite:///{db.resolve()}" in out
    assert "search:" in result.stderr  # the progress bar


def test_export_round_trip(
    pareto_study: tuple[Path, subprocess.CompletedProcess[str]], env: dict[str, str]
) -> None:
    from optuna_ctpe.cli import load_exported
    from optuna_ctpe.tasks.digits import digits_task

    cwd, _ = pareto_study
    result = _run(["export", "--output-dir", "out"], cwd, env)
    assert result.returncode == 0, result.stderr
    study = _load(cwd / "optuna-ctpe.db")
    (config_path,) = (cwd / "out").glob("*.json")
    (model_path,) = (cwd / "out").glob("*.pt")
    number = int(config_path.stem.rsplit("trial", 1)[1])
    trial = study.trials[number]
    assert trial in study.best_trials  # the default is a Pareto-optimal trial

    state = torch.load(model_path, weights_only=True)  # tensors only: safe to load
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    task = digits_task(seed=0, cache_dir=env["OPTUNA_CTPE_CACHE_DIR"])
    net = load_exported(config_path, task=task)
    assert task.evaluate(net) == trial.user_attrs["accuracy"]

    # An explicit --trial, and the quantized weights really are on the grid: at most 2^b levels.
    result = _run(["export", "--trial", "2", "-o", "two"], cwd, env)
    assert result.returncode == 0, result.stderr
    net = load_exported(cwd / "two" / "optuna-ctpe-trial2.json", task=task)
    assert task.evaluate(net) == study.trials[2].user_attrs["accuracy"]
    space = HessianSearchSpace.load_from_study(study)
    config = space.config_from_params(study.trials[2].params)
    for name, bits in config.bits.items():
        weight = dict(net.named_modules())[name].weight.detach()
        per_channel_levels = max(len(torch.unique(row)) for row in weight.flatten(1))
        assert per_channel_levels <= 2**bits - 1


def _journal_study(path: Path) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal import JournalStorage

    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name="optuna-ctpe", storage=storage)


def _counts(kind: str, where: Path) -> dict[str, int]:
    """Trial counts per state, plus "TAGGED": RUNNING trials that carry their worker's tag."""
    if kind == "sqlite":
        counts = _states(where)
        if counts.get("RUNNING"):
            with sqlite3.connect(where, timeout=30) as con:
                (counts["TAGGED"],) = con.execute(
                    "SELECT COUNT(*) FROM trials JOIN trial_system_attributes USING (trial_id) "
                    "WHERE state = 'RUNNING' AND key = 'ctpe:worker'"
                ).fetchone()
        return counts
    try:
        trials = _journal_study(where).get_trials(deepcopy=False)
    except (KeyError, FileNotFoundError):
        return {}  # not created yet
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    counts["TAGGED"] = sum(
        t.state == TrialState.RUNNING and "ctpe:worker" in t.system_attrs for t in trials
    )
    return counts


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_resume_after_sigkill(kind: str, tmp_path: Path, env: dict[str, str]) -> None:
    """A worker killed outright, then a rerun: heartbeat storage (SQLite, with its retry of the
    killed trial) and journal file (no heartbeat: the explicit clean-up alone)."""
    if kind == "sqlite":
        where, storage_args = tmp_path / "optuna-ctpe.db", []  # the default storage
    else:
        where = tmp_path / "study.log"
        storage_args = ["--storage", str(where)]
    # Fine-tuning makes the objective most of a trial's time, so the kill lands in a trial.
    args = ["search", "--n-trials", "200", "--finetune-epochs", "3", "--no-progress"]
    proc = _spawn(args + storage_args, tmp_path, env)
    try:

        def mid_trial() -> bool:
            # Inside the objective: the trial already carries its worker's tag (the moments
            # between its creation and the tag are covered by the untagged-age rule instead).
            counts = _counts(kind, where)
            return counts.get("COMPLETE", 0) >= 3 and counts.get("TAGGED", 0) == 1

        _wait_for(mid_trial, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()

    def load() -> optuna.Study:
        return _load(where) if kind == "sqlite" else _journal_study(where)

    before = load().trials
    complete_before = {t.number for t in before if t.state == TrialState.COMPLETE}
    running_before = [t.number for t in before if t.state == TrialState.RUNNING]
    assert len(running_before) == 1, "the kill was meant to land inside a trial"

    result = _run(["search", "--n-trials", "4", "--no-progress", *storage_args], tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert f"left RUNNING by dead workers: {running_before}" in result.stderr
    after = load().trials
    states = [t.state for t in after]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    # --n-trials counts the new trials: the rerun added exactly 4 (on SQLite, the retry of the
    # killed trial, enqueued when it was failed, among them).
    assert len(after) == len(before) + 4
    assert {t.number for t in after if t.state == TrialState.COMPLETE} >= complete_before
    assert states.count(TrialState.COMPLETE) == len(complete_before) + 4
    assert [t.number for t in after if t.state == TrialState.FAIL] == running_before
    # Settings came from the study, so the rerun searched the same space.
    assert "joined study" in result.stderr and "measuring" not in result.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_leaves_storage_consistent(
    signum: int, code: int, tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "s.db"
    args = ["search", "--storage", f"sqlite:///{db}", "--n-trials", "500", "--no-progress"]
    proc = _spawn(args, tmp_path, env)
    try:
        _wait_for(lambda: _states(db).get("COMPLETE", 0) >= 3, proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "FP32" in out and "run the same command again" in err  # the table, then the hint
    states = _states(db)
    assert "RUNNING" not in states and states.get("FAIL", 0) <= 1


def test_two_concurrent_workers(
    storage_target: StorageTarget, tmp_path: Path, env: dict[str, str]
) -> None:
    """Two processes on one storage URL: exact trial count, one set-up (journal file, SQLite and,
    when configured, PostgreSQL)."""
    url = {
        "journal": storage_target.where,  # a path ending in .log
        "sqlite": f"sqlite:///{storage_target.where}",
        "postgres": storage_target.where,
    }[storage_target.kind]
    args = ["search", "--storage", url, "--study-name", storage_target.study_name]
    args += ["--n-trials", "5", "--no-progress"]
    procs = [_spawn(args, tmp_path, env) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    study = optuna.load_study(
        study_name=storage_target.study_name, storage=storage_target.storage()
    )
    assert len(study.trials) == 10
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # The set-up ran once: one worker measured, the other used its space and warm starts.
    errs = [err for _, err in outputs]
    assert sum("measuring Hessian sensitivities" in e for e in errs) == 1
    assert sum("created study" in e for e in errs) == 1
    warm = [t for t in study.trials if t.user_attrs.get("ctpe:warm_start")]
    assert 1 <= len(warm) <= 2
    workers = {t.system_attrs["ctpe:worker"] for t in study.trials}
    assert len(workers) == 2


def test_budget_objective_with_finetuning_and_pruner(tmp_path: Path, env: dict[str, str]) -> None:
    db = tmp_path / "b.db"
    args = [
        "search", "--storage", f"sqlite:///{db}", "--study-name", "b", "--objective", "budget",
        "--size-budget", "10", "--finetune-epochs", "2", "--pruner", "median", "--n-trials", "8",
        "--sampler", "tpe", "--widths", "1.0", "--n-jobs", "2", "--no-progress",
    ]  # fmt: skip
    result = _run(args, tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "within the size budget" in result.stdout
    study = _load(db, "b")
    assert study.user_attrs["ctpe:settings"]["size_budget"] == pytest.approx(0.1)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert complete
    for trial in complete:
        assert sorted(trial.intermediate_values) == [0, 1]
        assert trial.value == trial.intermediate_values[1] == trial.user_attrs["accuracy"]
        assert trial.user_attrs["feasible"] is (trial.constraints["size"] <= 0)
    # Fine-tuned models export reproducibly too: export replays the same fine-tuning.
    result = _run(["export", "--storage", f"sqlite:///{db}", "-o", "out"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    accuracy, recorded = result.stdout.split("accuracy ")[1].split(" (recorded ")
    assert float(accuracy) == float(recorded.split(")")[0])


# -- usage errors: documented messages, exit code 2 ---------------------------------------------


@pytest.fixture
def existing(tmp_path: Path) -> Iterator[Path]:
    """A storage with one (empty) optuna-ctpe study, made without running a search."""
    db = tmp_path / "e.db"
    study = optuna.create_study(
        storage=f"sqlite:///{db}", study_name="e", directions=["maximize"] * 2
    )
    from optuna_ctpe.cli.options import DEFAULTS
    from optuna_ctpe.cli.settings import Settings

    study.set_user_attr("ctpe:settings", Settings(**DEFAULTS).to_attr())
    yield db


# (command line, the documented message): argparse's own errors read "argument --x: <message>".
USAGE_ERRORS = [
    ("search --n-trials 0", "argument --n-trials: must be a positive integer, got '0'"),
    ("search --n-trials -2", "argument --n-trials: must be a positive integer, got '-2'"),
    ("search --timeout 0", "argument --timeout: must be a positive number of seconds, got '0'"),
    ("search --n-jobs 0", "argument --n-jobs: must be a positive integer, or -1"),
    ("search --bits 1,4", "argument --bits: bit-widths must be integers in [2, 16], got '1'"),
    ("search --bits 4,17", "argument --bits: bit-widths must be integers in [2, 16], got '17'"),
    ("search --bits 4,4", "argument --bits: bit-widths must not repeat, got '4,4'"),
    ("search --widths 0,1", "argument --widths: width ratios must be numbers in (0, 1], got '0'"),
    ("search --widths 0.5,1.5", "argument --widths: width ratios must be numbers in (0, 1]"),
    ("search --size-budget -1", "argument --size-budget: must be a compression ratio > 1"),
    ("search --objective best", "argument --objective: invalid choice: 'best'"),
    ("search --storage foo://x/y", "--storage 'foo://x/y': unknown storage scheme 'foo'"),
    ("search --storage results.db", "--storage 'results.db' has no scheme"),
    ("search --task no_such_mod:make", "--task 'no_such_mod:make': cannot import module"),
    ("search --task optuna_ctpe.tasks.digits:nope", "'optuna_ctpe.tasks.digits' has no callable"),
    ("search --task optuna_ctpe.tasks.digits", "must have the form module:factory"),
    ("export --storage foo://x", "--storage 'foo://x': unknown storage scheme 'foo'"),
    ("search --pruner median", "--pruner median needs --finetune-epochs >= 1"),
    (
        "search --pruner median --finetune-epochs 2",
        "--pruner median needs --objective budget: Optuna cannot prune trials",
    ),
    ("search --size-budget 4", "--size-budget applies to --objective budget only"),
]


@pytest.mark.parametrize(("command", "message"), USAGE_ERRORS)
def test_usage_errors(
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
    # Nothing is left behind: no study (SQLite creates the file when the storage is opened).
    db = tmp_path / "optuna-ctpe.db"
    assert not db.exists() or not optuna.get_all_study_names(f"sqlite:///{db}")


ERRORS_ON_EXISTING_STUDY = [
    ("export --study-name nope", "--study-name 'nope' does not exist in"),
    ("export --study-name e --trial 0", "--trial 0 does not exist in study 'e'"),
    (
        "search --study-name e --objective budget",
        "--objective budget conflicts with study 'e', which was created with --objective pareto",
    ),
    (
        "search --study-name e --no-hessian-pruning",
        "--no-hessian-pruning conflicts with study 'e', which was created with Hessian pruning",
    ),
    ("search --study-name e --pruner median", "--pruner median needs --finetune-epochs >= 1"),
]


@pytest.mark.parametrize(("command", "message"), ERRORS_ON_EXISTING_STUDY)
def test_usage_errors_on_existing_storage(
    command: str, message: str, existing: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(command.split() + ["--storage", f"sqlite:///{existing}"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_exit_code_of_the_console_script(tmp_path: Path, env: dict[str, str]) -> None:
    result = _run(["search", "--bits", "2,20"], tmp_path, env)
    assert result.returncode == 2
    assert "argument --bits: bit-widths must be integers in [2, 16], got '20'" in result.stderr
    result = _run(["export", "--storage", "sqlite:///none.db"], tmp_path, env)
    assert result.returncode == 2
    assert "--storage 'sqlite:///none.db': no such file 'none.db'" in result.stderr
    assert not (tmp_path / "none.db").exists()


def test_sensitivity_command(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png, js = tmp_path / "traces.png", tmp_path / "traces.json"
    args = ["sensitivity", "--cache-dir", str(cache_dir), "--max-probes", "12", "--plot", str(png)]
    assert main(args + ["--json", str(js)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:4] == ["layer", "params", "trace", "mean"]
    for layer in ("conv1", "conv2", "conv3", "fc1", "fc2"):
        assert any(line.startswith(layer) for line in out.splitlines()), out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    assert [t["name"] for t in json.loads(js.read_text())] == [
        "conv1",
        "conv2",
        "conv3",
        "fc1",
        "fc2",
    ]


def test_custom_task_factory(
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--task module:factory with a user's factory (here: the digits task under another name),
    combined with the options that change the space."""
    (tmp_path / "my_tasks.py").write_text(
        "import dataclasses\n"
        "from optuna_ctpe.tasks.digits import digits_task\n\n"
        "def small(*, seed=0):\n"
        f"    task = digits_task(seed=seed, cache_dir={str(cache_dir)!r})\n"
        "    return dataclasses.replace(task, name='my-digits')\n\n"
        "def broken(*, seed=0):\n"
        "    return 'not a task'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'custom.db'}"
    args = ["search", "--storage", url, "--task", "my_tasks:small", "--bits", "4,8"]
    args += ["--widths", "1.0", "--no-hessian-pruning", "--n-trials", "3", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bits:conv2" in out and "width:" not in out  # a bits-only search
    study = optuna.load_study(study_name="optuna-ctpe", storage=url)
    space = HessianSearchSpace.load_from_study(study)
    assert space.bits == (4, 8) and not space.groups
    assert all(len(d.choices) == 2 for d in space.distributions.values())  # nothing pruned
    assert study.user_attrs["ctpe:settings"]["task"] == "my_tasks:small"

    args = ["search", "--storage", url, "--study-name", "b", "--task", "my_tasks:broken"]
    assert main(args) == 2
    assert "--task 'my_tasks:broken': the factory returned str, not an" in capsys.readouterr().err
    assert optuna.get_all_study_names(url) == ["optuna-ctpe"]  # refused before creating "b"
