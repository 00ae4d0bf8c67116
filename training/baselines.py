"""The baselines every model is compared with in the same run (docs/training.md, "Baselines and the prior"):
popularity, last-item transitions, weighted transitions (weights tuned on valid) and SASRec (epochs
tuned on valid). Full ranking over all items; history items are not excluded."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from model_store.prior import PriorSettings, TransitionPrior
from training.data import EvalRow
from training.evaluate import ranking_metrics, top_k_indices


def popularity_ranking(train: dict[str, list[str]], k: int) -> list[str]:
    counts = Counter(i for seq in train.values() for i in seq)
    return [i for i, _ in counts.most_common(k)]


class TransitionBaseline:
    """Last-item transitions (first-order Markov) with popularity back-off."""

    def __init__(self, train: dict[str, list[str]]):
        self.next: dict[str, Counter[str]] = defaultdict(Counter)
        for seq in train.values():
            for a, b in pairwise(seq):
                self.next[a][b] += 1
        self.popular = popularity_ranking(train, 200)

    def rank(self, history: Sequence[str], k: int) -> list[str]:
        out = [i for i, _ in self.next[history[-1]].most_common(k)] if history else []
        seen = set(out)
        out += [i for i in self.popular if i not in seen][: k - len(out)]
        return out[:k]


class WeightedTransitionBaseline:
    """The strongest published baseline (docs/training.md, "Data"): a weighted sum of transitions from the last
    item, from the second-to-last item (skipping one), and two steps from the last item (through any
    intermediate), with a small popularity back-off. The weights, and whether the terms are counts or
    per-item probabilities, are tuned on valid rows against sequences cut before them (`tune`), then the
    counts are refitted on all of train. The counting is model_store.prior's, the collaborative prior
    that decoding can fuse with the model."""

    GRID = (0.0, 0.1, 0.25, 0.5, 1.0)

    def __init__(self, train: dict[str, list[str]], weights: tuple[float, float, float] = (1.0, 0.25, 0.25),
                 popularity_weight: float = 1e-3, normalise_rows: bool = False):
        self.items = sorted({i for seq in train.values() for i in seq})
        self.index = {item: n for n, item in enumerate(self.items)}
        self.prior = TransitionPrior.fit(([self.index[i] for i in seq] for seq in train.values()), len(self.items),
                                         PriorSettings(weights=weights, popularity_weight=popularity_weight,
                                                       normalise_rows=normalise_rows))

    @property
    def weights(self) -> tuple[float, float, float]:
        return self.prior.settings.weights

    @weights.setter
    def weights(self, value: tuple[float, float, float]) -> None:
        self.prior = self.prior.with_settings(weights=tuple(value))

    def scores(self, history: Sequence[str]) -> Any:
        return self.prior.scores([self.index[i] for i in history if i in self.index])

    def rank(self, history: Sequence[str], k: int) -> list[str]:
        return [self.items[i] for i in top_k_indices(self.scores(history), k)]

    @classmethod
    def tune(cls, cut_train: dict[str, list[str]], valid: Sequence[EvalRow], k: int = 10
             ) -> tuple[dict[str, Any], float]:
        """The settings with the best valid NDCG@k, {"weights" (last-item weight fixed at 1),
        "normalise_rows"}, and that NDCG. Ties keep counts and the smaller weights."""
        model = cls(cut_train)
        targets = [r.target for r in valid]
        best: tuple[float, dict[str, Any]] = (-1.0, {})
        for normalise in (False, True):
            model.prior = model.prior.with_settings(normalise_rows=normalise)
            for w_skip in cls.GRID:
                for w_two in cls.GRID:
                    model.weights = (1.0, w_skip, w_two)
                    ndcg = ranking_metrics([model.rank(r.history, k) for r in valid], targets, (k,))[f"NDCG@{k}"]
                    if ndcg > best[0]:
                        best = (ndcg, {"weights": model.weights, "normalise_rows": normalise})
        return best[1], best[0]

    # (history_weight, history_decay) pairs tried on top of the tuned baseline; (0, _) is the baseline.
    HISTORY_GRID = ((0.0, 0.5), (0.25, 0.5), (0.5, 0.5), (1.0, 0.5), (0.25, 0.8), (0.5, 0.8), (1.0, 0.8))

    @classmethod
    def tune_history(cls, cut_train: dict[str, list[str]], valid: Sequence[EvalRow], tuned: dict[str, Any],
                     k: int = 10) -> tuple[dict[str, float], float]:
        """The collaborative prior's extra term on top of the settings `tune` chose: the
        {"history_weight", "history_decay"} (model_store.prior) with the best valid NDCG@k, and that
        NDCG. Ties keep the baseline (weight 0), so the term is only added where valid asks for it."""
        model = cls(cut_train, tuned["weights"], normalise_rows=tuned["normalise_rows"])
        targets = [r.target for r in valid]
        best: tuple[float, dict[str, float]] = (-1.0, {})
        for weight, decay in cls.HISTORY_GRID:
            model.prior = model.prior.with_settings(history_weight=weight, history_decay=decay)
            ndcg = ranking_metrics([model.rank(r.history, k) for r in valid], targets, (k,))[f"NDCG@{k}"]
            if ndcg > best[0]:
                best = (ndcg, {"history_weight": weight, "history_decay": decay})
        return best[1], best[0]


class SASRec:
    """SASRec (Kang & McAuley 2018) as in the published baselines: item and position embeddings, 2
    causal self-attention blocks of width 64, next-item prediction at every position with a full
    softmax over the catalog (3.7k items: cheaper and stronger than sampled negatives). The width,
    dropout and number of epochs are chosen on valid rows (`tune`), then the model is retrained on all
    of train, so that a weak baseline flatters nothing.

    Measured on amazon-industrial valid rows (train cut before them): padded keys masked, learning
    rate 6e-3 and positions up to the longest sequence (22 here) raised NDCG@10 from 0.053 (no key
    mask, 1e-3, 50 positions) to 0.082; with 26 batches an epoch, the step count is what limits it."""

    def __init__(self, items: Sequence[str], dim: int = 64, blocks: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.2, seed: int = 0):
        self.items = list(items)
        self.index = {item: n + 1 for n, item in enumerate(self.items)}  # 0 pads
        self.max_len = max_len
        torch.manual_seed(seed)
        self.net = _SASRecNet(len(self.items) + 1, dim, blocks, heads, max_len, dropout)
        self.seed = seed

    def _encode(self, seqs: Sequence[Sequence[str]], length: int) -> Any:
        out = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids = [self.index[i] for i in seq if i in self.index][-length:]
            if ids:
                out[row, length - len(ids):] = torch.tensor(ids)
        return out

    def fit(self, train: dict[str, list[str]], epochs: int, batch_size: int = 128, lr: float = 6e-3,
            on_epoch: Any = None) -> SASRec:
        """Train for `epochs`; `on_epoch(epoch)` is called after each and stops training by returning True."""
        seqs = self._encode([s[-(self.max_len + 1):] for s in train.values() if len(s) > 1], self.max_len + 1)
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, betas=(0.9, 0.98))
        for epoch in tqdm(range(1, epochs + 1), desc="SASRec", unit="epoch", leave=False):
            self.net.train()
            for batch in seqs[torch.randperm(len(seqs), generator=gen)].split(batch_size):
                inputs, targets = batch[:, :-1], batch[:, 1:]
                logits = self.net(inputs)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                         ignore_index=0)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if on_epoch is not None and on_epoch(epoch):
                break
        self.net.eval()
        return self

    def rank_many(self, histories: Sequence[Sequence[str]], k: int) -> list[list[str]]:
        self.net.eval()
        out: list[list[str]] = []
        with torch.inference_mode():
            for start in range(0, len(histories), 512):
                logits = self.net(self._encode(histories[start: start + 512], self.max_len))[:, -1]
                logits[:, 0] = float("-inf")
                out += [[self.items[i - 1] for i in row] for row in logits.topk(k, dim=-1).indices.tolist()]
        return out

    # Shapes tried by `tune` (dimension, dropout); each gets its epochs chosen by early stopping.
    GRID: tuple[tuple[int, float], ...] = ((64, 0.2), (64, 0.5), (128, 0.2), (128, 0.5))

    @classmethod
    def tune(cls, cut_train: dict[str, list[str]], valid: Sequence[EvalRow], items: Sequence[str],
             max_epochs: int = 100, every: int = 5, k: int = 10, patience: int = 2, max_len: int = 50,
             grid: Sequence[tuple[int, float]] | None = None) -> tuple[dict[str, Any], float]:
        """The setting {"dim", "dropout", "epochs"} with the best valid NDCG@k, and that NDCG: every
        (dimension, dropout) of `grid` (default `GRID`) trained with early stopping, its epoch count a
        multiple of `every`, stopping after `patience` checks without improvement."""
        targets = [r.target for r in valid]
        best: tuple[float, dict[str, Any]] = (-1.0, {})
        for dim, dropout in grid or cls.GRID:
            model = cls(items, dim=dim, dropout=dropout, max_len=max_len)
            scores: dict[int, float] = {}

            def check(epoch: int, model: SASRec = model, scores: dict[int, float] = scores) -> bool:
                if epoch % every:
                    return False
                ranked = model.rank_many([r.history for r in valid], k)
                scores[epoch] = ranking_metrics(ranked, targets, (k,))[f"NDCG@{k}"]
                model.net.train()
                top = max(scores, key=lambda e: (scores[e], -e))
                return epoch - top >= patience * every

            model.fit(cut_train, max_epochs, on_epoch=check)
            top = max(scores, key=lambda e: (scores[e], -e))
            if scores[top] > best[0]:
                best = (scores[top], {"dim": dim, "dropout": dropout, "epochs": top})
        return best[1], best[0]


class _SASRecNet(nn.Module):
    def __init__(self, n_items: int, dim: int, blocks: int, heads: int, max_len: int, dropout: float):
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.item = nn.Embedding(n_items, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.drop(self.item(ids) * self.dim ** 0.5 + self.pos(torch.arange(length))[None])
        # Causal, and padded keys hidden: sequences are left padded to max_len, and a history of 10
        # items that also attends to 40 pads has its attention diluted by them (valid NDCG@10 0.053
        # against 0.064 with this mask). Each position keeps itself, so a pad query still has
        # one key (no NaN); what pads compute is never read.
        eye = torch.eye(length, dtype=torch.bool)
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)[None] \
            | ((ids == 0)[:, None, :] & ~eye[None])
        mask = torch.zeros(blocked.shape).masked_fill(blocked, float("-inf"))
        mask = mask.repeat_interleave(self.heads, dim=0)  # [batch * heads, L, L], as attention wants it
        return self.norm(self.blocks(x, mask=mask)) @ self.item.weight.T


def baseline_rankings(train: dict[str, list[str]], rows: Sequence[EvalRow], k: int = 10,
                      valid: Sequence[EvalRow] | None = None, sasrec: bool = True
                      ) -> dict[str, tuple[list[list[str]], dict[str, Any]]]:
    """Each baseline's top-k per row and what was tuned for it: popularity, last-item transitions and,
    given valid rows to tune on, weighted transitions and SASRec (tuned against train sequences cut
    before the valid rows, then refitted on all of train)."""
    pop = popularity_ranking(train, k)
    trans = TransitionBaseline(train)
    out: dict[str, tuple[list[list[str]], dict[str, Any]]] = {
        "popularity": ([pop] * len(rows), {}),
        "last-item transitions": ([trans.rank(r.history, k) for r in rows], {}),
    }
    if valid:
        from training.tasks import holdout_sequences

        cut = holdout_sequences(train, valid)
        tuned, _ = WeightedTransitionBaseline.tune(cut, valid, k)
        weighted = WeightedTransitionBaseline(train, tuned["weights"], normalise_rows=tuned["normalise_rows"])
        out["weighted transitions"] = ([weighted.rank(r.history, k) for r in rows],
                                       {"weights": list(tuned["weights"]), "normalise_rows": tuned["normalise_rows"]})
        if sasrec:
            items = sorted({i for seq in train.values() for i in seq} | {r.target for r in valid})
            # No position beyond the longest training sequence is ever filled.
            max_len = min(50, max(len(s) for s in train.values()))
            tuned_sasrec, _ = SASRec.tune(cut, valid, items, k=k, max_len=max_len)
            model = SASRec(items, dim=tuned_sasrec["dim"], dropout=tuned_sasrec["dropout"], max_len=max_len)
            model.fit(train, tuned_sasrec["epochs"])
            out["SASRec"] = (model.rank_many([r.history for r in rows], k), tuned_sasrec)
    return out


def baseline_rows(train: dict[str, list[str]], rows: Sequence[EvalRow], k: int = 10,
                  valid: Sequence[EvalRow] | None = None, sasrec: bool = True) -> dict[str, dict]:
    """The metrics of `baseline_rankings`, with what was tuned for each."""
    targets = [r.target for r in rows]
    return {name: {**ranking_metrics(ranked, targets), **extras}
            for name, (ranked, extras) in baseline_rankings(train, rows, k, valid, sasrec).items()}
