"""The figure of ``benchmarks/latency_search.py``: the fronts against measured latency and
file size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _common import new_axes
from _latency_search_fronts import pareto_front
import numpy as np


def plot_fronts(
    bench: Any,
    fronts: dict[str, Any],
    points: dict[str, Any],
    baselines: list[str],
    path: Path,
) -> None:
    """Metric against measured latency at each batch and against ONNX file size: both
    searches' fronts (the configurations non-dominated in each plane joined by their
    staircase) and the FP32 and uniform baselines; saved to ``path``.

    Args:
        bench: The task's :class:`~_latency_search_tasks.Bench` (batches, metric, title).
        fronts: Search -> {configuration key: configuration} of its front.
        points: Configuration key (or baseline name) -> what was measured of its model.
        baselines: The keys of ``points`` that are baselines.
        path: The PNG file to write.
    """
    first, *others = bench.batches
    panels = [
        (f"b{first}", f"measured ms, batch {first} (onnxruntime CPU, 1 thread)"),
        *((f"b{b}", f"measured ms, batch {b}") for b in others),
    ]
    # Files of tens of MB read in MB, on a linear axis; the digits CNN's KB on a log one.
    in_mb = points["FP32"]["file_kb"] > 10_000
    panels.append(("file_kb", "ONNX file, MB" if in_mb else "ONNX file, KB"))
    fig, axes = new_axes((13.5, 4.2), ncols=len(panels))
    colors = {"latency-aware": "tab:red", "size-only": "tab:blue"}
    markers = {"FP32": "s", "uniform 8-bit": "^", "uniform 4-bit": "v"}

    def cost(point: dict[str, Any], field: str) -> float:
        if field == "file_kb":
            return point[field] / 1024 if in_mb else point[field]
        return point[field]["measured_ms"]

    for ax, (field, xlabel) in zip(axes, panels):
        for name, front in fronts.items():
            good = [points[k] for k in front]
            x = np.array([cost(p, field) for p in good])
            y = np.array([p["accuracy"] for p in good])
            # Solid: the configurations non-dominated in this plane, joined by their staircase.
            best = sorted(pareto_front(np.column_stack([x, -y])), key=lambda i: x[i])
            ax.scatter(x, y, s=12, color=colors[name], alpha=0.3)
            ax.scatter(x[best], y[best], s=22, color=colors[name], label=f"{name} front")
            ax.step(x[best], y[best], where="post", color=colors[name], lw=1.2)
        for key in baselines:
            p = points[key]
            ax.scatter(
                cost(p, field),
                p["accuracy"],
                marker=markers[key],
                s=50,
                color="black",
                facecolors="none" if key != "FP32" else "black",
                label=key,
            )
        if field == "file_kb" and not in_mb:
            ax.set_xscale("log")  # FP32 is ten times the quantized files
            ax.set_xticks([15, 20, 30, 50, 100, 200], ["15", "20", "30", "50", "100", "200"])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(bench.metric)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"{bench.title}: the searches' Pareto fronts, exported and timed again",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
