"""Hutchinson at real size: time per Hessian-vector product and peak memory on GPT-2 small.

The model is a randomly initialised GPT-2 small (``transformers.GPT2Config()`` defaults: 12
layers, width 768, vocabulary 50257, 124M parameters, no weights downloaded) with eager
attention, whose backward is itself differentiable. The loss is the language-model loss on random
token ids (``labels = input_ids``). Traced: every ``Conv1D`` of the blocks (fused qkv, attention
output, MLP in and out: 48 layers) and ``lm_head`` (tied to the token embedding), the layers whose
bits are searched.

For each cell (batch size x sequence length) the script measures, each in a fresh process (so
that memory the allocator kept from an earlier measurement does not distort a peak):

* **reference**: one forward + backward (first-order gradient of every parameter) on a batch,
  ``--reps`` times after one untimed warm-up (median reported): the yardstick the HVP cost is
  a ratio of;
* **1 batch**: :func:`optuna_ctpe.nn.hutchinson.hutchinson_traces` on one batch with
  ``--probes`` probes: the gradient with its graph is built once, then one HVP per probe;
* **K batches, streamed**: the same on ``--batches`` batches of the same shape, one probe per
  batch: the graph is rebuilt for each batch and the previous one freed first, so the peak
  memory should equal the 1-batch peak, not K times the graph;
* **K batches as one** (only where the concatenated batch has at most ``--full-max-tokens``
  tokens): the same K batches concatenated into one, 2 probes: the memory a full-batch graph
  would take.

The times of the two phases (gradient with ``create_graph`` and HVP) are taken inside the real
``hutchinson_traces`` run by wrapping its two private helpers with timers. Peak memory: on CPU the
resident-set high-water mark ``VmHWM`` of ``/proc/self/status``, reset before each measurement by
writing ``5`` to ``/proc/self/clear_refs`` (``tracemalloc`` and ``getrusage`` miss torch's
allocations or cannot be reset); on CUDA ``torch.cuda.max_memory_allocated``. Both are reported
as the peak and as the increase over the memory held before the measurement (model and batches).

Run ``python benchmarks/hessian_scale.py`` from the repository root (``pip install
transformers``); ``--device cuda`` uses a GPU when present. Writes
``benchmarks/results/hessian_scale.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable
from collections.abc import Iterator
import contextlib
import multiprocessing
import os
import statistics
import sys
import time
from typing import Any

from _common import markdown_table
from _common import new_axes
from _common import report_header
from _common import RESULTS_DIR
from _common import save_figure
import torch
from torch import nn

import optuna_ctpe.nn.hutchinson as hutchinson_module


GiB = 2.0**30


# ----------------------------------------------------------------------------------------------
# Model, batches, loss
# ----------------------------------------------------------------------------------------------


def build_model(device: torch.device) -> nn.Module:
    """A random-init GPT-2 small LM (124M parameters) with eager attention, in eval mode."""
    from transformers import GPT2Config
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    # Eager attention: the fused SDPA kernels have no double backward on CPU.
    config = GPT2Config(attn_implementation="eager", loss_type="ForCausalLM")
    return GPT2LMHeadModel(config).to(device).eval()


def traced_layers(model: nn.Module) -> list[str]:
    """The names of every ``Conv1D`` of the blocks and of ``lm_head``, in module order."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    return names + ["lm_head"]


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches of random token ids of shape ``(batch, seq)``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(n)]


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The next-token cross-entropy of ``model`` on ``input_ids``."""
    return model(input_ids=input_ids, labels=input_ids).loss


# ----------------------------------------------------------------------------------------------
# Peak memory and timers
# ----------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} field")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Measure the peak memory inside; yields a dict filled on exit (bytes).

    ``peak``: the high-water mark; ``extra``: ``peak`` minus the memory in use on entry.
    """
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        start = 1024 * _proc_status_kib("VmRSS")
        yield out
        peak = 1024 * _proc_status_kib("VmHWM")
    out.update(peak=float(peak), extra=float(peak - start))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def phase_timers(device: torch.device) -> Iterator[dict[str, list[float]]]:
    """Time each call of Hutchinson's gradient and HVP helpers inside (seconds per call)."""
    times: dict[str, list[float]] = {"gradient": [], "hvp": []}
    originals = {
        "gradient": hutchinson_module._first_gradient,
        "hvp": hutchinson_module.block_quadratic_forms,
    }

    def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _sync(device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            _sync(device)
            times[key].append(time.perf_counter() - start)
            return result

        return wrapper

    hutchinson_module._first_gradient = timed("gradient", originals["gradient"])
    hutchinson_module.block_quadratic_forms = timed("hvp", originals["hvp"])
    try:
        yield times
    finally:
        hutchinson_module._first_gradient = originals["gradient"]
        hutchinson_module.block_quadratic_forms = originals["hvp"]


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def measure_reference(
    model: nn.Module, batch: torch.Tensor, reps: int, device: torch.device
) -> dict[str, float]:
    """Median seconds and peak memory of one forward + backward (gradient of every parameter).

    The first of ``reps + 1`` runs is a warm-up (first-call set-up of kernels and memory) and
    is not timed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    batch = batch.to(device)
    seconds = []
    with peak_memory(device) as memory:
        for _ in range(reps + 1):
            _sync(device)
            start = time.perf_counter()
            grads = torch.autograd.grad(lm_loss(model, batch), params)
            _sync(device)
            seconds.append(time.perf_counter() - start)
            del grads
    return {"seconds": statistics.median(seconds[1:]), "each": seconds, **memory}


def measure_hutchinson(
    model: nn.Module,
    batches: list[torch.Tensor],
    probes: int,
    layers: list[str],
    device: torch.device,
) -> dict[str, Any]:
    """Run ``hutchinson_traces`` with every probe; its phase times, total time and peak memory."""
    from optuna_ctpe.nn.hutchinson import hutchinson_traces

    with phase_timers(device) as times, peak_memory(device) as memory:
        start = time.perf_counter()
        traces = hutchinson_traces(
            model, lm_loss, batches, layers=layers, max_probes=probes, min_probes=probes, rtol=0.0
        )
        total = time.perf_counter() - start
    assert all(t.n_probes == probes for t in traces.values())
    return {
        "total": total,
        "gradient": times["gradient"],
        "hvp": times["hvp"],
        "n_traced": sum(t.n_params for t in traces.values()),
        **memory,
    }


MEASUREMENTS = ("reference", "one", "streamed", "full")


def measure_in_child(task: dict[str, Any]) -> dict[str, Any]:
    """One measurement of :data:`MEASUREMENTS` on a freshly built model and batches.

    Run in a fresh process, so that memory cached by the allocator after an earlier
    measurement neither hides nor inflates this one's peak.
    """
    torch.set_num_threads(task["threads"])
    device = torch.device(task["device"])
    model = build_model(device)
    n, batch, seq = task["batches"], task["batch"], task["seq"]
    batches = make_batches(n, batch, seq, model.config.vocab_size, seed=batch * 10_000 + seq)
    layers = traced_layers(model)
    kind = task["kind"]
    if kind == "reference":
        return measure_reference(model, batches[0], task["reps"], device)
    if kind == "one":
        return measure_hutchinson(model, batches[:1], task["probes"], layers, device)
    if kind == "streamed":
        return measure_hutchinson(model, batches, n, layers, device)
    return measure_hutchinson(model, [torch.cat(batches)], 2, layers, device)


def measure_cell(batch: int, seq: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of one batch shape, each in its own process (see the module doc)."""
    task = {
        "batch": batch,
        "seq": seq,
        "batches": args.batches,
        "probes": args.probes,
        "reps": args.reps,
        "device": args.device,
        "threads": args.threads,
    }
    kinds = list(MEASUREMENTS)
    if args.batches * batch * seq > args.full_max_tokens:
        kinds.remove("full")
    cell: dict[str, Any] = {"batch": batch, "seq": seq}
    context = multiprocessing.get_context("spawn")
    for kind in kinds:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            cell[kind] = pool.submit(measure_in_child, {**task, "kind": kind}).result()
        print(f"{batch}x{seq} {kind}: {cell[kind]}", flush=True)
    return cell


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / GiB:.2f}"


