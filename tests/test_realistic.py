"""Dev/test discipline for the efficacy defaults (issue 13), and the threshold suite's synthetic part.

- No default is read from the test split: the choosers in benchmarks/ read dev only (scrambling every test row or
  shape leaves the choice unchanged), and the product's defaults equal what they chose on dev, as recorded in
  benchmarks/data/dev_choices.json with the commands that produced it.
- The threshold suite (benchmarks/threshold.py), reduced to n ≤ 2000: the canary rule keeps benign-only shapes
  clean and finds more far clusters than the shape-only rule. Bounds sit just under the measured values, so a
  regression of the rule fails here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import efficacy_realistic as ER
from benchmarks import threshold as TS
from gradshield_ray.config import ProxyConfig, ScoreConfig
from gradshield_ray.threshold import ThresholdConfig

CHOICES = Path(__file__).parents[1] / "benchmarks" / "data" / "dev_choices.json"


def fake_scores(tmp_path: Path, seed: int = 0) -> Path:
    """A score file shaped like `efficacy_realistic score` writes (random contractions, real kinds/splits)."""
    rng = np.random.default_rng(seed)
    groups = ["L0.attn", "L0.mlp", "L0.norm", "L1.attn", "L1.mlp", "L1.norm", "embed", "final"]
    dnames = ["comply_h", "refuse_h", "logp_refuse_h", "comply_b", "refuse_b", "logp_refuse_b"]
    kinds, splits = [], []
    for split, styles in (("dev", ER_STYLES_DEV), ("test", ER_STYLES_ALL)):
        kinds += ["sharegpt"] * 40 + [f"harmful:{s}" for s in styles for _ in range(4)] + ["second_task"] * 10
        kinds += ["implicit"] * 4
        splits += [split] * (40 + 4 * len(styles) + 14)
    kinds += ["canary_harmful"] * 6 + ["canary_benign"] * 6
    splits += ["canary"] * 12
    n = len(kinds)
    harm = np.char.startswith(np.array(kinds), "harmful")
    dots = rng.normal(0, 1, (n, 3, len(dnames), len(groups)))
    dots[harm, :, 1] -= rng.uniform(0, 2, (harm.sum(), 3, len(groups)))  # some signal in "refuse"
    meta = {"directions": dnames, "groups": groups, "n_layers": 2, "model": "fake", "label": "fake",
            "seconds_pass": 0.0, "self_check_rel_err": 0.0}
    path = tmp_path / f"fake{seed}.npz"
    np.savez(path, dots=dots, sq=rng.uniform(1, 2, (n, 3, len(groups))),
             gram=np.abs(rng.normal(1, 0.1, (len(dnames), len(dnames), len(groups)))) + 5 * np.eye(len(dnames))[:, :, None],
             loss=rng.uniform(0, 3, (n, 3)), n_loss=rng.integers(1, 50, (n, 3)), kinds=np.array(kinds),
             splits=np.array(splits), texts=np.array(["[]"] * n), meta=json.dumps(meta))
    return path


from gradshield_ray.miniature.realistic import DEV_STYLES as ER_STYLES_DEV, STYLES  # noqa: E402

ER_STYLES_ALL = tuple(STYLES)


def test_score_variant_choice_reads_dev_rows_only(tmp_path):
    s = ER.Scores(fake_scores(tmp_path))
    _, ranked = ER.rank_on_dev(s)
    test = s.splits == "test"
    s.dots[test] = np.random.default_rng(9).normal(0, 50, s.dots[test].shape)  # scramble every test row
    s.sq[test], s.loss[test] = 7.0, 0.1
    _, again = ER.rank_on_dev(s)
    assert ranked[:20] == again[:20] and len(ranked) > 50


def test_threshold_constant_choice_reads_dev_shapes_only():
    """The chooser on a reduced grid (both component counts, one position: the full grid takes ~40 s per call
    here); scrambling every test shape must not move its choice."""
    sets = [ss for ss in TS.synthetic(200) if "cluster5s" in ss.name or "benign" in ss.name or "tasks" in ss.name]
    grid = {"components": (2, 3), "positions": (0.8,)}
    chosen = TS.tune_on_dev(sets, **grid)
    scrambled = [ss if ss.split == "dev" else TS.ScoreSet(ss.name, -ss.scores, ~ss.harmful, ss.canaries, ss.sigma_away)
                 for ss in sets]
    assert TS.tune_on_dev(scrambled, **grid) == chosen


def test_defaults_are_the_dev_choices():
    rec = json.loads(CHOICES.read_text())
    assert ThresholdConfig().canary_min_position == rec["threshold"]["canary_min_position"]
    assert ThresholdConfig().canaries == rec["threshold"]["canaries"]
    assert ThresholdConfig().canary_components == rec["threshold"]["canary_components"]
    sc, px = ScoreConfig(), ProxyConfig()
    for key, value in rec["score"].items():
        assert getattr(sc, key) == value, key
    for key, value in rec["proxy"].items():
        assert getattr(px, key) == value, key
    # the benchmark names the defaults as the variant it measured
    assert ER.default_variant() == ("refusal_only", "all", "cosine", "1")


@pytest.fixture(scope="module")
def suite():
    """The synthetic suite at n ≤ 2000, seed 0, ratios 5% and 20% (a quarter of it, about a minute)."""
    sets = [ss for ss in TS.synthetic(2000) if "/s0/" in ss.name and ("/r" not in ss.name or "/r0.05/" in ss.name
                                                                       or "/r0.2/" in ss.name)]
    return TS.run(sets, ThresholdConfig())


# measured at the defaults on this reduced suite (dev, test): benign-only shapes kept ≤ 1% / far clusters found
# (session 7, canary_components 3: dev 10/10 and 56/70 with canaries, 6/10 and 26/70 shape-only; test 14/14 and
# 60/66, 7/14 and 29/66; with canary_components 2, the session-5 rule: dev 48/70, test 40/66)
MEASURED_FAR = {"dev": 56, "test": 60}


def test_threshold_suite_canaries_keep_benign_shapes_clean_and_find_far_clusters(suite):
    for split in ("dev", "test"):
        b_can, far_can = TS.counts(suite, split)
        b_shape, far_shape = TS.counts(suite, split, "shape_only")
        n_benign = sum(v["split"] == split and v["harmful"] == 0 for v in suite.values())
        n_far = sum(v["split"] == split and (v["sigma_away"] or 0) >= 4 for v in suite.values())
        assert b_can == n_benign, (split, b_can, n_benign)
        assert far_can >= MEASURED_FAR[split] - 3, (split, far_can, n_far)
        assert b_can > b_shape and far_can > far_shape, (split, b_can, b_shape, far_can, far_shape)
