"""`gream demo` (the first step of `make run`) end to end, at a small size: a servable bundle whose
model decodes valid items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_store.bundle import load_bundle
from service.cli import main


@pytest.mark.slow
def test_demo_builds_a_servable_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--items", "200", "--users", "150", "--minutes", "1.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"popularity", "last-item transitions", "SFT (direct)"} <= set(report["valid"])
    bundle = load_bundle(out)
    assert bundle.has_model and len(bundle.items) == 200
    assert (tmp_path / "demo-data" / "test.jsonl").is_file()
    # --if-missing leaves an existing bundle alone (what `make run` relies on)
    assert main(["demo", "--out", str(out), "--if-missing"]) == 0
    assert load_bundle(out).version == bundle.version

    from transformers import AutoTokenizer

    from model_store.model import load_bundle_model
    from model_store.tokens import direct_prompt, id_token_ids
    from service.engine.shared_prefix import make_decoder

    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path))
    decoder = make_decoder(load_bundle_model(bundle.model_path), tok, bundle.trie,
                           id_token_ids(tok, bundle.id_format))
    items = decoder.topk([direct_prompt([bundle.spelled_id(0), bundle.spelled_id(1)])], [10], [10])[0]
    assert len({s.index for s in items}) == 10
