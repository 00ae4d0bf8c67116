"""A serving image ships no `training/`: the gateway and the `gream` CLI must work without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.abc, sys

class NoTrainer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "training" or name.startswith("training."):
            raise ImportError(f"no trainer in this image: {name}")
        return None

sys.meta_path.insert(0, NoTrainer())
import service.app, service.engine_settings, service.engine.factory, service.engine.process
from service.cli import build_parser

commands = build_parser()._subparsers._group_actions[0].choices
print(" ".join(sorted(commands)))
"""


def test_the_gateway_and_cli_import_without_the_trainer() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    commands = set(result.stdout.split())
    assert {"serve", "bundle", "registry"} <= commands
    assert "train" not in commands
