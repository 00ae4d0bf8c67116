"""PNG of an evaluation report: HR@10 and NDCG@10 by stage (SFT, +curriculum, +SRPO) and baselines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

ORDER = ("SFT", "+curriculum", "+SRPO", "model")


def _sort_key(name: str) -> tuple[int, int, str]:
    stage = next((i for i, s in enumerate(ORDER) if name.startswith(s)), len(ORDER))
    mode = 1 if "reasoning" in name else 0
    return (stage, mode, name)


def plot_report(metrics: dict[str, dict[str, float]], out: str | Path, metric_names: Sequence[str] = ("HR@10", "NDCG@10"),
                title: str = "GREAM recipe: test metrics by stage") -> Path:
    """Grouped bars, one group per metric: model rows (by stage, direct then reasoning), then baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = sorted([n for n in metrics if "(" in n or n in ORDER], key=_sort_key)
    baselines = [n for n in metrics if n not in models]
    names = models + baselines
    x = np.arange(len(metric_names))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(names) + 3), 4.5))
    cmap = plt.get_cmap("viridis", max(2, len(models)))
    for i, name in enumerate(names):
        values = [metrics[name].get(m, float("nan")) for m in metric_names]
        color = cmap(i) if name in models else ("#bbbbbb" if i % 2 else "#888888")
        hatch = "//" if "reasoning" in name else None
        # Rows measured on fewer rows than the rest (reasoning mode's --reasoning-limit) say so.
        label = f"{name} [{int(metrics[name]['rows']):,} rows]" if "rows" in metrics[name] else name
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=label, color=color, hatch=hatch,
                      edgecolor="black", linewidth=0.4)
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=6,
                        rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, list(metric_names))
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_from_report(report: dict[str, Any], out: str | Path) -> Path:
    return plot_report(report["metrics"], out)
