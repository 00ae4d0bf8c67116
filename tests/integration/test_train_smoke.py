"""`gream train` end to end on a tiny synthetic catalog: a few steps of every stage (align, the
five-stage reasoning curriculum, SRPO), then the bundle serves valid top-k and `gream eval` reports
every stage in both modes with the baselines and a plot. Under 3 minutes on 2 busy cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main

SMOKE_CONFIG = {
    "base": "tiny",
    "threads": 1,  # on 2 shared cores one thread beats two contending ones
    "align": {"max_steps": 6, "batch_size": 16},
    "reason": {"max_steps": 1, "batch_size": 8, "max_examples": 40},
    "srpo": {"steps": 2, "group_size": 4, "prompts_per_step": 4},
    "eval": {"valid_rows": 8, "reasoning_rows": 2, "reasoning_tokens": 16},
}


@pytest.mark.slow
def test_train_then_serve_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.demo_data import DemoConfig, write_demo_data

    data = write_demo_data(tmp_path / "data", DemoConfig(items=96, users=60, min_len=4, max_len=8))
    cfg = tmp_path / "smoke.json"
    cfg.write_text(json.dumps(SMOKE_CONFIG))
    out = tmp_path / "bundle"
    assert main(["train", "--data", str(data), "--out", str(out), "--config", str(cfg), "--max-minutes", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["timings"]) >= {"prepare_s", "align_s", "reason_s", "srpo_s", "total_s"}

    # The bundle is servable: load it like the service does and get valid top-k items.
    from transformers import AutoTokenizer

    from model_store import tokens
    from model_store.bundle import load_bundle
    from model_store.model import load_bundle_model
    from service.engine.shared_prefix import make_decoder

    bundle = load_bundle(out)
    stats = bundle.manifest["stats"]["training"]
    assert stats["stages"] == ["align", "reason", "srpo"]
    assert len(stats["stage_stats"]["reason"]["substages"]) == 5
    assert stats["stage_stats"]["srpo"]["steps"] >= 1
    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path))
    decoder = make_decoder(load_bundle_model(bundle.model_path), tok, bundle.trie,
                           tokens.id_token_ids(tok, bundle.id_format))
    prompt = tokens.direct_prompt([bundle.spelled_id(i) for i in (0, 5, 9)])
    [top] = decoder.topk([prompt], [10], [20])
    assert len(top) == 10 and len({s.index for s in top}) == 10
    assert all(0 <= s.index < len(bundle.items) for s in top)

    # One eval run: every stage, both modes, baselines, JSON report and PNG plot.
    report, plot = tmp_path / "report.json", tmp_path / "plot.png"
    assert main(["eval", "--bundle", str(out), "--data", str(data), "--mode", "both", "--with-stages",
                 "--limit", "12", "--reasoning-limit", "3", "--reasoning-tokens", "16",
                 "--report", str(report), "--plot", str(plot)]) == 0
    metrics = json.loads(report.read_text())["metrics"]
    assert {"SFT (direct)", "+curriculum (direct)", "+curriculum (reasoning)", "+SRPO (direct)",
            "+SRPO (reasoning)", "popularity", "last-item transitions"} <= set(metrics)
    # The bundle ships the collaborative prior; eval reports each stage fused with it as well.
    assert bundle.prior is not None and bundle.prompt_history == SMOKE_CONFIG.get("align", {}).get("max_history", 10)
    assert {"SFT +prior (direct)", "+SRPO +prior (direct)", "+SRPO +prior (reasoning)",
            "collaborative prior alone"} <= set(metrics)
    assert plot.stat().st_size > 5000 and plot.read_bytes()[:4] == b"\x89PNG"

    # Refit the prior into a new version (same model), then tune it on valid rows.
    refit = tmp_path / "refit"
    assert main(["prior", "--bundle", str(out), "--data", str(data), "--out", str(refit), "--strength", "0.5"]) == 0
    capsys.readouterr()
    again = load_bundle(refit)
    assert again.prior is not None and again.version != bundle.version
    assert (again.prior.settings.fusion, again.prior.settings.strength) == ("product", 0.5)  # --strength: product
    # --with-stages gives every stage snapshot the refitted prior; the bundle's fusion stays when not given.
    staged = tmp_path / "staged"
    assert main(["prior", "--bundle", str(refit), "--data", str(data), "--out", str(staged), "--with-stages"]) == 0
    capsys.readouterr()
    from training.stages.validation import stage_bundle_paths

    staged_bundle = load_bundle(staged)
    assert staged_bundle.prior is not None and staged_bundle.prior.settings == again.prior.settings
    snapshots = stage_bundle_paths(staged_bundle)
    assert set(snapshots) == {"align", "reason", "srpo"} and all(p.parent == Path(f"{staged}.stages") for p in snapshots.values())
    assert all(load_bundle(p).prior.settings == again.prior.settings for p in snapshots.values())
    assert main(["eval", "--bundle", str(refit), "--data", str(data), "--split", "valid", "--limit", "8",
                 "--no-sasrec", "--prior-strengths", "0.5,2", "--prior-mixtures", "0.7", "--report", str(report)]) == 0
    tuned = json.loads(report.read_text())
    assert tuned["split"] == "valid"
    assert {"model (direct)", "model +prior(strength=0.5, floor=0.02) (direct)",
            "model +prior(strength=2, floor=0.02) (direct)",
            "model +prior(mixture=0.7, floor=0.02) (direct)"} <= set(tuned["metrics"])

    # Baselines alone, no bundle (a new dataset, before training); a bundle is otherwise required.
    assert main(["eval", "--data", str(data), "--baselines-only", "--no-sasrec", "--report", str(report)]) == 0
    alone = json.loads(report.read_text())
    assert alone["bundle"] is None and {"popularity", "weighted transitions"} <= set(alone["metrics"])
    assert not any("model" in name for name in alone["metrics"])
    assert main(["eval", "--data", str(data)]) == 2
