"""The tasks of ``benchmarks/latency_search.py``: how each is built, searched and labelled.

A :class:`Bench` holds what differs between the digits CNN and MiniLM: the task and search
space, the warm starts, the batches timed, the configuration labels, the layer kinds the report
groups by, and the metric levels the report reads the fronts at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
import warnings


@dataclass(frozen=True)
class Bench:
    """What differs between the benchmark's tasks.

    Attributes:
        name: The ``--task`` value.
        title: The model, in the report's title.
        metric: The task metric, on the plots' axes and in the report.
        batches: Batches of the latency tables and of the whole-model timing; the search uses
            the first one's table.
        seeds: Default runs per search.
        trials: Default trials per run.
        repeats: Default timed runs per model and batch.
        stem: Name of the result files, before ``--tag``.
        front_cap: Most configurations of a front exported and timed (None: all of them).
        levels: Metric levels the report compares the fronts at, as distances below FP32's.
        hv_below: The hypervolume reference's metric, as a distance below FP32's.
        build: ``() -> (task, space)``.
        warm_ratios: ``space -> size ratios`` of the ILP warm starts enqueued in every run.
        describe: ``(space, config) -> label`` of a configuration (no ``|``: markdown).
        kind: ``layer name -> kind``: the report's per-layer tables group layers by kind.
        notes: Task-specific paragraphs of the report (set-up, operators).
    """

    name: str
    title: str
    metric: str
    batches: tuple[int, ...]
    seeds: int
    trials: int
    repeats: int
    stem: str
    front_cap: int | None
    levels: tuple[float, ...]
    hv_below: float
    build: Callable[[], tuple[Any, Any]]
    warm_ratios: Callable[[Any], tuple[float, ...]]
    describe: Callable[[Any, Any], str]
    kind: Callable[[str], str]
    notes: str


def _digits() -> tuple[Any, Any]:
    """The digits CNN with the CLI's default grids (Hessian-pruned, first and last at 8 bits)."""
    from optuna_ctpe import HessianSearchSpace
    from optuna_ctpe.tasks.digits import digits_task

    task = digits_task(seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trace of layer.*is negative")
        space = HessianSearchSpace.from_model(
            task.model,
            task.loss_fn,
            task.calibration_batches,
            example_inputs=task.example_inputs,
            seed=0,
        )
    return task, space


def _describe_digits(space: Any, config: Any) -> str:
    """``conv2:4 conv3:3 fc1:4 / fc1=0.5``: searched bit-widths, then the groups below width 1."""
    bits = " ".join(f"{n}:{b}" for n, b in config.bits.items() if n not in space.fixed_bits)
    narrow = " ".join(f"{g}={w:g}" for g, w in config.widths.items() if w < 1)
    return f"{bits} / {narrow}" if narrow else bits


#: MiniLM's probes per layer for the Hutchinson traces: a few, since only the bit ranking
#: matters here and the traces take most of the set-up time (30 s on this machine at 20).
MINILM_PROBES = 20
#: Linear layers of a BERT block, in the order the MiniLM labels write them.
MINILM_KINDS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def _minilm() -> tuple[Any, Any]:
    """MiniLM, bits only: its 36 Linear layers (first and last at 8 bits, as the CLI fixes
    them), the default bit grid, no width pruning, embeddings left in float (the latency table
    has no one-layer graph for an embedding)."""
    from optuna_ctpe import HessianSearchSpace
    from optuna_ctpe.tasks.minilm import minilm_task

    task = minilm_task(seed=0, device="cpu")
    space = HessianSearchSpace.from_model(
        task.model,
        task.loss_fn,
        task.calibration_batches,
        widths=(1.0,),
        example_inputs=task.example_inputs,
        include_embeddings=False,
        estimator="hutchinson",
        max_probes=MINILM_PROBES,
        seed=0,
    )
    return task, space


def _minilm_warm_ratios(space: Any) -> tuple[float, ...]:
    """The accounted sizes of uniform 6 and 4 bits. The CLI's 1/6 and 1/10 of FP32 do not fit
    MiniLM, whose float embeddings alone are 0.52 of its accounted FP32 size; and 4 bits
    already cost 7 points of fidelity, so a warm start at 3 bits or fewer (tried first) left
    the high-fidelity half of the front unexplored in 60 trials."""
    return tuple(space.size(space.uniform(b)) / space.fp32_bits for b in (6, 4))


def _minilm_kind(name: str) -> str:
    """``encoder.encoder.layer.3.attention.self.key`` -> ``attention.self.key``."""
    return name.split(".layer.", 1)[1].split(".", 1)[1]


def _describe_minilm(space: Any, config: Any) -> str:
    """``844444 434344 ...``: every layer's bits, one group of six per encoder block."""
    digits = "".join(str(b) for b in config.bits.values())
    return " ".join(digits[i : i + len(MINILM_KINDS)] for i in range(0, len(digits), 6))


BENCHES = {
    "digits": Bench(
        name="digits",
        title="digits CNN",
        metric="validation accuracy",
        batches=(1, 32),
        seeds=10,
        trials=150,
        repeats=600,
        stem="latency_search",
        front_cap=None,
        levels=(0.0, 0.005, 0.01, 0.015),
        hv_below=0.05,
        build=_digits,
        warm_ratios=lambda space: (1 / 6, 1 / 10),
        describe=_describe_digits,
        kind=lambda name: name,
        notes="A configuration reads `layer:bits ... / group=width ...` (groups at width 1 "
        "left out). Linear layers (`fc1`, `fc2`) are MatMulNBits (3 bits stored in 4, 6 in 8), "
        "convolutions DequantizeLinear (int4 up to 4 bits, int8 above).",
    ),
    "minilm": Bench(
        name="minilm",
        title="all-MiniLM-L6-v2",
        metric="embedding fidelity",
        batches=(1, 8),
        seeds=3,
        trials=60,
        repeats=100,
        stem="latency_search_minilm",
        front_cap=8,
        levels=(0.01, 0.02, 0.05, 0.1),
        hv_below=0.2,
        build=_minilm,
        warm_ratios=_minilm_warm_ratios,
        describe=_describe_minilm,
        kind=_minilm_kind,
        notes="Bits only: widths fixed at 1, the default bit grid, embeddings (word, position, "
        "token type: 0.52 of the accounted FP32 size) left in float32, since the latency table "
        f"has no one-layer graph for them; Hutchinson traces with at most {MINILM_PROBES} "
        "probes per layer. The timed input is the task's example: one calibration sentence, "
        "16 tokens with its attention mask (batch 8: the same sentence 8 times). "
        "A configuration reads the 36 layers' bits, one group of six per encoder block in the "
        "order query, key, value, attention output, intermediate, output. Every layer is "
        "MatMulNBits (3 bits stored in 4, 6 in 8).",
    ),
}
