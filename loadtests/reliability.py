"""Scripted reliability runs against a real gateway that this script starts on 127.0.0.1 (and stops).

    python loadtests/reliability.py knee        throughput curve (concurrency 1..32), its knee
    python loadtests/reliability.py soak        soak at the knee: no failures, RSS growth < 10 %
    python loadtests/reliability.py redis       a private Redis stopped and restarted mid-load
    python loadtests/reliability.py disconnect  clients dropping streams: no engine work left running
    python loadtests/reliability.py figures     locust at 1/8/32 users, direct and streaming
    python loadtests/reliability.py all         knee + soak + redis + disconnect (+ figures with --figures)

Options: --bundle DIR (default var/demo-bundle, else a tiny bundle built under --out), --out DIR
(default var/reliability; one JSON report per run plus the server logs), --soak-seconds (default 300),
--step-seconds (knee, default 15), --via-worker (disconnect: gateway -> engine worker over HTTP too).
Exit status 1 when a run's criteria fail. Every process binds 127.0.0.1 only; the Redis used is a
private `redis-server --port 6392 --save '' --appendonly no`, never a shared one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.harness import ROOT
from loadtests.reliability_runs.common import log


def default_bundle(out: Path) -> Path:
    demo = ROOT / "var" / "demo-bundle"
    if (demo / "manifest.json").is_file():
        return demo
    tiny = out / "tiny-bundle"
    if not (tiny / "manifest.json").is_file():
        log(f"no demo bundle: building a tiny one at {tiny}")
        from tests.support.bundles import make_tiny_bundle

        make_tiny_bundle(tiny)
    return tiny


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", choices=["knee", "soak", "redis", "disconnect", "figures", "all"])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "reliability")
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    parser.add_argument("--soak-concurrency", type=int, default=None, help="default: the knee (runs `knee` first)")
    parser.add_argument("--step-seconds", type=float, default=15.0)
    parser.add_argument("--redis-phase-seconds", type=float, default=12.0)
    parser.add_argument("--via-worker", action="store_true")
    parser.add_argument("--figures", action="store_true", help="with `all`: also the locust figures")
    parser.add_argument("--figures-seconds", type=int, default=30)
    parser.add_argument("--figures-users", default="1,8,32", help="comma-separated locust user counts")
    parser.add_argument("--figures-scenarios", default="direct,streaming")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from loadtests.reliability_runs.disconnect import run_disconnect
    from loadtests.reliability_runs.figures import run_figures
    from loadtests.reliability_runs.redis_outage import run_redis
    from loadtests.reliability_runs.throughput import run_knee, run_soak

    args.out.mkdir(parents=True, exist_ok=True)
    bundle = (args.bundle or default_bundle(args.out)).resolve()
    log(f"bundle {bundle}")
    reports = []
    knee = args.soak_concurrency
    if args.run in ("knee", "all") or (args.run == "soak" and knee is None):
        report = run_knee(bundle, args.out, args.step_seconds)
        knee = knee or report["knee_concurrency"]
        reports.append(report)
    if args.run in ("soak", "all"):
        reports.append(run_soak(bundle, args.out, args.soak_seconds, knee or 4))
    if args.run in ("redis", "all"):
        reports.append(run_redis(bundle, args.out, args.redis_phase_seconds))
    if args.run in ("disconnect", "all"):
        reports.append(run_disconnect(bundle, args.out, args.via_worker))
    if args.run == "figures" or (args.run == "all" and args.figures):
        reports.append(run_figures(bundle, args.out, args.figures_seconds,
                                   tuple(int(u) for u in args.figures_users.split(",")),
                                   tuple(args.figures_scenarios.split(","))))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"reliability-{args.run}-{stamp}.json"
    path.write_text(json.dumps({"bundle": str(bundle), "reports": reports}, indent=2))
    ok = all(r["passed"] for r in reports)
    log(f"{'PASSED' if ok else 'FAILED'}: " + ", ".join(f"{r['run']}={'ok' if r['passed'] else 'FAIL'}" for r in reports)
        + f"; report {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
