"""The reasoning chain's constraint inside vLLM: a logits processor with per-request arguments.

vLLM builds `ChainLogitsProcessor` in its engine core (the class is named in the engine arguments);
a reasoning request carries its `ChainSpec` in `SamplingParams.extra_args["gream_chain"]`, and the
processor runs the same `ChainAutomaton` as the transformers engine on the request's tokens as
vLLM generates them. The per-tokenizer `ChainVocab` is saved into the model folder vLLM loads
(`CHAIN_VOCAB_FILE`), since the engine core has neither the bundle nor its catalog.

The processor changes which token is the argmax, so it says so (`is_argmax_invariant` is False):
otherwise greedy requests would skip it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from model_store.chain_automaton import ChainAutomaton, ChainSpec, ChainVocab

CHAIN_VOCAB_FILE = "gream_chain_vocab.npz"
CHAIN_ARG = "gream_chain"


class _RequestChain:
    """One request's automaton, advanced over the tokens vLLM generated since the last call."""

    def __init__(self, vocab: ChainVocab, spec: ChainSpec):
        self.chain = ChainAutomaton(vocab, spec)
        self.consumed = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in output_ids[self.consumed:]:
            self.chain.advance(int(token))
        self.consumed = len(output_ids)
        allowed = torch.from_numpy(self.chain.allowed())
        if allowed.shape[0] < logits.shape[-1]:  # vLLM may pad the vocabulary
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - allowed.shape[0])])
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


class ChainLogitsProcessor(AdapterLogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        path = Path(vllm_config.model_config.model) / CHAIN_VOCAB_FILE
        self.vocab = ChainVocab.load(path) if path.exists() else None

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> _RequestChain | None:
        spec = (params.extra_args or {}).get(CHAIN_ARG)
        if spec is None:
            return None
        if self.vocab is None:
            raise ValueError(f"a reasoning request needs {CHAIN_VOCAB_FILE} in the model folder")
        return _RequestChain(self.vocab, ChainSpec.from_dict(spec))
