"""Ranking metrics, the baselines the model is compared with, and the SFT trainer's batching (the
loops that train are in tests/integration/test_training_loops.py)."""

import math
import random

import pytest

from training.baselines import TransitionBaseline, WeightedTransitionBaseline
from training.data import EvalRow
from training.evaluate import ranking_metrics
from training.sft import epoch_batches


def test_ranking_metrics_hit_at_rank_two() -> None:
    m = ranking_metrics([["a", "b", "c"], ["x", "y", "z"]], ["b", "q"], cutoffs=(1, 5))
    assert m["HR@1"] == 0.0 and m["HR@5"] == 0.5
    assert m["NDCG@5"] == pytest.approx(0.5 * (1 / 1.584962500721156))


# Users alternate a -> b and go c -> d -> e; "x" is popular but follows nothing specific.
TRAIN = {
    "u1": ["a", "b", "x"], "u2": ["a", "b", "x"], "u3": ["c", "d", "e"], "u4": ["c", "d", "e"],
    "u5": ["x", "x", "x", "x"], "u6": ["q", "a", "b"],
}


def test_transition_baselines_follow_the_last_item() -> None:
    assert TransitionBaseline(TRAIN).rank(["q", "a"], 2)[0] == "b"
    weighted = WeightedTransitionBaseline(TRAIN, weights=(1.0, 0.0, 0.0))
    assert weighted.rank(["q", "a"], 3)[0] == "b"
    assert len(set(weighted.rank(["a"], 5))) == 5  # back-off fills the list with distinct items


def test_weighted_transitions_use_the_second_to_last_item_and_two_steps() -> None:
    # After "c", "e" is two steps on: only the two-step term ranks it above the items after "d".
    two_step = WeightedTransitionBaseline(TRAIN, weights=(0.0, 0.0, 1.0))
    assert two_step.rank(["c"], 1) == ["e"]
    # With history [c, z] (z unknown to the next-item table) the skip term still points at "e".
    skip = WeightedTransitionBaseline(TRAIN, weights=(1.0, 1.0, 0.0))
    assert skip.rank(["c", "zz"], 1) == ["d"]  # unknown last item: the known one before it counts
    assert skip.rank(["c", "d"], 1) == ["e"]


def test_weighted_transitions_tune_picks_the_weights_valid_rewards() -> None:
    valid = [EvalRow("v", ["c"], "e")] * 3
    tuned, ndcg = WeightedTransitionBaseline.tune(TRAIN, valid, k=5)
    # The last item's own successor "d" keeps rank 1 (its weight is fixed at 1); the two-step term
    # lifts "e" from the popularity back-off to rank 2.
    assert tuned["weights"][2] > 0 and ndcg == pytest.approx(1 / math.log2(3))
    assert tuned["normalise_rows"] is False  # a tie between counts and probabilities keeps counts
    assert ranking_metrics([WeightedTransitionBaseline(TRAIN, (1.0, 0.0, 0.0)).rank(["c"], 5)], ["e"],
                           (5,))["NDCG@5"] < ndcg


def test_history_term_is_tuned_on_valid_and_kept_off_when_it_does_not_help() -> None:
    tuned = {"weights": (1.0, 0.0, 0.0), "normalise_rows": False}
    # After [a, c] the last item says d; only the earlier a (a -> b, three times) points at b.
    wants_b = [EvalRow("v", ["a", "c"], "b")] * 3
    history, ndcg = WeightedTransitionBaseline.tune_history(TRAIN, wants_b, tuned, k=5)
    assert history["history_weight"] > 0
    assert ndcg > WeightedTransitionBaseline.tune_history(TRAIN, wants_b, tuned, k=5)[1] - 1e-12  # deterministic
    baseline = WeightedTransitionBaseline(TRAIN, tuned["weights"])
    assert "b" not in baseline.rank(["a", "c"], 2)  # d, then the back-off
    # Where the last item is right, a tie keeps the baseline's terms alone.
    wants_d = [EvalRow("v", ["a", "c"], "d")] * 3
    assert WeightedTransitionBaseline.tune_history(TRAIN, wants_d, tuned, k=5)[0]["history_weight"] == 0.0


