"""A benchmark bundle: an existing bundle's items, IDs and tokenizer plus a random-weight scratch model.

Decoding speed does not depend on the weights, so the engine benchmark can run on the real catalog's
IDs (and test.jsonl histories) without training first:

    gream bundle build --items $DATA/items.jsonl --out var/amazon-ids   # DATA: docs/training.md
    python loadtests/make_bench_bundle.py var/amazon-ids var/amazon-bench --preset tiny
    python loadtests/bench_engine.py --bundle var/amazon-bench --requests 64
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from model_store.bundle import load_bundle, save_bundle
from training.backbone import SCRATCH_PRESETS, build_scratch_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("out")
    parser.add_argument("--preset", default="tiny", choices=sorted(SCRATCH_PRESETS))
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    tokenizer = AutoTokenizer.from_pretrained(str(bundle.tokenizer_path))
    model = build_scratch_model(SCRATCH_PRESETS[args.preset], tokenizer)
    path = save_bundle(args.out, items=bundle.items, codes=bundle.codes, codebooks=bundle.codebooks,
                       id_format=bundle.id_format, tokenizer=tokenizer, model=model, popularity=bundle.popularity,
                       settings=bundle.manifest["settings"],
                       stats={**bundle.manifest["stats"], "model": f"random-weight scratch {args.preset}"},
                       overwrite=True)
    print(path)


if __name__ == "__main__":
    main()
