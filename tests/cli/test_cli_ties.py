"""``optuna-ctpe search --tie-fused``: the fused layer sets of the task's model share one
choice in the stored space and in every trial; the setting is stored only when given, and a
study resumed with another setting is refused."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import pytest


torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import optuna  # noqa: E402

from optuna_ctpe.cli.options import DEFAULTS  # noqa: E402
from optuna_ctpe.cli.settings import Settings  # noqa: E402
from optuna_ctpe.search_space import HessianSearchSpace  # noqa: E402


pytestmark = [pytest.mark.torch, pytest.mark.slow]

# A task of a tiny random-init Llama: its loss is the language-model loss, its metric minus it.
TASK = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optuna_ctpe.tasks import Task


def make(*, seed=0, **_):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))

    def loss_fn(net, batch):
        return net(input_ids=batch, labels=batch).loss

    def evaluate(net):
        with torch.no_grad():
            return -float(loss_fn(net, ids))

    return Task("tiny-llama", model, loss_fn, [ids], [ids], ids, evaluate)
"""


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "optuna_ctpe.cli", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": os.pathsep.join([str(cwd), *sys.path])},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tie_fused_ties_every_trial(tmp_path: Path) -> None:
    (tmp_path / "tiny_llama_task.py").write_text(TASK)
    db = f"sqlite:///{tmp_path / 't.db'}"
    args = [
        "search", "--task", "tiny_llama_task:make", "--storage", db, "--study-name", "t",
        "--widths", "1.0", "--bits", "2,4,8", "--no-hessian-pruning", "--sampler", "tpe",
        "--n-trials", "4", "--no-progress",
    ]  # fmt: skip
    result = _run([*args, "--tie-fused"], tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="t", storage=db)
    assert study.user_attrs["ctpe:settings"]["tie_fused"] is True
    space = HessianSearchSpace.load_from_study(study)
    # Layer 0's q/k/v hold the fixed first layer: fixed whole. The other three sets are ties.
    assert len(space.ties) == 3
    assert {space.fixed_bits[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"} == {8}
    trials = [t for t in study.trials if t.params]
    assert trials
    for trial in trials:
        assert set(trial.params) <= set(space.distributions)
        config = space.config_from_params(trial.params)
        for tie in space.ties:
            assert len({config.bits[n] for n in tie}) == 1
    # Resuming without the flag adopts the stored setting.
    again = _run([*args, "--n-trials", "1"], tmp_path)
    assert again.returncode == 0, again.stderr


def test_tie_fused_is_stored_only_when_given() -> None:
    values = {k: v for k, v in DEFAULTS.items()}
    plain = Settings(**values)
    assert "tie_fused" not in plain.to_attr()
    assert Settings.from_attr(plain.to_attr()).tie_fused is False
    tied = Settings(**{**values, "tie_fused": True})
    assert tied.to_attr()["tie_fused"] is True
    assert Settings.from_attr(tied.to_attr()) == tied


def test_a_study_without_ties_refuses_tie_fused() -> None:
    from optuna_ctpe.cli.settings import resolve
    from optuna_ctpe.cli.options import UsageError

    stored = Settings(**DEFAULTS).to_attr()
    requested = {**dict.fromkeys(DEFAULTS), "tie_fused": True}
    with pytest.raises(
        UsageError,
        match="--tie-fused conflicts with study 's', which was created with no --tie-fused",
    ):
        resolve(requested, stored, "s", lambda settings: None)
