"""IDs from text embeddings fused with collaborative (co-occurrence SVD) embeddings, as LETTER-style."""
import sys, os
sys.path.insert(0, "/work/main")
import numpy as np
from pathlib import Path
from model_store.builder import BuildConfig, build_bundle
from model_store.catalog import read_catalog, fused_text, TEXT_FIELDS
from model_store.semantic_ids import QuantizerConfig, embed_texts, DEFAULT_EMBEDDER
from training.data import InteractionData
from training.tasks import holdout_sequences
alpha = float(sys.argv[1]); out = sys.argv[2]
items = read_catalog("../shared/data/amazon-industrial/items.jsonl")
cache = Path("var/exp/text_vecs.npy")
if cache.exists():
    text = np.load(cache)
else:
    text = embed_texts([fused_text(it, TEXT_FIELDS) for it in items], DEFAULT_EMBEDDER); np.save(cache, text)
data = InteractionData.load("../shared/data/amazon-industrial")
cut = holdout_sequences(data.train, data.valid)
idx = {it.item_id: i for i, it in enumerate(items)}
n = len(items)
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import svds
r, c, v = [], [], []
for seq in cut.values():
    s = [idx[i] for i in seq if i in idx]
    for a in range(len(s)):
        for b in range(a + 1, min(len(s), a + 3)):
            w = 1.0 if b == a + 1 else 0.5
            r += [s[a], s[b]]; c += [s[b], s[a]]; v += [w, w]
M = coo_matrix((v, (r, c)), shape=(n, n)).tocsr()
deg = np.asarray(M.sum(1)).ravel() + 1.0
D = 1 / np.sqrt(deg)
from scipy.sparse import diags
Mn = diags(D) @ M @ diags(D)
u, sv, _ = svds(Mn, k=64)
cf = u * np.sqrt(sv)
cf = cf / (np.linalg.norm(cf, axis=1, keepdims=True) + 1e-8)
t = text / np.linalg.norm(text, axis=1, keepdims=True)
vec = np.concatenate([t, alpha * cf], 1).astype(np.float32)
cfg = BuildConfig(quantizer=QuantizerConfig(levels=3, codebook_size=64, dedup_size=64, balanced=True))
build_bundle(items, out, cfg, interactions="../shared/data/amazon-industrial/train.jsonl", vectors=vec, overwrite=True, log=print)
