"""Tokenizers for bundles: extend a pretrained Hugging Face tokenizer, or train a small byte-level BPE
from the catalog's own text (for models trained from scratch), in both cases with every ID token."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from model_store import tokens
from model_store.tokens import IdFormat


def train_catalog_tokenizer(texts: Iterable[str], id_format: IdFormat, vocab_size: int = 4000) -> Any:
    """Byte-level BPE over catalog text and the prompt templates, then the special and ID tokens.

    Byte-level means no input is ever unknown; ID tokens are added after training so BPE never
    splits them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[tokens.PAD, tokens.BOS, tokens.EOS, tokens.UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    template_text = [tokens.PREAMBLE, tokens.text_to_id_prompt(""), tokens.id_to_title_prompt(""),
                     tokens.item_text("t", "b", "c", "d")]
    # Repeat the template text so BPE learns its words whole: the preamble then costs a dozen tokens
    # in every prompt instead of one per character.
    bpe.train_from_iterator(list(texts) + template_text * 50, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=tokens.BOS, eos_token=tokens.EOS,
                                 pad_token=tokens.PAD, unk_token=tokens.UNK)
    tokens.extend_tokenizer(hf, id_format)
    return hf


def load_pretrained_tokenizer(path: str | Path, id_format: IdFormat) -> Any:
    """A local Hugging Face tokenizer, extended with the ID tokens (nothing is downloaded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokens.extend_tokenizer(tok, id_format)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
