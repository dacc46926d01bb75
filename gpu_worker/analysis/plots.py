"""The report's PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..traces import Trace
from .learned import LearnedResult
from .stats import Accuracy


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def hit_rate_figure(t: Trace, budgets: list[int], curves: dict[tuple[str, str], list[float]],
                    allocations: Sequence[str], learned: LearnedResult | None):
    """One panel per allocation; the learned allocation's point (a star) on the first; one legend, on the
    right panel, with every panel's entries."""
    plt = _plt()
    total = t.num_layers * t.num_experts
    fig, axes = plt.subplots(1, len(allocations), figsize=(5.2 * len(allocations), 4), sharey=True, squeeze=False)
    x = [100 * q / total for q in budgets]
    for k, (ax, al) in enumerate(zip(axes[0], allocations)):
        for (a, pol), ys in curves.items():
            if a != al:
                continue
            style = dict(color="black", linestyle="--", linewidth=2) if pol == "belady" else {}
            ax.plot(x, ys, marker="o", markersize=3, label=pol, **style)
        if learned is not None and k == 0:  # its own allocation: shown once
            ax.scatter([100 * learned.total_slots / total], [learned.compared["learned"]], marker="*", s=120,
                       color="crimson", zorder=5, label=f"learned allocation ({learned.policy})")
        ax.set_title(f"{al}")
        ax.set_xlabel("budget (% of all experts)")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("hit rate")
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[0][-1].legend(list(handles.values()), list(handles), fontsize=8, loc="lower right")
    fig.suptitle(f"{t.name}: hit rate vs budget (worker replay)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_hit_rates(path: Path, t: Trace, budgets: list[int], curves: dict[tuple[str, str], list[float]],
                   allocations: Sequence[str], learned: LearnedResult | None) -> Path:
    fig = hit_rate_figure(t, budgets, curves, allocations, learned)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_popularity(path: Path, t: Trace, pop: np.ndarray) -> Path:
    plt = _plt()
    share = pop / np.maximum(pop.sum(axis=1, keepdims=True), 1)
    L, E = share.shape
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.35 * E), min(10, 1.5 + 0.3 * L)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(L))
    ax.set_yticklabels([str(x) for x in t.layer_ids], fontsize=7)
    fig.colorbar(im, ax=ax, label="share of the layer's assignments")
    ax.set_title(f"{t.name}: expert popularity per layer (uniform = {1 / E:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reuse(path: Path, t: Trace, dists: list[np.ndarray]) -> Path:
    plt = _plt()
    E = t.num_experts
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = np.arange(0, E + 1)
    cmap = plt.get_cmap("viridis")
    for col, d in enumerate(dists):
        if not len(d):
            continue
        ys = [(d < x).mean() for x in xs]
        ax.plot(xs, ys, color=cmap(col / max(1, len(dists) - 1)), linewidth=1.2,
                label=f"layer {t.layer_ids[col]}" if len(dists) <= 12 or col % max(1, len(dists) // 8) == 0 else None)
    ax.set_xlabel("reuse distance d (distinct other experts since the last use)")
    ax.set_ylabel("P(distance < d) = LRU hit rate with d slots")
    ax.set_title(f"{t.name}: reuse-distance CDF per layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(path: Path, t: Trace, accs: list[Accuracy]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.arange(t.num_layers)
    for a in accs:
        ax.plot(x, a.recall, marker="o", markersize=3, label=f"{a.name}: recall@{a.width}")
        ax.plot(x, a.strict, marker="x", markersize=3, linestyle=":", label=f"{a.name}: strict top-k")
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in t.layer_ids], fontsize=7)
    ax.set_xlabel("MoE layer predicted")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{t.name}: prediction accuracy per layer (decode rows)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_transitions(path: Path, t: Trace, tr: np.ndarray) -> Path:
    plt = _plt()
    n = tr.shape[0]
    show = list(range(n)) if n <= 8 else sorted(set(np.linspace(0, n - 1, 8).astype(int).tolist()))
    cols = min(4, max(1, len(show)))
    rows = math.ceil(len(show) / cols) if show else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, col in zip(axes.ravel(), show):
        m = tr[col].astype(np.float64)
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(m, cmap="magma", vmin=0, vmax=max(0.05, float(m.max())), interpolation="nearest")
        ax.set_title(f"{t.layer_ids[col]} -> {t.layer_ids[col + 1]}", fontsize=8)
        ax.set_xlabel("expert at next layer", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.axis("on")
    fig.suptitle(f"{t.name}: P(expert at layer l+1 | expert at layer l)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_entropy(path: Path, t: Trace, ent: dict[str, np.ndarray]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.arange(t.num_layers)
    ax.plot(x, ent["usage"], marker="o", label="usage entropy / log E")
    if "weights" in ent:
        ax.plot(x, ent["weights"], marker="s", label="top-k weight entropy / log K")
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in t.layer_ids], fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("MoE layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{t.name}: router entropy per layer (1 = uniform)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
