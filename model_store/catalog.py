"""Catalog ingestion: JSON Lines in, validated items out, every bad row reported by line number."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

TEXT_FIELDS: tuple[str, ...] = ("title", "brand", "categories", "description")


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    description: str = ""
    brand: str = ""
    categories: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class RowProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class CatalogError(ValueError):
    """The catalog has bad rows; `problems` lists every one of them, not only the first."""

    def __init__(self, source: str, problems: Sequence[RowProblem], max_shown: int = 20):
        self.source = source
        self.problems = list(problems)
        shown = "\n  ".join(str(p) for p in self.problems[:max_shown])
        more = len(self.problems) - max_shown
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{source}: {len(self.problems)} bad row(s), nothing was built:\n  {shown}{tail}")


def _text(value: object, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        # Category paths often come as lists: keep their order, join them readably.
        return " > ".join(v.strip() for v in value if v.strip())
    raise TypeError(f"field '{field}' must be a string (or a list of strings), got {type(value).__name__}")


def parse_catalog(lines: Iterable[str], source: str = "<catalog>") -> list[Item]:
    """Parse JSON Lines into items. Unknown fields are ignored; blank lines are skipped.

    Raises CatalogError listing every broken row (bad JSON, no title, bad or duplicate item_id).
    """
    items: list[Item] = []
    problems: list[RowProblem] = []
    first_seen: dict[str, int] = {}
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(RowProblem(line_no, f"broken JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(row, dict):
            problems.append(RowProblem(line_no, "a row must be a JSON object"))
            continue
        raw_id = row.get("item_id")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == "":
            problems.append(RowProblem(line_no, "field 'item_id' must be a non-empty string or an integer"))
            continue
        item_id = str(raw_id).strip()
        try:
            fields = {f: _text(row.get(f), f) for f in TEXT_FIELDS}
        except TypeError as exc:
            problems.append(RowProblem(line_no, str(exc)))
            continue
        if not fields["title"]:
            problems.append(RowProblem(line_no, f"item '{item_id}' has no title"))
            continue
        if item_id in first_seen:
            problems.append(RowProblem(line_no, f"duplicate item_id '{item_id}' (first on line {first_seen[item_id]})"))
            continue
        first_seen[item_id] = line_no
        items.append(Item(item_id=item_id, **fields))
    if problems:
        raise CatalogError(source, problems)
    if not items:
        raise CatalogError(source, [RowProblem(0, "the catalog has no items")])
    return items


def read_catalog(path: str | Path) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"catalog file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        return parse_catalog(fh, source=str(path))


def write_catalog(items: Iterable[Item], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        fh.writelines(item.to_json() + "\n" for item in items)


def fused_text(item: Item, fields: Sequence[str] = TEXT_FIELDS, max_chars: int = 1000) -> str:
    """The text an item is embedded from: the configured fields, labelled, in the configured order."""
    unknown = set(fields) - set(TEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown text field(s) {sorted(unknown)}; choose from {TEXT_FIELDS}")
    parts = [f"{f}: {getattr(item, f)}" for f in fields if getattr(item, f)]
    return ". ".join(parts)[:max_chars]
