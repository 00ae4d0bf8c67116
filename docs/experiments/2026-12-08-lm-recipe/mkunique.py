"""IDs bundle whose de-duplication level is the item's own index (one token per item, in and out)."""
import sys
sys.path.insert(0, "/work/main")
import numpy as np
from transformers import AutoTokenizer
from model_store.bundle import load_bundle, save_bundle
from model_store.tokens import IdFormat, extend_tokenizer
b = load_bundle("var/exp/ids")
n = len(b.items)
codes = b.codes.copy()
codes[:, -1] = np.arange(n)
fmt = IdFormat(levels=b.id_format.levels, codebook_size=b.id_format.codebook_size, dedup_size=n)
tok = AutoTokenizer.from_pretrained(str(b.tokenizer_path), local_files_only=True)
print("new tokens", extend_tokenizer(tok, fmt), len(tok))
save_bundle("var/exp/ids_unique", items=b.items, codes=codes, codebooks=b.codebooks, id_format=fmt, tokenizer=tok,
            popularity=b.popularity, settings=b.manifest.get("settings"), overwrite=True)
