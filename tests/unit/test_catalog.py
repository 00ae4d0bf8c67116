"""Catalog ingestion: every bad row reported with its line number, nothing dropped silently."""

from __future__ import annotations

import json

import pytest

from model_store.catalog import CatalogError, Item, fused_text, parse_catalog, read_catalog, write_catalog


def rows(*objs: object) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objs]


def problems_of(lines: list[str]) -> dict[int, str]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(lines, source="cat.jsonl")
    return {p.line: p.message for p in info.value.problems}


def test_good_rows_with_int_and_string_ids() -> None:
    items = parse_catalog(rows({"item_id": 7, "title": "Hammer"}, {"item_id": "B00X", "title": " Saw "}))
    assert [it.item_id for it in items] == ["7", "B00X"]
    assert items[1].title == "Saw"
    assert items[0] == Item(item_id="7", title="Hammer")


def test_unknown_fields_ignored_and_optional_fields_kept() -> None:
    (item,) = parse_catalog(rows({"item_id": 1, "title": "Drill", "brand": "Acme", "description": "Fast.",
                                  "price": 12.5, "rating": {"stars": 4}, "extra": [1, 2]}))
    assert item == Item(item_id="1", title="Drill", description="Fast.", brand="Acme", categories="")


def test_list_categories_are_joined_in_order() -> None:
    (item,) = parse_catalog(rows({"item_id": 1, "title": "T", "categories": ["Tools", " Power ", "", "Drills"]}))
    assert item.categories == "Tools > Power > Drills"


def test_null_optional_fields_are_empty() -> None:
    (item,) = parse_catalog(rows({"item_id": 1, "title": "T", "brand": None, "description": None}))
    assert item.brand == "" and item.description == ""


def test_blank_lines_skipped_and_line_numbers_count_them() -> None:
    lines = ["", json.dumps({"item_id": 1, "title": "A"}), "   ", "\n", "{broken", json.dumps({"item_id": 2})]
    assert problems_of(lines).keys() == {5, 6}
    ok = parse_catalog(["\n", json.dumps({"item_id": 1, "title": "A"}), "  \n"])
    assert len(ok) == 1


def test_broken_json_reported_with_line() -> None:
    found = problems_of(rows({"item_id": 1, "title": "A"}, '{"item_id": 2, "title": "B"', "not json"))
    assert set(found) == {2, 3}
    assert all("broken JSON" in m for m in found.values())


def test_missing_or_blank_title() -> None:
    found = problems_of(rows({"item_id": 1, "title": "A"}, {"item_id": 2}, {"item_id": 3, "title": "   "},
                             {"item_id": 4, "title": None}))
    assert set(found) == {2, 3, 4}
    assert "no title" in found[2] and "'2'" in found[2]


def test_duplicate_id_names_first_line_and_int_string_collide() -> None:
    found = problems_of(rows({"item_id": "5", "title": "A"}, {"item_id": 6, "title": "B"},
                             {"item_id": 5, "title": "C"}))
    assert set(found) == {3}
    assert "duplicate item_id '5'" in found[3] and "line 1" in found[3]


@pytest.mark.parametrize("bad_id", [None, 1.5, True, [1], {"a": 1}, "", "   "])
def test_bad_id_types(bad_id: object) -> None:
    row = {"title": "A"} if bad_id is None else {"item_id": bad_id, "title": "A"}
    found = problems_of(rows(row))
    assert set(found) == {1}
    assert "item_id" in found[1]


@pytest.mark.parametrize("bad_row", ["[1, 2]", '"just a string"', "42", "null"])
def test_non_object_rows(bad_row: str) -> None:
    found = problems_of([json.dumps({"item_id": 1, "title": "A"}), bad_row])
    assert found == {2: "a row must be a JSON object"}


def test_bad_field_type_reported() -> None:
    found = problems_of(rows({"item_id": 1, "title": "A", "brand": 3}, {"item_id": 2, "title": ["x", 1]}))
    assert set(found) == {1, 2}
    assert "'brand'" in found[1] and "'title'" in found[2]


def test_all_bad_rows_reported_at_once_and_message_is_clear() -> None:
    lines = rows({"item_id": 1, "title": "ok"}, "{oops", {"item_id": 2}, {"item_id": 1, "title": "dup"},
                 [1], {"item_id": 3.5, "title": "x"}, {"item_id": 4, "title": "fine"})
    with pytest.raises(CatalogError) as info:
        parse_catalog(lines, source="cat.jsonl")
    err = info.value
    assert [p.line for p in err.problems] == [2, 3, 4, 5, 6]
    text = str(err)
    assert text.startswith("cat.jsonl: 5 bad row(s), nothing was built")
    for line in (2, 3, 4, 5, 6):
        assert f"line {line}:" in text


def test_long_problem_lists_are_truncated_in_message_but_kept() -> None:
    lines = [json.dumps({"item_id": i}) for i in range(30)]
    with pytest.raises(CatalogError) as info:
        parse_catalog(lines)
    assert len(info.value.problems) == 30
    assert "and 10 more" in str(info.value)


def test_nothing_dropped_silently() -> None:
    """Every non-blank row either becomes an item or a problem."""
    lines = rows(*[{"item_id": i, "title": f"t{i}"} for i in range(50)])
    assert len(parse_catalog(lines)) == 50
    lines[10] = "{bad"
    lines[20] = json.dumps({"item_id": 3, "title": "dup"})
    with pytest.raises(CatalogError) as info:
        parse_catalog(lines)
    assert [p.line for p in info.value.problems] == [11, 21]


def test_empty_catalog_is_an_error() -> None:
    with pytest.raises(CatalogError, match="no items"):
        parse_catalog(["", "  "])


def test_read_write_round_trip(tmp_path) -> None:
    items = [Item("1", "A", "desc", "brand", "x > y"), Item("b", "Ünïcode ✓")]
    path = tmp_path / "items.jsonl"
    write_catalog(items, path)
    assert read_catalog(path) == items


def test_read_catalog_source_and_missing_file(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"item_id": 1}\n')
    with pytest.raises(CatalogError, match=str(path)):
        read_catalog(path)
    with pytest.raises(FileNotFoundError):
        read_catalog(tmp_path / "absent.jsonl")


def test_fused_text_fields_and_order() -> None:
    item = Item("1", "Drill", description="Fast", brand="Acme", categories="Tools")
    assert fused_text(item, ("brand", "title")) == "brand: Acme. title: Drill"
    assert fused_text(Item("1", "Drill")) == "title: Drill"
    assert len(fused_text(Item("1", "x" * 5000), max_chars=100)) == 100
    with pytest.raises(ValueError, match="unknown text field"):
        fused_text(item, ("title", "price"))
