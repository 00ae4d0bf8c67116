"""Interaction data in the shared layout: train.jsonl (user_id, item_ids), valid/test.jsonl
(user_id, history, target). Item ids are kept as strings, the catalog's own ids."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EvalRow:
    user_id: str
    history: list[str]
    target: str


@dataclass
class InteractionData:
    train: dict[str, list[str]]  # user -> chronological item ids
    valid: list[EvalRow]
    test: list[EvalRow]

    @classmethod
    def load(cls, folder: str | Path) -> InteractionData:
        folder = Path(folder)
        train = {str(r["user_id"]): [str(i) for i in r["item_ids"]] for r in _read(folder / "train.jsonl")}
        return cls(train=train, valid=_rows(folder / "valid.jsonl"), test=_rows(folder / "test.jsonl"))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / "train.jsonl", ({"user_id": u, "item_ids": s} for u, s in self.train.items()))
        for name, rows in (("valid", self.valid), ("test", self.test)):
            _write(folder / f"{name}.jsonl",
                   ({"user_id": r.user_id, "history": r.history, "target": r.target} for r in rows))


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"missing interaction file {path}")
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _rows(path: Path) -> list[EvalRow]:
    return [EvalRow(str(r["user_id"]), [str(i) for i in r["history"]], str(r["target"])) for r in _read(path)]


def _write(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def next_item_windows(sequence: Sequence[str], max_history: int, min_history: int = 1
                      ) -> list[tuple[list[str], str]]:
    """(history, next item) pairs for every position of a chronological sequence."""
    return [(list(sequence[max(0, t - max_history): t]), sequence[t])
            for t in range(min_history, len(sequence))]
