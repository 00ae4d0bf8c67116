"""PNG of a `gream eval` report: a handful of bars, all measured on the same rows.

Two panels (HR@10, NDCG@10), one horizontal bar per row: the served configuration first (dark), each
stage's LM alone in direct mode, the collaborative prior alone and the baselines, the best baseline
marked. Rows measured on a subset (reasoning mode with --reasoning-limit) are left to the report's
second table, so nothing on the plot compares different rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.evaluate import PRIOR_ALONE

METRICS = ("HR@10", "NDCG@10")
BASELINES = ("weighted transitions", "SASRec", "last-item transitions", "popularity")


def plot_rows(report: dict[str, Any]) -> list[str]:
    """The rows the plot shows, top to bottom."""
    metrics = report["metrics"]
    served = [report["served"]] if report.get("served") in metrics else []
    alone = [n for n, m in metrics.items() if n.endswith("(direct)") and "+prior" not in n and "rows" not in m]
    others = [n for n in (PRIOR_ALONE, *BASELINES) if n in metrics]
    return served + alone + others


def plot_report(report: dict[str, Any], out: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["metrics"]
    names = plot_rows(report)
    baselines = [n for n in BASELINES if n in metrics]
    best = max(baselines, key=lambda n: metrics[n]["NDCG@10"]) if baselines else None
    colors = ["#1f4e79" if n == report.get("served") else "#d62728" if n == best else
              "#7fa7d1" if n.endswith("(direct)") else "#b0b0b0" for n in names]
    labels = [f"{n}  [best baseline]" if n == best else n for n in names]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 0.45 * len(names) + 1.6), sharey=True)
    for ax, metric in zip(axes, METRICS, strict=True):
        values = [metrics[n].get(metric, float("nan")) for n in names]
        y = list(range(len(names)))[::-1]
        ax.barh(y, values, color=colors, edgecolor="black", linewidth=0.4)
        for yy, v in zip(y, values, strict=True):
            ax.annotate(f"{v:.4f}", (v, yy), va="center", fontsize=8, xytext=(3, 0), textcoords="offset points")
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_title(metric)
        ax.set_xlim(0, max(values) * 1.2 if values else 1)
    fig.suptitle(title or f"{report.get('split', 'test')}: {report.get('rows', 0):,} rows, every bar on the same rows")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
