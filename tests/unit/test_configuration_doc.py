"""docs/configuration.md is generated from `Settings` and names every `GREAM_*` variable in the source tree.

When a test here fails, regenerate the reference with `python -m service.config_doc` (and, for a new
variable read outside `Settings`, add it to `OTHER_VARIABLES` in service/config_doc.py first).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from service.config import RENAMED_VARIABLES, Settings
from service.config_doc import DOC_PATH, env_name, main, render_configuration_markdown

ROOT = Path(__file__).resolve().parents[2]
VARIABLE = re.compile(r"\bGREAM_[A-Z0-9_]+")
# Not the project's sources: version control, environments, caches, build output, local data.
SKIPPED_DIRS = {".git", ".venv", "venv", ".cache", ".pytest_cache", ".ruff_cache", ".mypy_cache",
                "__pycache__", "node_modules", "var", "build", "dist"}
SKIPPED_TOP_DIRS = {"tests", "docs"}
LARGEST_TEXT_FILE = 2 * 1024 * 1024


def source_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")
                         and not (d.startswith(".") and d != ".ci")  # tool caches (.hypothesis, ...)
                         and not (here == ROOT and d in SKIPPED_TOP_DIRS))
        files.extend(here / name for name in sorted(names))
    return files


def variables_in_sources() -> dict[str, list[str]]:
    """Every `GREAM_*` name in a text file of the source tree, with the files that mention it."""
    found: dict[str, list[str]] = {}
    for path in source_files():
        if path.stat().st_size > LARGEST_TEXT_FILE:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        for name in set(VARIABLE.findall(data.decode("utf-8", errors="ignore"))):
            found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def test_the_committed_reference_is_current() -> None:
    assert DOC_PATH.is_file(), "docs/configuration.md is missing: run `python -m service.config_doc`"
    assert DOC_PATH.read_text(encoding="utf-8") == render_configuration_markdown(), (
        "docs/configuration.md is out of date: run `python -m service.config_doc`")


def test_generation_is_deterministic() -> None:
    assert render_configuration_markdown() == render_configuration_markdown()


def test_check_mode_agrees(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    assert main(["--check", "--out", str(out)]) == 1
    assert main(["--out", str(out)]) == 0
    assert main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    assert main(["--check", "--out", str(out)]) == 1


def test_every_setting_has_a_described_row() -> None:
    text = render_configuration_markdown()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} needs a description"
        assert f"| `{env_name(name, field)}` | `{name}` |" in text


def test_every_variable_in_the_source_tree_is_documented() -> None:
    documented = set(VARIABLE.findall(DOC_PATH.read_text(encoding="utf-8")))
    found = variables_in_sources()
    assert "GREAM_BUNDLE" in found, "the scan found nothing: is ROOT the repository root?"
    # A name ending in "_" is a family (`GREAM_LOAD_*`): covered when a documented name starts with it.
    missing = {name: files for name, files in found.items()
               if name not in documented
               and not (name.endswith("_") and any(d.startswith(name) for d in documented))}
    assert not missing, f"GREAM_* variables missing from docs/configuration.md: {missing}"


def test_no_source_sets_a_renamed_variable() -> None:
    """`gream serve` refuses to start while an old name is set: nothing in the tree may still use one."""
    found = variables_in_sources()
    stale = {old: [f for f in found.get(old, []) if f != "service/config.py"] for old in RENAMED_VARIABLES}
    stale = {old: files for old, files in stale.items() if files}
    assert not stale, f"renamed GREAM_* variables still used (see docs/configuration.md): {stale}"
