"""The recipe's typed config: presets load from their TOML files, overrides come from a file, inline
JSON or a dict laid onto a base preset, and a key the recipe does not know is an error naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_store.prior import PriorSettings
from training.config import (
    STAGE_ORDER,
    RecipeConfig,
    RecipeConfigError,
    load_config,
    preset_data,
    preset_names,
)


def test_the_shipped_presets() -> None:
    assert preset_names() == ["demo", "small", "tiny"]


@pytest.mark.parametrize("name", ["demo", "small", "tiny"])
def test_each_preset_loads_with_the_values_its_file_states(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, RecipeConfig)
    assert cfg.to_dict() == preset_data(name)  # nothing dropped, nothing added
    assert all(cfg.budget.share(stage) > 0 for stage in STAGE_ORDER)


def test_no_spec_means_the_small_preset() -> None:
    assert load_config(None) == load_config("small")


@pytest.mark.parametrize("raw,key", [
    ({"base": "tiny", "bogus": 1}, "'bogus'"),
    ({"base": "tiny", "align": {"epoch": 3}}, "'align.epoch'"),
    ({"base": "tiny", "align": {"weights": {"sequentail": 2.0}}}, "'align.weights.sequentail'"),
    ({"base": "tiny", "backbone": {"scratch": {"hidden_sz": 64}}}, "'backbone.scratch.hidden_sz'"),
    ({"base": "tiny", "backbone": {"lora": {"rank": 8}}}, "'backbone.lora.rank'"),
    # The recipe sets SRPO's time share itself: setting it in the config would do nothing.
    ({"base": "tiny", "srpo": {"max_minutes": 3}}, "'srpo.max_minutes'"),
])
def test_an_unknown_key_is_an_error_that_names_it(raw: dict, key: str) -> None:
    with pytest.raises(RecipeConfigError, match=f"unknown key {key}"):
        load_config(raw)


def test_a_near_miss_suggests_the_key_meant() -> None:
    with pytest.raises(RecipeConfigError, match="did you mean 'align.epochs'"):
        load_config({"base": "tiny", "align": {"epoch": 3}})


def test_a_wrong_value_is_an_error_that_names_its_key() -> None:
    with pytest.raises(RecipeConfigError, match="align.lr"):
        load_config({"base": "tiny", "align": {"lr": "fast"}})
    with pytest.raises(RecipeConfigError, match="srpo.mode"):
        load_config({"base": "tiny", "srpo": {"mode": "sideways"}})


def test_an_unknown_base_or_missing_file_is_an_error() -> None:
    with pytest.raises(RecipeConfigError, match="'huge' is not a preset"):
        load_config({"base": "huge"})
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_config("no/such/config.toml")


def test_a_toml_file_overrides_its_base_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('base = "tiny"\nthreads = 1\n[align]\nmax_steps = 6\n[align.weights]\nsequential = 2.0\n')
    cfg = load_config(str(path))
    tiny = load_config("tiny")
    assert cfg.threads == 1 and cfg.align.max_steps == 6 and cfg.align.weights.sequential == 2.0
    # Keys the file leaves out keep the base's values, inside the tables it overrides too.
    assert cfg.align.lr == tiny.align.lr and cfg.align.weights.text_to_id == tiny.align.weights.text_to_id
    assert cfg.srpo == tiny.srpo
    assert cfg.to_dict()["align"]["max_steps"] == 6 and "base" not in cfg.to_dict()


def test_a_json_file_inline_json_and_a_dict_agree(tmp_path: Path) -> None:
    raw = {"base": "demo", "seed": 3, "eval": {"valid_rows": 8}, "srpo": {"steps": 2}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    from_file, inline, from_dict = load_config(str(path)), load_config(json.dumps(raw)), load_config(raw)
    assert from_file == inline == from_dict
    assert (from_file.seed, from_file.eval.valid_rows, from_file.srpo.steps) == (3, 8, 2)
    assert from_file.eval.beams == load_config("demo").eval.beams


def test_a_file_without_base_overrides_small(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[reason]\nlr = 1e-4\n")
    cfg = load_config(str(path))
    assert cfg.reason.lr == 1e-4 and cfg.align == load_config("small").align


def test_an_unknown_key_in_a_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('base = "tiny"\n[eval]\nvalid_row = 8\n')
    with pytest.raises(RecipeConfigError, match="unknown key 'eval.valid_row'"):
        load_config(str(path))


def test_a_config_is_frozen() -> None:
    cfg = load_config("tiny")
    with pytest.raises(ValueError):
        cfg.seed = 1  # type: ignore[misc]


def test_prior_section_gives_the_prior_settings_it_states() -> None:
    section = load_config({"base": "tiny", "prior": {"fusion": "product", "strength": 4.0}}).prior
    assert section.settings() == PriorSettings(fusion="product", strength=4.0, mixture_weight=0.8, floor=0.02)
    assert load_config("small").prior.settings().mixture_weight == 0.95


def test_selection_on_valid_rows_needs_the_hold_out() -> None:
    from training.config import RecipeConfigError, load_config

    with pytest.raises(RecipeConfigError, match="holdout_valid"):
        load_config({"base": "small", "select_on_valid": True})
    assert load_config({"base": "small", "select_on_valid": True, "holdout_valid": True}).select_on_valid