def gradient_median(cell: dict[str, Any]) -> float:
    """Median seconds of the gradient with graph over the 1-batch and streamed runs."""
    return statistics.median(cell["one"]["gradient"] + cell["streamed"]["gradient"])


def timing_rows(cells: list[dict[str, Any]]) -> list[list[str]]:
    """One row per cell: reference, gradient with graph, HVP, and their ratios."""
    rows = []
    for c in cells:
        ref = c["reference"]["seconds"]
        hvp = statistics.median(c["one"]["hvp"])
        grad = gradient_median(c)
        streamed = c["streamed"]
        # Median, not mean: the first call in each fresh process pays a one-off set-up.
        per_probe = statistics.median(g + h for g, h in zip(streamed["gradient"], streamed["hvp"]))
        rows.append(
            [
                f"{c['batch']}x{c['seq']}",
                f"{ref:.2f}",
                f"{grad:.2f} ({grad / ref:.1f}x)",
                f"{hvp:.2f} ({hvp / ref:.1f}x)",
                f"{per_probe:.2f} ({per_probe / ref:.1f}x)",
                " ".join(f"{t:.1f}" for t in c["one"]["hvp"]),
            ]
        )
    return rows


def memory_rows(cells: list[dict[str, Any]], n_batches: int) -> list[list[str]]:
    """One row per cell and run: peak memory and its increase over the model and batches."""
    rows = []
    for c in cells:
        runs = [
            ("forward + backward (reference)", c["reference"]),
            ("Hutchinson, 1 batch", c["one"]),
            (f"Hutchinson, {n_batches} batches streamed", c["streamed"]),
        ]
        if "full" in c:
            runs.append((f"Hutchinson, {n_batches} batches as one", c["full"]))
        for label, run in runs:
            rows.append([f"{c['batch']}x{c['seq']}", label, _gib(run["peak"]), _gib(run["extra"])])
    return rows


