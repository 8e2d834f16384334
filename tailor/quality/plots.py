"""Pictures for the report: what a plan keeps (layers × heads), and quality vs budget."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tailor.rewriter.graph import TransformerGraph  # noqa: E402


def plan_picture(graph: TransformerGraph, rewrites: list[dict], path: Path, length: int = 1024) -> None:
    """Rows are layers; columns the query heads, then the FFN's width. Kept = dark; a head with
    an attention pattern is shaded by the fraction of attention it keeps at `length` tokens."""
    from tailor.core.patterns import Pattern, density

    heads = max(b.attn.num_heads for b in graph.blocks)
    grid = np.ones((graph.num_layers, heads + 1))
    for r in (r for r in rewrites if r["layer"] < graph.num_layers):  # not the LM head's INT8
        layer, b = r["layer"], graph.blocks[r["layer"]]
        q_per = b.attn.num_heads // b.attn.num_kv_heads
        if r["pass"] == "layer_skip":
            grid[layer, :] = 0
        elif r["pass"] == "ffn_skip":
            grid[layer, heads] = 0
        elif r["pass"] == "ffn_prune":
            grid[layer, heads] = len(r["choice"]["channels"]) / b.ffn.width
        elif r["pass"] == "head_prune":
            grid[layer, :heads] = 0
            for g, qs in zip(r["choice"]["kv_heads"], r["choice"]["queries"]):
                for q in qs:
                    grid[layer, g * q_per + q] = 1
        elif r["pass"] == "attn_pattern":
            for g, span in enumerate(r["choice"]["spans"]):
                grid[layer, g * q_per:(g + 1) * q_per] = density([Pattern.from_json(span)], length,
                                                                  b.attn.causal)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * (heads + 1), 1 + 0.35 * graph.num_layers))
    ax.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(heads + 1), [f"h{i}" for i in range(heads)] + ["FFN"])
    ax.set_yticks(range(graph.num_layers), [f"layer {i}" for i in range(graph.num_layers)])
    ax.set_title(f"kept by the plan (FFN: fraction of channels; heads: of attention at {length})")
    for r in rewrites:
        if r["pass"] == "kv_share":
            ax.text(-0.45, r["layer"], f"KV←{r['choice']['source']}", ha="left", va="center", fontsize=7,
                    color="crimson")
    for (i, j), v in np.ndenumerate(grid):
        if 0 < v < 1:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_plot(points: list[dict], path: Path, metric: str) -> None:
    """points: {"budget", "method", metric}; one line per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({p["method"] for p in points}):
        pts = sorted((p["budget"], p[metric]) for p in points if p["method"] == method
                     and p.get(metric) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method, linewidth=2.5 if method == "tailor" else 1)
    ax.set_xlabel("budget (cost ratio)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
