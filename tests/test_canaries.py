"""Calibration canaries (issue 13): the threshold's evidence beyond the score's shape, and their plumbing.

A score distribution alone cannot tell a benign minority task from a harmful cluster at the same distance. The
rule with canaries removes a high component only when it sits with the harmful canaries, removes only the far tail
when the score does not separate the canaries, and says so in the report. The canaries never reach an output."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from gradshield_ray import canaries as C
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.threshold import Canaries, ThresholdConfig, decide, separation_verdict


def removed(x: np.ndarray, can: Canaries | None, **cfg) -> np.ndarray:
    d = decide(ScoreSummary.from_values(x), ThresholdConfig(**cfg), can)
    return x > d.tau


@pytest.mark.parametrize("seed", range(5))
def test_benign_second_task_is_kept_when_harm_lies_elsewhere(seed):
    """Issue 13 §3: an 80/20 corpus of two benign tasks, the second at +5σ. The shape-only rule removes the whole
    minority task; with canaries (harm at +12σ for this score) nothing of it goes."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, 1600), rng.normal(5, 1, 400)])
    can = Canaries(harmful=rng.normal(12, 1, 41), benign=rng.normal(0, 1, 40))
    assert removed(x, None, canaries="report")[1600:].mean() > 0.9  # the trap the shape-only rule falls into
    assert removed(x, can).mean() <= 0.01


@pytest.mark.parametrize("seed", range(5))
def test_a_clear_gap_with_few_rows_is_cut_when_it_sits_with_the_canaries(seed):
    """Issue 13 §1: a 9% cluster behind an obvious gap that the shape tests reject (small Λ/N, dip p ≈ 0.35)."""
    rng = np.random.default_rng(seed)
    benign = rng.normal(0, 1, 300)
    harm = rng.normal(6, 0.7, 30)
    x = np.concatenate([benign, harm])
    can = Canaries(harmful=rng.normal(6, 0.7, 41), benign=rng.normal(0, 1, 40))
    rem = removed(x, can)
    assert rem[300:].mean() >= 0.9 and rem[:300].mean() <= 0.01


def test_uninformative_canaries_remove_only_the_tail_and_say_so():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 900), rng.normal(8, 0.5, 100)])
    can = Canaries(harmful=rng.normal(0, 1, 41), benign=rng.normal(0, 1, 40))  # the score does not separate them
    d = decide(ScoreSummary.from_values(x), ThresholdConfig(), can)
    assert d.evidence["branch"] == "no_harmful_population"
    assert d.evidence["canaries"]["informative"] is False
    assert d.evidence["checks"]["canaries_informative"] is False
    v = separation_verdict(d.evidence)
    assert v["separates"] is False and "does NOT separate" in v["why"]


def test_report_mode_is_the_shape_rule_plus_evidence():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, 900), rng.normal(8, 0.5, 100)])
    can = Canaries(harmful=rng.normal(8, 0.5, 41), benign=rng.normal(0, 1, 40))
    shape = decide(ScoreSummary.from_values(x), ThresholdConfig())
    rep = decide(ScoreSummary.from_values(x), ThresholdConfig(canaries="report"), can)
    assert rep.tau == shape.tau and rep.evidence["canaries"]["informative"] is True
    assert separation_verdict(rep.evidence)["separates"] is True
    assert separation_verdict(shape.evidence)["separates"] is None


def test_non_finite_canaries_are_refused():
    with pytest.raises(ValueError, match="canary scores must be finite"):
        decide(ScoreSummary.from_values(np.arange(10.0)), None, Canaries(np.array([np.nan]), np.array([0.0])))


def test_canary_rows_are_chat_rows_with_varied_openings():
    ben = C.benign_canaries()
    harm = C.harmful_canaries(["p1", "p2", "p3", "p4", "p5", "p6", "p7"])
    assert len(ben) == 40 and len(harm) == 7
    assert all([m["role"] for m in r] == ["user", "assistant"] for r in ben + harm)
    assert len({r[1]["content"].split()[0] for r in ben}) >= 10  # not all "Sure"
    assert len({r[1]["content"] for r in harm}) == len(C.HARMFUL_ANSWERS)


def test_local_filter_scores_canaries_reports_them_and_never_outputs_them(tmp_path, tiny_model_dir):
    """The single-process runner: canaries.json beside scored/, the verdict in report.json, no canary row in any
    output, and the run's row counters do not count them."""
    import pyarrow as pa

    from gradshield_ray import local
    from gradshield_ray.config import GradShieldConfig

    inp = tmp_path / "in"
    inp.mkdir()
    rows = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
            for i in range(12)]
    pq.write_table(pa.table({"messages": rows}), inp / "a.parquet")
    cfg = GradShieldConfig.model_validate({"input": str(inp), "output": str(tmp_path / "out"),
                                           "model": {"path": tiny_model_dir}})
    rep = local.run_filter(cfg)
    out = tmp_path / "out"
    can = json.loads((out / "canaries.json").read_text())
    assert len(can["harmful"]) == 41 and len(can["benign"]) == 40
    assert rep["evidence"]["canaries"]["n_harmful"] == 41
    assert rep["score_check"]["separates"] in (True, False)
    assert rep["scoring"]["rows"] == 12 and rep["counts"]["input"] == 12
    texts = [m["content"] for f in out.rglob("*.parquet") for t in pq.read_table(f)["messages"].to_pylist()
             for m in t]
    assert len(texts) == 2 * 24  # scored/ and kept/+removed/: 12 rows of 2 turns each, nothing else
    canary_texts = {m["content"] for r in C.benign_canaries() for m in r} | set(C.HARMFUL_ANSWERS)
    assert not canary_texts & set(texts)
    # threshold alone reads them back; with canaries off it needs none
    d, _ = local.run_threshold(cfg)
    assert d.evidence["canaries"]["n_benign"] == 40
    (out / "canaries.json").unlink()
    with pytest.raises(Exception, match="canaries.json does not exist"):
        local.run_threshold(cfg)
    off = cfg.model_copy(update={"threshold": ThresholdConfig(canaries="off")})
    assert "canaries" not in local.run_threshold(off)[0].evidence
