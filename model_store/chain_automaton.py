"""The reasoning chain's decoding constraint: which tokens may come next, one request at a time.

Both engines run this same automaton (the transformers engine in its decoding loop, vLLM in a logits
processor), so a chain is faithful by construction, not by luck:

- structure: the five section labels are forced in their fixed order (free text may not spell a
  label); a section ends at a newline, or is closed by force when the rest of the chain would no
  longer fit; the chain ends with THINK_END after the rewrite section, so it always closes within
  the budget when the budget holds the labels;
- grounding: outside a mention, free text may not contain markers, item IDs, special tokens or a
  word that starts a catalog brand or theme; a token ending with MENTION_OPEN switches to a token
  trie over the history's titles, brands and themes (each closed by a token starting with
  MENTION_CLOSE, such as "]" or "];", as the curriculum's text tokenizes), so a mention can
  only name what the history supports, each name at most `max_mentions` times;
- the rewrite section lists history items as a subsequence of the history, by their ID tokens;
- no token 4-gram of free text comes a third time and no token three times in a row (no loops).

`ChainVocab` holds the per-tokenizer masks (built once, saved beside a vLLM model folder);
`ChainSpec` the per-request part (token keys of the history's names and IDs, the budget), small
enough to travel in vLLM's `SamplingParams.extra_args`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_store import tokens
from model_store.grounding import GroundingIndex, ItemNames

NGRAM = 4
MAX_NGRAM_REPEATS = 2  # as model_store.grounding allows for word 4-grams
MIN_SECTION_WORDS = 3  # each free section says something: 4 x 3 words and the labels make >= 12 words


@dataclass
class ChainVocab:
    """Token classes of one tokenizer (arrays over the model's vocabulary)."""

    think_end: int
    newline: int
    free: np.ndarray  # bool: allowed in free text outside a mention
    opener: np.ndarray  # bool: ends with MENTION_OPEN (starts a mention)
    closer: np.ndarray  # bool: starts with MENTION_CLOSE, then only punctuation or space (ends one)
    line_end: np.ndarray  # bool: ends with exactly one newline (ends a section)
    word_start: np.ndarray  # bool: starts with whitespace and has text (starts a new word)
    headers: list[list[int]]  # token ids of each section's label, in stage order

    @property
    def size(self) -> int:
        return int(self.free.shape[0])

    @classmethod
    def build(cls, tokenizer: Any, vocab_size: int, banned: set[int], name_words: frozenset[str]) -> ChainVocab:
        """`banned`: ids free text may never contain (model_store.tokens.reasoning_banned_token_ids);
        `name_words`: lower-case words that start a catalog name (GroundingIndex.name_words)."""
        n = min(len(tokenizer), vocab_size)
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
        free = np.zeros(vocab_size, dtype=bool)
        opener = np.zeros(vocab_size, dtype=bool)
        closer = np.zeros(vocab_size, dtype=bool)
        line_end = np.zeros(vocab_size, dtype=bool)
        word_start = np.zeros(vocab_size, dtype=bool)
        markers = (tokens.MENTION_OPEN, tokens.MENTION_CLOSE)
        think_end = int(tokenizer.convert_tokens_to_ids(tokens.THINK_END))
        # A token that could start spelling a name outside a mention is not free text; template words
        # (and their starts) stay free whatever the catalog's names.
        template = {w[:k] for w in tokens.TEMPLATE_WORDS for k in range(1, len(w) + 1)}
        name_starts = {w[:k] for w in name_words for k in range(min(3, len(w)), len(w) + 1)} - template
        label_words = {label.split()[0].rstrip(":").lower() for label in tokens.REASONING_LABELS.values()}
        for i, text in enumerate(texts):
            if i in banned or i == think_end or not text:
                continue
            word_start[i] = text[0].isspace() and bool(text.strip())
            if any(m in text for m in markers) or "\n" in text:
                if "\n" in text or text.count(tokens.MENTION_OPEN) + text.count(tokens.MENTION_CLOSE) > 1:
                    pass
                elif text.endswith(tokens.MENTION_OPEN) and not any(c.isalnum() for c in text):
                    opener[i] = True
                elif text.startswith(tokens.MENTION_CLOSE) and not any(c.isalnum() for c in text):
                    closer[i] = True
                elif text.endswith("\n") and text.count("\n") == 1 and not any(m in text for m in markers):
                    line_end[i] = True
                continue
            if text.strip().lower() in name_starts or text.strip().rstrip(":").lower() in label_words:
                continue
            if not text.replace(" ", "").isprintable() or "\ufffd" in text:
                # Control characters (\r, \t, ...) split words where the repetition bounds cannot see
                # it, and byte pieces of a character all read as U+FFFD; template text needs neither
                # (a name's own characters come through its mention).
                continue
            free[i] = True

        def encode(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        labels = [tokens.REASONING_LABELS[s] for s in tokens.REASONING_STAGES]
        # The rewrite section's IDs follow its label and a space, as the curriculum writes them.
        headers = [encode(label) for label in labels[:-1]] + [encode(labels[-1] + " ")]
        newline = encode(tokens.SECTION_SEPARATOR)[-1]
        line_end[newline] = True
        return cls(think_end, int(newline), free, opener, closer, line_end, word_start, headers)

    def save(self, path: str | Path) -> None:
        flat = [t for h in self.headers for t in h]
        np.savez(path, think_end=self.think_end, newline=self.newline, free=self.free, opener=self.opener,
                 closer=self.closer,
                 line_end=self.line_end, word_start=self.word_start, header_tokens=np.asarray(flat, dtype=np.int64),
                 header_lengths=np.asarray([len(h) for h in self.headers], dtype=np.int64))

    @classmethod
    def load(cls, path: str | Path) -> ChainVocab:
        data = np.load(path)
        flat, lengths = data["header_tokens"].tolist(), data["header_lengths"].tolist()
        starts = np.cumsum([0, *lengths]).tolist()
        return cls(int(data["think_end"]), int(data["newline"]), data["free"], data["opener"], data["closer"],
                   data["line_end"],
                   data["word_start"], [flat[starts[k]:starts[k + 1]] for k in range(len(lengths))])


@dataclass(frozen=True)
class ChainSpec:
    """One request's constraint: its names' token keys, its history's ID tokens, its budget."""

    mention_keys: list[list[int]]  # tokens of each distinct name (without the markers)
    history_ids: list[list[int]]  # ID tokens of each history item, oldest first
    budget: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChainSpec:
        return cls([list(k) for k in data["mention_keys"]], [list(h) for h in data["history_ids"]],
                   int(data["budget"]))

    @classmethod
    def of(cls, history: Sequence[ItemNames], encode: Callable[[str], list[int]],
           id_tokens: Callable[[str], list[int]], budget: int) -> ChainSpec:
        """`encode`: text -> token ids; `id_tokens`: spelled ID -> its token ids."""
        names = list(dict.fromkeys(n for it in history for n in it.names()))
        return cls([encode(n) for n in names], [id_tokens(it.spelled_id) for it in history],
                   budget)


class _MentionTrie:
    def __init__(self, keys: Sequence[Sequence[int]]):
        self.children: list[dict[int, int]] = [{}]
        self.under: list[set[int]] = [set()]  # key indices below each node
        self.complete: dict[int, int] = {}  # node -> key index that ends there
        for k, key in enumerate(keys):
            node = 0
            self.under[0].add(k)
            for t in key:
                nxt = self.children[node].get(t)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][t] = nxt
                    self.children.append({})
                    self.under.append(set())
                node = nxt
                self.under[node].add(k)
            self.complete.setdefault(node, k)
        self.longest = max((len(k) for k in keys), default=0)


class ChainAutomaton:
    """The state of one chain; `allowed()` masks the next token, `advance(token)` consumes it."""

    def __init__(self, vocab: ChainVocab, spec: ChainSpec, max_mentions: int = 2):
        self.vocab, self.spec = vocab, spec
        self.max_mentions = max_mentions
        self.trie = _MentionTrie(spec.mention_keys)
        self.used: dict[int, int] = defaultdict(int)
        self.section = 0
        self.phase = "header"
        self.queue = list(vocab.headers[0])
        self.body_len = 0
        self.body_words = 0
        self.node = 0
        self.next_item = 0  # rewrite: items before this history position are no longer allowed
        self.partial: list[int] = []
        self.ids_listed = 0
        self.generated: list[int] = []
        self._seen: dict[tuple[int, ...], dict[int, int]] = defaultdict(dict)
        # What must still fit after free section s: its newline, each later free section's label,
        # shortest body and newline, the rewrite label, one ID and THINK_END itself (vLLM counts it).
        # A section may run on while the rest still fits, up to half the budget.
        headers = vocab.headers
        depth = len(spec.history_ids[0]) if spec.history_ids else 0
        tail = len(headers[-1]) + depth + 1
        self.reserve = [1 + sum(len(h) + MIN_SECTION_WORDS + 1 for h in headers[s + 1:-1]) + tail
                        for s in range(len(headers) - 1)]
        self.section_max = max(MIN_SECTION_WORDS + 2, spec.budget // 2)

    @property
    def ended(self) -> bool:
        """Only THINK_END may follow."""
        return self.phase == "end"

    def _only(self, token: int) -> np.ndarray:
        mask = np.zeros(self.vocab.size, dtype=bool)
        mask[token] = True
        return mask

    def _can_mention(self, node: int) -> bool:
        return any(self.used[k] < self.max_mentions for k in self.trie.under[node])

    def allowed(self) -> np.ndarray:
        """Bool mask over the vocabulary of the tokens that may come next."""
        v = self.vocab
        if self.phase == "header":
            return self._only(self.queue[0])
        if self.phase == "end":
            return self._only(v.think_end)
        if self.phase == "mention":
            mask = np.zeros(v.size, dtype=bool)
            for t, child in self.trie.children[self.node].items():
                if self._can_mention(child):
                    mask[t] = True
            key = self.trie.complete.get(self.node)
            if key is not None and self.used[key] < self.max_mentions:
                mask |= v.closer
            return mask
        if self.phase == "ids":
            mask = np.zeros(v.size, dtype=bool)
            depth = len(self.partial)
            for ids in self.spec.history_ids[self.next_item:]:
                if ids[:depth] == self.partial:
                    mask[ids[depth]] = True
            if not self.partial and self.ids_listed:
                mask[v.think_end] = True
            return mask
        # Tokens this section may still use, its newline included.
        left = min(self.section_max - self.body_len,
                   self.spec.budget - len(self.generated) - self.reserve[self.section] + 1)
        if left <= 1:
            return self._only(v.newline)
        mask = v.free.copy()
        words_needed = MIN_SECTION_WORDS - self.body_words
        if words_needed <= 0:
            mask |= v.line_end
        # The opener, the longest name, its closer and the section's newline must fit.
        if left >= self.trie.longest + 3 and self._can_mention(0):
            mask |= v.opener
        if 0 < words_needed >= left - 1:
            mask &= v.word_start  # the section's last tokens must still make its words
        for t, count in self._seen.get(tuple(self.generated[-(NGRAM - 1):]), {}).items():
            if count >= MAX_NGRAM_REPEATS:
                mask[t] = False
        if len(self.generated) >= 2 and self.generated[-1] == self.generated[-2]:
            mask[self.generated[-1]] = False
        if not mask.any():
            return self._only(v.newline)
        return mask

    def advance(self, token: int) -> None:
        v = self.vocab
        self.generated.append(token)
        if len(self.generated) >= NGRAM:
            seen = self._seen[tuple(self.generated[-NGRAM:-1])]
            seen[token] = seen.get(token, 0) + 1
        if self.phase == "header":
            self.queue.pop(0)
            if not self.queue:
                self._start_body()
        elif self.phase == "mention":
            self.body_len += 1
            if v.closer[token]:
                self.used[self.trie.complete[self.node]] += 1
                self.phase = "body"
            else:
                self.node = self.trie.children[self.node][token]
        elif self.phase == "ids":
            self._advance_ids(token)
        elif self.phase == "body":
            self.body_len += 1
            self.body_words += bool(v.word_start[token])
            if v.line_end[token]:
                self.section += 1
                self.queue = list(v.headers[self.section])
                self.phase = "header"
            elif v.opener[token]:
                self.phase, self.node = "mention", 0

    def _start_body(self) -> None:
        self.body_len = self.body_words = 0
        if self.section < len(self.vocab.headers) - 1:
            self.phase = "body"
        else:
            self.phase = "ids" if self.spec.history_ids else "end"
            self._check_room()

    def _advance_ids(self, token: int) -> None:
        self.partial.append(token)
        for pos in range(self.next_item, len(self.spec.history_ids)):
            if self.spec.history_ids[pos] == self.partial:
                self.next_item, self.partial = pos + 1, []
                self.ids_listed += 1
                break
        self._check_room()

    def _check_room(self) -> None:
        depth = len(self.spec.history_ids[0]) if self.spec.history_ids else 0
        room = self.spec.budget - len(self.generated) - 1  # THINK_END needs a place too
        if not self.partial and (self.next_item >= len(self.spec.history_ids) or room < depth):
            self.phase = "end"


class ChainGrounding:
    """Per bundle and tokenizer: the vocabulary classes, and each request's `ChainSpec` from its prompt."""

    def __init__(self, index: GroundingIndex, tokenizer: Any, vocab_size: int,
                 encode: Callable[[str], list[int]] | None = None):
        self.index = index
        self.encode = encode or (lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        fmt = index.id_format
        self._code_token = tokens.id_token_ids(tokenizer, fmt)
        banned = tokens.reasoning_banned_token_ids(tokenizer, fmt)
        self.vocab = ChainVocab.build(tokenizer, vocab_size, banned, index.name_words())

    def id_tokens(self, spelled: str) -> list[int]:
        fmt = self.index.id_format
        return [self._code_token[fmt.flat_code(level, c)] for level, c in enumerate(fmt.parse(spelled))]

    def history(self, prompt: str) -> list[ItemNames]:
        return self.index.history_of_prompt(prompt)

    def spec(self, history: Sequence[ItemNames], budget: int) -> ChainSpec:
        return ChainSpec.of(history, self.encode, self.id_tokens, budget)