def plot(cells: list[dict[str, Any]], path: Any) -> None:
    """Bars of seconds per phase for each cell."""
    fig, ax = new_axes(figsize=(7, 4.5))
    phases = [
        ("forward + backward", lambda c: c["reference"]["seconds"]),
        ("gradient with graph", gradient_median),
        ("HVP", lambda c: statistics.median(c["one"]["hvp"])),
    ]
    width = 0.8 / len(phases)
    for i, (label, get) in enumerate(phases):
        xs = [j + (i - 1) * width for j in range(len(cells))]
        ax.bar(xs, [get(c) for c in cells], width, label=label)
    ax.set_xticks(range(len(cells)), [f"{c['batch']}x{c['seq']}" for c in cells])
    ax.set_xlabel("batch x sequence length")
    ax.set_ylabel("seconds (median)")
    ax.set_title("GPT-2 small (124M), Hutchinson phases vs forward + backward")
    save_figure(fig, ax, path)


def reading(cells: list[dict[str, Any]], n_batches: int) -> str:
    """A few sentences on the numbers: HVP cost ratio and what streaming does to memory."""
    ratios = [statistics.median(c["one"]["hvp"]) / c["reference"]["seconds"] for c in cells]
    mem = [c["streamed"]["extra"] / c["one"]["extra"] for c in cells]
    text = (
        f"- One HVP costs {min(ratios):.1f}-{max(ratios):.1f}x a forward + backward on the same "
        "batch; the gradient with its graph (`create_graph=True`) is paid once per batch visit.\n"
        f"- Streaming {n_batches} batches: peak increase over the model = "
        + ", ".join(f"{m:.2f}x" for m in mem)
        + " the 1-batch run's (same batch shape), so the graph of one batch at a time is held, "
        "never all of them.\n"
    )
    big = max(cells, key=lambda c: c["batch"] * c["seq"])
    grad, hvp = gradient_median(big), statistics.median(big["one"]["hvp"])
    text += (
        f"- At these rates `hutchinson_traces`' defaults (10 to 200 probes) on one "
        f"{big['batch']}x{big['seq']} batch take {(grad + 10 * hvp) / 60:.1f} to "
        f"{(grad + 200 * hvp) / 60:.0f} min on this machine.\n"
    )
    for c in cells:
        if "full" in c:
            text += (
                f"- The same {n_batches} batches of {c['batch']}x{c['seq']} concatenated into "
                f"one graph: +{_gib(c['full']['extra'])} GiB vs +"
                f"{_gib(c['streamed']['extra'])} GiB streamed.\n"
            )
    return text


