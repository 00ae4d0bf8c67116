"""Ranking metrics (HR@K, NDCG@K) and the model's own evaluation, direct and reasoning modes, with the
decoding the service uses (trie-constrained beam search). The baselines it is compared with are in training/baselines.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from model_store import tokens
from model_store.bundle import Bundle
from model_store.grounding import GroundingIndex, repeated_ngram_rate, validate_chain
from model_store.prior import TransitionPrior
from training.data import EvalRow
from training.tasks import spell_history

CUTOFFS = (1, 5, 10)


def ranking_metrics(ranked: Sequence[Sequence[str]], targets: Sequence[str],
                    cutoffs: Sequence[int] = CUTOFFS) -> dict[str, float]:
    """Mean HR@K and NDCG@K (one relevant item per row) over all rows."""
    hits = {k: 0.0 for k in cutoffs}
    ndcg = {k: 0.0 for k in cutoffs}
    for items, target in zip(ranked, targets):
        rank = next((r for r, item in enumerate(items) if item == target), None)
        for k in cutoffs:
            if rank is not None and rank < k:
                hits[k] += 1
                ndcg[k] += 1 / math.log2(rank + 2)
    n = max(1, len(targets))
    out = {f"HR@{k}": hits[k] / n for k in cutoffs}
    out.update({f"NDCG@{k}": ndcg[k] / n for k in cutoffs if k > 1})
    return out


def prior_biases(bundle: Bundle, prior: TransitionPrior | None, rows: Sequence[EvalRow]) -> list[Any] | None:
    """Each row's prior term for the beam search (None without a prior), as the service computes it."""
    if prior is None:
        return None
    return [prior.node_fusion([bundle.index_of[i] for i in r.history if i in bundle.index_of], bundle.trie)
            for r in rows]


PRIOR_ALONE = "collaborative prior alone"


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k highest scores, best first (ties in index order)."""
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def prior_rankings(bundle: Bundle, prior: TransitionPrior, rows: Sequence[EvalRow], k: int = 10) -> list[list[str]]:
    """Top-k item ids per row by the prior's scores alone (no model; history items not excluded)."""
    return [[bundle.items[i].item_id for i in top_k_indices(
        prior.item_probs([bundle.index_of[i] for i in r.history if i in bundle.index_of]), k)] for r in rows]


def model_rankings(decoder: Any, bundle: Bundle, rows: Sequence[EvalRow], k: int = 10, beams: int = 20,
                   batch_size: int = 32, max_history: int | None = None, desc: str = "eval",
                   prior: TransitionPrior | None = None, exclude_seen: bool = False) -> list[list[str]]:
    """Top-k item ids per row from the bundle's model, decoded as the service decodes (direct mode):
    the prompt holds the bundle's trained history window (default 10), fused with `prior` when given;
    with `exclude_seen` the history's items are blocked in the trie, as the service's default does."""
    max_history = max_history or getattr(bundle, "prompt_history", None) or 10
    ranked: list[list[str]] = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        chunk = rows[start: start + batch_size]
        prompts = [tokens.direct_prompt(spell_history(bundle, r.history[-max_history:])) for r in chunk]
        filters = [bundle.trie.make_filter(bundle.index_of[i] for i in r.history if i in bundle.index_of)
                   for r in chunk] if exclude_seen else None
        results = decoder.topk(prompts, [k] * len(chunk), [beams] * len(chunk), filters=filters,
                               biases=prior_biases(bundle, prior, chunk))
        ranked += [[bundle.items[s.index].item_id for s in res] for res in results]
    return ranked


def reasoning_rankings(model: Any, tokenizer: Any, decoder: Any, bundle: Bundle, rows: Sequence[EvalRow],
                       k: int = 10, beams: int = 20, max_new_tokens: int = 96, batch_size: int = 16,
                       max_history: int | None = None, desc: str = "eval reasoning",
                       priors: Sequence[Any] = (None,), answers: Sequence[str] = ("history", "chain")
                       ) -> tuple[dict[str, list[list[list[str]]]], dict[str, float]]:
    """Reasoning mode as the service runs it: greedy reasoning after THINK_START under the chain
    automaton (model_store.chain_automaton), then the constrained top-k IDs (the same beam search
    and scoring as direct mode), decoded from the direct prompt (answer "history", the service's
    default) and after THINK_END ANSWER (answer "chain", GREAM's conditioning). The reasoning is
    generated once and the answer decoded once per answer and entry of `priors` (None: the model
    alone). Returns {answer: one list of rankings per prior} and the chains' figures
    (`chain_figures`, against the first answer's items)."""
    from training.grounded_generation import GroundedChains, grounding_for
    from training.srpo import generate_reasoning

    max_history = max_history or bundle.prompt_history or 10
    suffix = tokenizer(tokens.reasoning_answer_suffix(), add_special_tokens=False)["input_ids"]
    grounding = grounding_for(model, tokenizer, GroundingIndex(bundle))
    ranked: dict[str, list[list[list[str]]]] = {a: [[] for _ in priors] for a in answers}
    chains: list[ChainFigures] = []
    first_token: list[float] = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch"):
        chunk = rows[start: start + batch_size]
        histories = [[bundle.index_of[i] for i in r.history[-max_history:] if i in bundle.index_of] for r in chunk]
        prompts = [tokens.reasoning_prompt([bundle.spelled_id(i) for i in h]) for h in histories]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        names = [grounding.index.names_of(h) for h in histories]
        constraint = GroundedChains(grounding, names, max(len(p) for p in prompt_ids), max_new_tokens)
        reasoning, closed = generate_reasoning(model, tokenizer, prompt_ids, max_new_tokens,
                                               logits_processor=constraint)
        first_token.append(constraint.first_token_s or 0.0)
        for a, answer in enumerate(answers):
            if answer == "chain":
                ids = [p + r + suffix for p, r in zip(prompt_ids, reasoning, strict=True)]
            else:
                ids = tokenizer([tokens.direct_prompt([bundle.spelled_id(i) for i in h]) for h in histories],
                                add_special_tokens=False)["input_ids"]
            for n, (out, prior) in enumerate(zip(ranked[answer], priors, strict=True)):
                results = decoder.topk([""] * len(ids), [k] * len(ids), [beams] * len(ids), prompt_ids=ids,
                                       biases=prior_biases(bundle, prior, chunk))
                out += [[bundle.items[s.index].item_id for s in res] for res in results]
                if n == 0 and a == 0:
                    for body, ok, hist, res in zip(reasoning, closed, names, results, strict=True):
                        text = tokenizer.decode(body, skip_special_tokens=False)
                        returned = grounding.index.names_of([s.index for s in res])
                        chains.append(ChainFigures(not validate_chain(text, hist, returned, grounding.index), ok,
                                                   repeated_ngram_rate(text), len(body)))
    return ranked, chain_figures(chains, first_token)