@pytest.mark.parametrize("group", [True, False])
def test_epoch_batches_cover_every_example_once(group: bool) -> None:
    lengths = [random.Random(i).randint(5, 200) for i in range(1000)]
    batches = epoch_batches(lengths, 32, random.Random(0), group)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    if group:  # grouping by length leaves little padding; a random order leaves a lot
        assert padded < 1.1 * sum(lengths)
    else:
        assert padded > 1.3 * sum(lengths)


def test_sasrec_real_positions_do_not_attend_to_padding() -> None:
    """Histories are left padded to max_len: what the pad positions hold must not reach the real ones."""
    import torch

    from training.baselines import SASRec

    model = SASRec([f"i{n}" for n in range(6)], dim=16, max_len=6, dropout=0.0)
    net = model.net.eval()
    ids = torch.tensor([[0, 0, 0, 2, 4, 5]])
    with torch.no_grad():
        before = net(ids)[0, 3:]
        net.pos.weight[:3] += torch.randn(3, 16)  # change what the three pads compute
        after = net(ids)[0, 3:]
    assert torch.isfinite(before).all()
    torch.testing.assert_close(before, after)


def test_paired_bootstrap_interval_holds_the_difference() -> None:
    import numpy as np

    from training.eval_report import ndcg_per_row, paired_bootstrap

    ndcg = ndcg_per_row([["a", "b"], ["b", "a"], ["c", "d"]], ["a", "a", "a"], k=2)
    assert ndcg.tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0])
    rng = np.random.default_rng(1)
    better = rng.random(2000) * 0.2 + 0.05
    worse = better - 0.05 + rng.normal(0, 0.01, 2000)
    cmp = paired_bootstrap(better, worse, samples=500)
    assert cmp["ci95_low"] < cmp["mean"] < cmp["ci95_high"]
    assert cmp["ci95_low"] > 0.04 and cmp["ci95_high"] < 0.06
    same = paired_bootstrap(better, better + rng.normal(0, 0.01, 2000), samples=500)
    assert same["ci95_low"] < 0 < same["ci95_high"]


def test_report_tables_and_plot_keep_rows_apart(tmp_path) -> None:
    """Rows measured on a subset go to their own table and never onto the plot; the served row and
    the best baseline lead the plot."""
    from training.eval_report import print_report
    from training.plot import plot_report, plot_rows

    m = {"HR@10": 0.1, "NDCG@10": 0.05}
    report = {"split": "test", "rows": 100, "served": "served (+SRPO +prior, 10 beams, history excluded)",
              "metrics": {"served (+SRPO +prior, 10 beams, history excluded)": m, "+SRPO (direct)": m,
                          "+SRPO +prior (direct)": m, "+SRPO (reasoning)": {**m, "rows": 20},
                          "+SRPO (direct, first 20 rows)": {**m, "rows": 20},
                          "collaborative prior alone": m, "SASRec": m,
                          "weighted transitions": {"HR@10": 0.12, "NDCG@10": 0.06}},
              "served_vs_best_baseline": {"baseline": "weighted transitions", "mean": -0.01, "ci95_low": -0.02,
                                          "ci95_high": 0.0, "samples": 10}}
    lines: list[str] = []
    print_report(report, log=lines.append)
    main_table, subset_table = lines[1], lines[3]
    assert "reasoning" not in main_table and "first 20 rows" not in main_table
    assert "+SRPO (reasoning)" in subset_table and "first 20 rows" in subset_table
    assert "served - weighted transitions" in lines[-1]
    rows = plot_rows(report)
    assert rows[0] == report["served"] and not any("rows" in report["metrics"][r] for r in rows)
    assert "+SRPO +prior (direct)" not in rows
    out = plot_report(report, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