def report(
    cells: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], argv: list[str]
) -> str:
    """The markdown report."""
    import transformers

    settings = (
        f"GPT-2 small, random init, eager attention: {info['n_params'] / 1e6:.1f}M parameters, "
        f"{info['n_traced'] / 1e6:.1f}M of them traced ({info['n_layers']} layers: every Conv1D "
        f"and lm_head, tied to the token embedding). Device {info['device']}, "
        f"{args.threads} torch thread(s) (`--threads`: two OpenMP threads on a shared 2-core "
        "machine slow down by an order of magnitude whenever another process holds a core); "
        f"torch {torch.__version__}, transformers "
        f"{transformers.__version__}. {args.reps} reference reps, {args.probes} probes on 1 "
        f"batch, {args.batches} batches streamed (1 probe each). Load average (1 min) "
        f"{info['load_start']:.2f} at the start, {info['load_end']:.2f} at the end."
    )
    header = report_header(
        "Hutchinson at 124M parameters: time per HVP and peak memory",
        ["benchmarks/hessian_scale.py", *argv],
        settings,
    )
    times = markdown_table(
        [
            "batch x seq",
            "forward + backward s",
            "gradient with graph s (x ref)",
            "s per HVP (x ref)",
            f"s per probe, {args.batches} batches streamed (x ref)",
            "each HVP, 1 batch (s, in order)",
        ],
        timing_rows(cells),
    )
    memory = markdown_table(
        ["batch x seq", "run", "peak GiB", "increase over model + batches, GiB"],
        memory_rows(cells, args.batches),
    )
    cuda = (
        ""
        if info["device"].startswith("cuda")
        else "- The CUDA path (`--device cuda`, peak by `torch.cuda.max_memory_allocated`) "
        "was not run for this report: no GPU on this machine.\n"
    )
    return (
        f"{header}\n![phases](hessian_scale.png)\n\n## Time (medians)\n\n{times}\n\n"
        "Each run starts in a fresh process, whose first call of a kind pays a one-off set-up "
        "(kernels, first touch of memory): medians are reported, the 1-batch HVPs listed in "
        "order. A probe on streamed batches = gradient with graph + HVP.\n\n"
        f"## Peak memory\n\n{memory}\n\n## Reading\n\n{reading(cells, args.batches)}{cuda}"
    )


def model_sizes() -> dict[str, int]:
    """Parameters of the model, traced layers and their weights' elements."""
    model = build_model(torch.device("cpu"))
    modules = dict(model.named_modules())
    layers = traced_layers(model)
    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_layers": len(layers),
        "n_traced": sum(modules[n].weight.numel() for n in layers),
    }


def main(argv: list[str]) -> None:
    """Measure every cell, print and write the report and plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", nargs="+", default=["2x64", "4x128"], help="BATCHxSEQ")
    parser.add_argument("--probes", type=int, default=3, help="probes on 1 batch (>= 2)")
    parser.add_argument("--batches", type=int, default=3, help="batches streamed (>= 2)")
    parser.add_argument("--reps", type=int, default=3, help="reference forward + backwards")
    parser.add_argument("--full-max-tokens", type=int, default=512)
    # One thread by default: on a shared 2-core machine two OpenMP threads slow down by an order
    # of magnitude whenever another process holds a core; the ratios are the point.
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    info: dict[str, Any] = {"device": args.device, "load_start": os.getloadavg()[0]}
    info.update(model_sizes())
    cells = []
    for cell in args.cells:
        batch, seq = (int(x) for x in cell.split("x"))
        cells.append(measure_cell(batch, seq, args))
    info["load_end"] = os.getloadavg()[0]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(cells, RESULTS_DIR / "hessian_scale.png")
    text = report(cells, args, info, argv)
    (RESULTS_DIR / "hessian_scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