@dataclass(frozen=True)
class ChainFigures:
    grounded: bool  # passes model_store.grounding.validate_chain (history or returned items only)
    closed: bool  # ended by THINK_END within the budget
    repeated_ngram_rate: float
    tokens: int


def chain_figures(chains: Sequence[ChainFigures], first_token_s: Sequence[float]) -> dict[str, float]:
    n = max(1, len(chains))
    return {"grounded_share": sum(c.grounded for c in chains) / n,
            "closed_within_budget_share": sum(c.closed for c in chains) / n,
            "format_rate": sum(c.closed for c in chains) / n,
            "repeated_4gram_rate": sum(c.repeated_ngram_rate for c in chains) / n,
            "mean_reasoning_tokens": sum(c.tokens for c in chains) / n,
            # Batched generation: the time from a batch's start to its first token (prefill included).
            "time_to_first_token_ms": 1000 * sum(first_token_s) / max(1, len(first_token_s))}


def evaluate_modes(model: Any, tokenizer: Any, bundle: Bundle, rows: Sequence[EvalRow], modes: Sequence[str],
                   label: str, beams: int = 20, k: int = 10, reasoning_rows: int | None = None,
                   reasoning_tokens: int = 96, prior: Any = None,
                   variants: Sequence[tuple[str, Any]] | None = None,
                   max_history: int | None = None) -> dict[str, dict[str, float]]:
    """{"<label> (direct)": metrics, "<label> (reasoning)": metrics} with the service's decoder, fused
    with the collaborative prior `prior` (model_store.prior) when given. `variants` [(label, prior)]
    evaluates several priors (None: the model alone) with one reasoning generation per row."""
    from service.engine.shared_prefix import make_decoder  # the service's own decoder

    variants = list(variants) if variants is not None else [(label, prior)]
    model.eval()
    decoder = make_decoder(model, tokenizer, bundle.trie, tokens.id_token_ids(tokenizer, bundle.id_format))
    out: dict[str, dict[str, float]] = {}
    sub = list(rows[:reasoning_rows]) if reasoning_rows else list(rows)
    if "direct" in modes:
        for name, p in variants:
            ranked = model_rankings(decoder, bundle, rows, k=k, beams=beams, desc=f"eval {name} direct", prior=p,
                                    max_history=max_history)
            out[f"{name} (direct)"] = ranking_metrics(ranked, [r.target for r in rows])
            if "reasoning" in modes and len(sub) < len(rows):
                # Reasoning runs on fewer rows: direct mode on those same rows, for a like-with-like pair.
                out[f"{name} (direct, first {len(sub)} rows)"] = {
                    **ranking_metrics(ranked[: len(sub)], [r.target for r in sub]), "rows": len(sub)}
    if "reasoning" in modes:
        rankings, figures = reasoning_rankings(model, tokenizer, decoder, bundle, sub, k=k, beams=beams,
                                           max_new_tokens=reasoning_tokens, desc=f"eval {label} reasoning",
                                           priors=[p for _, p in variants], max_history=max_history)
        # "(reasoning)": items ranked from the history, as served by default; "(reasoning, items
        # after the chain)": GREAM's conditioning (GREAM_REASONING_ANSWER=chain).
        for answer, suffix in (("history", ""), ("chain", ", items after the chain")):
            for (name, _), ranked in zip(variants, rankings[answer], strict=True):
                out[f"{name} (reasoning{suffix})"] = {**ranking_metrics(ranked, [r.target for r in sub]), **figures,
                                                      "rows": len(sub)}
    return out


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    # Only the ranking metrics (NAME@K); rows may carry extras such as counts of finished reasonings.
    cols = sorted({c for m in metrics.values() for c in m if "@" in c},
                  key=lambda c: (c.split("@")[0], int(c.split("@")[1])))
    width = max(len(n) for n in metrics) + 2
    lines = ["method".ljust(width) + " ".join(c.rjust(8) for c in cols)]
    for name, m in metrics.items():
        lines.append(name.ljust(width) + " ".join(f"{m.get(c, float('nan')):8.4f}" for c in cols))
    return "\n".join(lines)

