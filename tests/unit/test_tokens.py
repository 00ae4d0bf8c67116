"""ID token spelling and parsing, prompt templates, history truncation, tokenizer extension."""

from __future__ import annotations

import itertools

import pytest

from model_store import tokens
from model_store.tokens import IdFormat, extend_tokenizer, id_token_ids, truncate_history

FMT = IdFormat(levels=3, codebook_size=8, dedup_size=4)


# ------------------------------------------------------------------------------------------ IdFormat


def test_format_shape() -> None:
    assert FMT.depth == 4
    assert FMT.vocab_size == 3 * 8 + 4
    assert [FMT.level_size(lv) for lv in range(4)] == [8, 8, 8, 4]
    assert [FMT.level_offset(lv) for lv in range(4)] == [0, 8, 16, 24]
    default = IdFormat()
    assert (default.levels, default.codebook_size, default.dedup_size, default.depth) == (3, 256, 256, 4)


def test_all_tokens_positions_are_flat_codes() -> None:
    toks = FMT.all_tokens()
    assert len(toks) == FMT.vocab_size == len(set(toks))
    for lv in range(FMT.depth):
        for code in range(FMT.level_size(lv)):
            assert toks[FMT.flat_code(lv, code)] == FMT.token(lv, code)
    assert toks[0] == "<a_0>" and toks[-1] == "<d_3>"


def test_spell_examples() -> None:
    assert IdFormat().spell([12, 200, 7, 0]) == "<a_12><b_200><c_7><d_0>"
    assert IdFormat(levels=4).spell([1, 2, 3, 4, 5]) == "<a_1><b_2><c_3><d_4><e_5>"


def test_spell_parse_round_trip_exhaustive_small_format() -> None:
    fmt = IdFormat(levels=2, codebook_size=3, dedup_size=2)
    for codes in itertools.product(range(3), range(3), range(2)):
        spelled = fmt.spell(codes)
        assert fmt.parse(spelled) == codes
        assert fmt.parse(f"  {spelled}\n") == codes


@pytest.mark.parametrize("codes", [(0, 0, 0, 0), (255, 255, 255, 255), (12, 200, 7, 0), (1, 10, 100, 3)])
def test_round_trip_default_format(codes: tuple[int, ...]) -> None:
    fmt = IdFormat()
    assert fmt.parse(fmt.spell(codes)) == codes


def test_spell_rejects_wrong_length_and_range() -> None:
    with pytest.raises(ValueError):
        FMT.spell([1, 2, 3])
    with pytest.raises(ValueError):
        FMT.spell([1, 2, 3, 0, 0])
    with pytest.raises(ValueError):
        FMT.spell([8, 0, 0, 0])  # codebook has codes 0..7
    with pytest.raises(ValueError):
        FMT.spell([0, 0, 0, 4])  # dedup level has codes 0..3
    with pytest.raises(ValueError):
        FMT.spell([-1, 0, 0, 0])


@pytest.mark.parametrize("text", [
    "",
    "<a_1><b_2><c_3>",  # too short
    "<a_1><b_2><c_3><d_0><e_0>",  # too long
    "<a_1><b_2><c_3><d_0><a_1><b_2><c_3><d_0>",  # two IDs
    "<b_1><a_2><c_3><d_0>",  # levels out of order
    "<a_1><a_2><c_3><d_0>",
    "<a_1> <b_2><c_3><d_0>",  # space inside
    "x<a_1><b_2><c_3><d_0>",  # junk before
    "<a_1><b_2><c_3><d_0>x",  # junk after
    "<a_1><b_2><c_3><d_>",
    "<a_-1><b_2><c_3><d_0>",
    "<A_1><b_2><c_3><d_0>",
    "a_1 b_2 c_3 d_0",
    "<a_8><b_2><c_3><d_0>",  # code outside the codebook
    "<a_1><b_2><c_3><d_4>",  # dedup code outside the dedup level
    "<a_01><b_2><c_3><d_0>",  # not the canonical spelling
])
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        FMT.parse(text)


def test_format_validation_and_dict_round_trip() -> None:
    with pytest.raises(ValueError):
        IdFormat(levels=0)
    with pytest.raises(ValueError):
        IdFormat(levels=10)
    with pytest.raises(ValueError):
        IdFormat(codebook_size=1)
    with pytest.raises(ValueError):
        IdFormat(dedup_size=0)
    data = FMT.to_dict()
    assert data["level_names"] == "abcd"
    assert IdFormat.from_dict(data) == FMT


# ------------------------------------------------------------------------------------------ history


def test_truncate_history_short_histories_unchanged() -> None:
    hist = [f"i{k}" for k in range(5)]
    assert truncate_history(hist, 5) == hist
    assert truncate_history(hist, 50) == hist
    assert truncate_history(hist, 0) == []
    assert truncate_history([], 3) == []


