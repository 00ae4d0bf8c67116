"""`gream demo`: synthetic data (training.demo_data), then the GREAM recipe with its `demo` preset, so the
demo bundle is trained exactly as real bundles are, only smaller: a servable bundle in minutes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.demo_data import DemoConfig, write_demo_data


def build_demo(out: str | Path, data_dir: str | Path | None = None, cfg: DemoConfig | None = None,
               max_minutes: float = 2.5, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    from training.baselines import baseline_rows
    from training.data import InteractionData
    from training.evaluate import format_table
    from training.recipe import run_recipe

    cfg = cfg or DemoConfig()
    out = Path(out)
    data_dir = Path(data_dir) if data_dir else out.parent / f"{out.name}-data"
    t0 = time.perf_counter()
    log(f"[demo] synthetic data ({cfg.items} items, {cfg.users} users) -> {data_dir}")
    write_demo_data(data_dir, cfg)
    path, stats = run_recipe(data_dir, out, config="demo", max_minutes=max_minutes, log=log)
    data = InteractionData.load(data_dir)
    rows = data.valid[: int(stats["valid_rows"])]
    table = {**stats["valid"], **baseline_rows(data.train, rows)}
    log(f"[demo] valid rows ({len(rows)}), model and baselines:\n{format_table(table)}")
    report = {"valid": table, "wall_s": time.perf_counter() - t0, "bundle": str(path)}
    (data_dir / "demo_report.json").write_text(json.dumps(report, indent=2))
    return path, report
