"""Reasoning chains as they stream, for any engine: random histories of 3-8 catalog items, each chain
validated (grounded mentions, no word 4-gram more than twice, >= 12 words, the five sections) and its
finish reason counted. The tests run `sample_chains` on the tiny bundle; the command line runs it on
a real bundle with both engines and quotes a few chains:

    python loadtests/chain_quality.py --bundle var/amazon --engines transformers,vllm --chains 100
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_store.grounding import GroundingIndex, validate_chain
from model_store.tokens import reasoning_prompt
from service.engine.base import EngineRequest, ReasoningDelta, ReasoningDone


@dataclass
class ChainReport:
    chains: int = 0
    valid: int = 0
    closed: int = 0
    failures: list[tuple[str, list[str]]] = field(default_factory=list)
    samples: list[tuple[list[str], str, list[str]]] = field(default_factory=list)  # (history, chain, items)
    words: int = 0

    @property
    def valid_share(self) -> float:
        return self.valid / max(1, self.chains)

    @property
    def closed_share(self) -> float:
        return self.closed / max(1, self.chains)


async def sample_chains(engine: Any, bundle: Any, n: int = 40, budget: int = 200, seed: int = 0,
                        concurrency: int = 4) -> ChainReport:
    """`n` chains, `concurrency` at a time (within the engines' default reasoning limit)."""
    index = GroundingIndex(bundle)
    rng = np.random.default_rng(seed)
    histories = [[int(i) for i in rng.choice(len(bundle.items), int(rng.integers(3, 9)), replace=False)]
                 for _ in range(n)]
    gate = asyncio.Semaphore(concurrency)

    async def one(r: int, history: list[int]) -> tuple[str, ReasoningDone]:
        request = EngineRequest(f"chain-{seed}-{r}", reasoning_prompt([bundle.spelled_id(i) for i in history]), k=5)
        text, done = "", None
        async with gate:
            async for event in engine.reason(request, budget):
                if isinstance(event, ReasoningDelta):
                    text += event.text
                elif isinstance(event, ReasoningDone):
                    done = event
        assert done is not None
        return text, done

    report = ChainReport()
    results = await asyncio.gather(*(one(r, h) for r, h in enumerate(histories)))
    for history, (text, done) in zip(histories, results, strict=True):
        problems = validate_chain(text, index.names_of(history), index.names_of([i.index for i in done.items]),
                                  catalog=index)
        report.chains += 1
        report.words += len(text.split())
        if len(report.samples) < 3:
            report.samples.append(([bundle.items[i].item_id for i in history], text,
                                   [bundle.items[i.index].item_id for i in done.items]))
        report.valid += not problems
        report.closed += done.finish_reason == "end_of_thinking"
        if problems:
            report.failures.append((text, problems))
    return report


async def _measure(bundle_dir: str, engines: list[str], n: int, budget: int) -> dict[str, Any]:
    from model_store.bundle import load_bundle
    from service.engine.config import TransformersEngineConfig, VLLMEngineConfig
    from service.engine.factory import create_local_engine

    bundle = load_bundle(bundle_dir)
    out: dict[str, Any] = {}
    for kind in engines:
        config = TransformersEngineConfig() if kind == "transformers" else VLLMEngineConfig()
        engine = create_local_engine(config, bundle)
        await engine.start()
        try:
            report = await sample_chains(engine, bundle, n=n, budget=budget)
        finally:
            await engine.close()
        out[kind] = {"chains": report.chains, "valid_share": report.valid_share, "closed_share": report.closed_share,
                     "mean_words": report.words / max(1, report.chains),
                     "failures": [{"chain": t, "problems": p} for t, p in report.failures[:5]],
                     "samples": [{"history": h, "chain": t, "items": i} for h, t, i in report.samples]}
        print(f"{kind}: {report.chains} chains, valid {report.valid_share:.3f}, closed {report.closed_share:.3f}, "
              f"mean words {report.words / max(1, report.chains):.1f}")
        for history, text, items in report.samples:
            print(f"  history {history} -> items {items}\n    " + text.replace("\n", "\n    "))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--engines", default="transformers,vllm")
    ap.add_argument("--chains", type=int, default=100)
    ap.add_argument("--budget", type=int, default=200, help="max reasoning tokens per chain")
    ap.add_argument("--report", default=None, help="write the figures and sample chains as JSON here")
    args = ap.parse_args(argv)
    out = asyncio.run(_measure(args.bundle, [e.strip() for e in args.engines.split(",") if e.strip()],
                               args.chains, args.budget))
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