def test_truncate_history_drops_in_chunks_and_keeps_newest() -> None:
    hist = [f"i{k}" for k in range(25)]
    kept = truncate_history(hist, 20, drop_chunk=10)
    assert kept == hist[10:]  # 5 too many -> one whole chunk of 10 dropped
    assert truncate_history(hist[:30] + [f"i{k}" for k in range(25, 31)], 20, drop_chunk=10)[-1] == "i30"


@pytest.mark.parametrize("max_items,chunk", [(20, 10), (20, 1), (7, 3), (5, 10), (1, 4)])
def test_truncate_history_invariants(max_items: int, chunk: int) -> None:
    starts = []
    for length in range(80):
        hist = list(range(length))
        kept = truncate_history(hist, max_items, drop_chunk=chunk)
        assert len(kept) <= max_items
        assert kept == hist[len(hist) - len(kept):]  # a suffix: the newest items, in order
        if length >= max_items:
            # never drops more than a chunk beyond what is necessary
            assert len(kept) > max_items - min(chunk, max_items)
        starts.append(hist[0 + (len(hist) - len(kept))] if kept else None)
    # The first kept item changes only once per chunk of appended events (prefix-cache friendly).
    changes = sum(1 for a, b in zip(starts[max_items:], starts[max_items + 1:]) if a != b)
    assert changes <= (80 - max_items) // min(chunk, max_items) + 1


# ------------------------------------------------------------------------------------------ prompts


def test_prompts_share_prefix_and_end_with_markers() -> None:
    ids = [FMT.spell([1, 2, 3, 0]), FMT.spell([4, 5, 6, 1])]
    p1, p2 = tokens.direct_prompt(ids[:1]), tokens.direct_prompt(ids)
    assert p1.startswith(tokens.PREAMBLE) and p1.endswith(tokens.ANSWER)
    common = p1[: -len(tokens.HISTORY_END + tokens.ANSWER)]
    assert p2.startswith(common)
    r = tokens.reasoning_prompt(ids)
    assert r.endswith(tokens.THINK_START) and tokens.history_block(ids) in r
    assert tokens.reasoning_answer_suffix().endswith(tokens.ANSWER)
    assert tokens.text_to_id_prompt("x").endswith(tokens.ANSWER)
    assert tokens.titles_history_prompt(["a", "b"]).endswith(tokens.ANSWER)


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def catalog_tokenizer():
    from model_store.tokenizer import train_catalog_tokenizer

    texts = ["Acme cordless drill 18V", "Globex safety gloves, nitrile", "Initech lab beaker 250 ml",
             "Umbrella pipette tips", "Stark digital scale"] * 4
    return train_catalog_tokenizer(texts, FMT, vocab_size=400)


def test_extend_tokenizer_makes_every_id_token_single(catalog_tokenizer) -> None:
    tok = catalog_tokenizer
    for t in FMT.all_tokens():
        assert tok.tokenize(t) == [t]
    for t in tokens.SPECIAL_TOKENS:
        assert tok.tokenize(t) == [t]
    spelled = FMT.spell([7, 0, 5, 3])
    enc = tok(spelled, add_special_tokens=False)["input_ids"]
    assert len(enc) == FMT.depth
    assert enc == [tok.convert_tokens_to_ids(t) for t in ("<a_7>", "<b_0>", "<c_5>", "<d_3>")]
    # Within a prompt too, and decode gives the ID text back.
    prompt = tokens.direct_prompt([spelled])
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[-7:] == [tokens.HISTORY_START, "<a_7>", "<b_0>", "<c_5>", "<d_3>",
                                                   tokens.HISTORY_END, tokens.ANSWER]
    assert spelled in tok.decode(ids, skip_special_tokens=True)


def test_extend_tokenizer_is_idempotent(catalog_tokenizer) -> None:
    size = len(catalog_tokenizer)
    assert extend_tokenizer(catalog_tokenizer, FMT) == 0
    assert len(catalog_tokenizer) == size


def test_id_token_ids_order(catalog_tokenizer) -> None:
    tok = catalog_tokenizer
    ids = id_token_ids(tok, FMT)
    assert len(ids) == FMT.vocab_size == len(set(ids))
    for flat, tid in enumerate(ids):
        assert tok.convert_ids_to_tokens(tid) == FMT.all_tokens()[flat]
    assert ids[FMT.flat_code(3, 2)] == tok.convert_tokens_to_ids("<d_2>")


def test_id_token_ids_fails_without_extension(catalog_tokenizer) -> None:
    bigger = IdFormat(levels=3, codebook_size=16, dedup_size=4)  # <a_8>.. were never added
    with pytest.raises(ValueError, match="extend_tokenizer"):
        id_token_ids(catalog_tokenizer, bigger)
