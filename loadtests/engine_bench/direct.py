"""Rows of decoders called directly in this process: the reference decoding of GREAM's and
MiniOneRec's code (`generate` with a dict trie), the transformers decoders, and the vLLM engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from loadtests.engine_bench.rows import BEAMS, DTYPES, K, Row
from loadtests.engine_bench.timing import run_async, run_interleaved

REFERENCE = "reference: HF generate(num_beams=10, prefix_allowed_tokens_fn)"
SyncDecoder = Callable[[Sequence[str]], list[list[int]]]


def load_hf(bundle: Any, dtype: str) -> tuple[Any, Any, list[int]]:
    """The bundle's model, tokenizer and ID-token ids."""
    import torch
    from transformers import AutoTokenizer

    from model_store.model import load_bundle_model
    from model_store.tokens import id_token_ids

    tok = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path), local_files_only=True)
    model = load_bundle_model(bundle.model_path, dtype=getattr(torch, DTYPES[dtype]))
    return model, tok, id_token_ids(tok, bundle.id_format)


class ReferenceDecoder:
    """GREAM's / MiniOneRec's decoding: beam search in `generate` with a Python dict trie."""

    def __init__(self, model: Any, tokenizer: Any, bundle: Any, code_tokens: Sequence[int]):
        self.model, self.tok, self.depth = model, tokenizer, bundle.trie.depth
        self.tok.padding_side = "left"
        fmt = bundle.id_format
        seqs = [tuple(int(code_tokens[fmt.level_offset(lv) + int(c)]) for lv, c in enumerate(row))
                for row in bundle.codes]
        self.item_of = {s: i for i, s in enumerate(seqs)}
        self.allowed: dict[tuple[int, ...], list[int]] = {}
        for s in seqs:
            for d in range(self.depth):
                self.allowed.setdefault(s[:d], [])
                if s[d] not in self.allowed[s[:d]]:
                    self.allowed[s[:d]].append(s[d])
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def __call__(self, prompts: Sequence[str]) -> list[list[int]]:
        import torch

        enc = self.tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        width = enc["input_ids"].shape[1]

        def allowed(_batch_id: int, ids: torch.Tensor) -> list[int]:
            return self.allowed.get(tuple(ids[width:].tolist()), [self.eos])

        with torch.inference_mode():
            out = self.model.generate(**enc, num_beams=BEAMS, num_return_sequences=BEAMS, max_new_tokens=self.depth,
                                      min_new_tokens=self.depth, prefix_allowed_tokens_fn=allowed, do_sample=False,
                                      early_stopping=True, length_penalty=1.0, output_scores=False,
                                      return_dict_in_generate=True, pad_token_id=self.tok.pad_token_id)
        gen = out.sequences[:, width:].tolist()
        results = []
        for p in range(len(prompts)):
            items = [self.item_of.get(tuple(g)) for g in gen[p * BEAMS:(p + 1) * BEAMS]]
            results.append([i for i in items if i is not None][:K])
        return results


def direct_decoders(bundle: Any, dtype: str, reference: bool, transformers: bool) -> dict[str, SyncDecoder]:
    """The reference and both transformers decoders (HFTrieDecoder, and the engine's default when it
    differs: the shared-prefix decoder for Llama-family models), by row name."""
    from service.engine.hf_decoder import HFTrieDecoder
    from service.engine.shared_prefix import make_decoder

    model, tok, code_tokens = load_hf(bundle, dtype)
    decoders: dict[str, SyncDecoder] = {}
    if reference:
        decoders[REFERENCE] = ReferenceDecoder(model, tok, bundle, code_tokens)
    if transformers:
        engine_decoders = {"transformers: HFTrieDecoder": HFTrieDecoder(model, tok, bundle.trie, code_tokens)}
        fastest = make_decoder(model, tok, bundle.trie, code_tokens)
        if type(fastest) is not HFTrieDecoder:
            engine_decoders[f"transformers: {type(fastest).__name__} (engine default)"] = fastest
        for name, dec in engine_decoders.items():

            def topk(chunk: Sequence[str], dec: Any = dec) -> list[list[int]]:
                return [[it.index for it in items] for items in dec.topk(chunk, [K] * len(chunk), [BEAMS] * len(chunk))]

            decoders[name] = topk
    return decoders


def bench_direct(decoders: dict[str, SyncDecoder], prompts: Sequence[str], concurrencies: Sequence[int],
                 rounds: int) -> tuple[list[Row], dict[int, Row]]:
    """Rows of the direct decoders (concurrency c = batches of c prompts) and the reference row per
    concurrency."""
    for fn in decoders.values():
        fn(prompts[:2])  # warm-up
    rows: list[Row] = []
    refs: dict[int, Row] = {}
    for c in concurrencies:
        measured = run_interleaved(decoders, prompts, c, rounds)
        if REFERENCE in measured:
            refs[c] = measured[REFERENCE]
        rows += measured.values()
    return rows, refs


async def bench_vllm(bundle: Any, prompts: Sequence[str], dtype: str, concurrencies: Sequence[int],
                     options: dict[str, Any] | None = None) -> list[Row]:
    """VLLMEngine in this process (AsyncLLM), `c` requests in flight; `options`: more VLLMEngineConfig
    fields."""
    from service.engine.base import EngineRequest
    from service.engine.config import VLLMEngineConfig
    from service.engine.vllm_engine import VLLMEngine

    engine = VLLMEngine(bundle, VLLMEngineConfig(default_beams=BEAMS, dtype=DTYPES[dtype], queue_max=4096,
                                                 **(options or {})))
    await engine.start()
    rows = []
    try:
        async def one(i: int) -> list[int]:
            items = await engine.recommend(EngineRequest(f"bench-{i}", prompts[i], K))
            return [it.index for it in items]

        for _ in range(2):  # warm-up
            await asyncio.gather(*(one(i) for i in range(min(8, len(prompts)))))
        for c in concurrencies:
            # Each pass starts cold: the previous pass left every prompt in vLLM's prefix cache, which
            # would turn this pass into repeated prompts (the other rows have no such cache).
            await engine.reset_prefix_cache()
            rows.append(await run_async("vllm: VLLMEngine", one, len(prompts), c))
    finally:
        await engine.close()
    return rows
