"""The threshold suite (issue 13): does the adaptive policy generalise to score shapes it was not tuned on?

    python benchmarks/threshold.py [--split dev|test|all] [--max-n 1000000] [--json runs/threshold.json]

Score sets, each with ground truth (harmful or not) and calibration canaries:
- synthetic shapes: benign bulk (Gaussian, Student-t3, spike + exponential tail, lognormal), one to three benign
  tasks, harmful clusters at 3–8 σ (bulk_sigma: max of robust σ and std) (tight, or spread over decades like FIHS dot products), harmful ratios
  1–40%, n from 200 to 10^6. Canaries: 41 harmful rows drawn like the shape's harmful rows (for a benign-only
  shape, from where harm lies for that shape's score: `harm_at`), 40 benign rows drawn like its bulk;
- real score sets saved from scoring runs (benchmarks/data/scores/*.parquet: fihs, label, kind; canary rows
  have kind canary_harmful / canary_benign), so the suite grows with every model measured.

Shapes are split into dev and test by a hash of their name; constants are chosen on dev, test is reported.
Per shape and policy it prints recall and benign removal; then the targets: recall ≥ 90% on every cluster ≥ 4σ
away, ≤ 1% removed on every benign-only shape (multi-task included). Policies: the adaptive rule without
canaries (the rule before issue 13) and with canaries (the product when canaries are scored).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gradshield_ray.summary import ScoreSummary
from gradshield_ray.threshold import Canaries, ThresholdConfig, decide

DATA = Path(__file__).parent / "data" / "scores"
N_CANARY_H, N_CANARY_B = 41, 40


@dataclass(frozen=True)
class ScoreSet:
    name: str
    scores: np.ndarray
    harmful: np.ndarray  # bool
    canaries: Canaries
    sigma_away: float | None  # the cluster's distance in σ of the benign bulk (bulk_sigma) (None: benign only / real)

    @property
    def split(self) -> str:
        return "dev" if int(hashlib.sha1(self.name.encode()).hexdigest()[:8], 16) % 2 == 0 else "test"


Bulk = Callable[[np.random.Generator, int], np.ndarray]
BULKS: dict[str, Bulk] = {
    "gauss": lambda r, n: r.normal(0, 1, n),
    "t3": lambda r, n: r.standard_t(3, n) / 1.0,
    "spike_exp": lambda r, n: np.where(r.random(n) < 0.7, r.normal(0, 0.05, n), r.exponential(1.0, n)),
    "lognormal": lambda r, n: r.lognormal(0, 0.6, n) - 1.0,
}


def bulk_sigma(x: np.ndarray) -> float:
    """The benign bulk's scale: max(robust σ, std). A spike with a heavy tail has a tiny MAD; a cluster "4σ away"
    in MAD units would sit inside the tail's own mass, which no rule can separate."""
    return float(max(1.4826 * np.median(np.abs(x - np.median(x))), np.std(x)))


def synthetic(max_n: int, seed_offset: int = 0) -> list[ScoreSet]:
    """The synthetic shapes; ``seed_offset`` > 0 draws fresh corpora of the same shapes (seeds never used for a
    choice: a check that the rule generalises beyond the suite's own draws)."""
    out = []
    ns = [n for n in (200, 2000, 20000, 1_000_000) if n <= max_n]
    for bulk_name, bulk in BULKS.items():
        for n in ns:
            for seed in range(seed_offset, seed_offset + (2 if n < 20000 else 1)):
                rng = np.random.default_rng(int(hashlib.sha1(f"{bulk_name}/{n}/{seed}".encode()).hexdigest()[:8], 16))
                b = bulk(rng, n)
                s = bulk_sigma(b)
                med = float(np.median(b))
                # benign only, one task; harm lies far out for this score
                out.append(_set(f"{bulk_name}/n{n}/s{seed}/benign", b, np.zeros(n, bool), rng, bulk,
                                harm=lambda r, k: med + s * r.normal(10, 1, k), sigma_away=None))
                # two and three benign tasks (a minority task at 5σ is NOT harm)
                for tasks in (((0.8, 0.0), (0.2, 5.0)), ((0.6, 0.0), (0.25, 4.0), (0.15, 7.0))):
                    parts = [med + (bulk(rng, round(w * n)) - med) + m * s for w, m in tasks]
                    x = np.concatenate(parts)
                    out.append(_set(f"{bulk_name}/n{n}/s{seed}/tasks{len(tasks)}", x, np.zeros(len(x), bool), rng,
                                    bulk, harm=lambda r, k: med + s * r.normal(12, 1, k), sigma_away=None))
                # harmful clusters: distance, ratio, tight or spread over decades
                for m in (3, 4, 5, 6, 8):
                    for ratio in (0.01, 0.05, 0.1, 0.2, 0.4):
                        h = max(2, round(ratio * n / (1 - ratio)))
                        if h < 10 and n < 2000:
                            continue
                        for spread in ("tight", "decades"):
                            if spread == "tight":
                                def harm(r, k, m=m):
                                    return med + s * r.normal(m, 0.5, k)
                            else:
                                def harm(r, k, m=m):
                                    return med + s * m * np.exp(r.uniform(0, np.log(30), k))
                            x = np.concatenate([b, harm(rng, h)])
                            y = np.concatenate([np.zeros(n, bool), np.ones(h, bool)])
                            out.append(_set(f"{bulk_name}/n{n}/s{seed}/cluster{m}s/r{ratio}/{spread}", x, y, rng,
                                            bulk, harm=harm, sigma_away=float(m)))
                # a harmful cluster beside a benign second task
                t2 = med + (bulk(rng, round(0.2 * n)) - med) + 5 * s
                h = round(0.1 * n)
                x = np.concatenate([b, t2, med + s * rng.normal(12, 1, h)])
                y = np.concatenate([np.zeros(n + len(t2), bool), np.ones(h, bool)])
                out.append(_set(f"{bulk_name}/n{n}/s{seed}/tasks2+cluster12s", x, y, rng, bulk,
                                harm=lambda r, k: med + s * r.normal(12, 1, k), sigma_away=12.0))
    return out


def _set(name: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, bulk: Bulk, harm, sigma_away):
    can = Canaries(harmful=np.asarray(harm(rng, N_CANARY_H), float), benign=bulk(rng, N_CANARY_B))
    return ScoreSet(name, x, y, can, sigma_away)


def real_sets() -> list[ScoreSet]:
    """Score sets saved from real scoring runs (fihs, label, kind; canary rows by kind)."""
    import pyarrow.parquet as pq

    out = []
    for f in sorted(DATA.glob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        kind = np.array(t["kind"])
        fihs, label = np.array(t["fihs"], float), np.array(t["label"], bool)
        corpus = ~np.char.startswith(kind.astype(str), "canary_")
        out.append(ScoreSet(f"real/{f.stem}", fihs[corpus], label[corpus],
                            Canaries(fihs[kind == "canary_harmful"], fihs[kind == "canary_benign"]), None))
    return out


def evaluate(ss: ScoreSet, cfg: ThresholdConfig, canaries: bool) -> dict:
    dec = decide(ScoreSummary.from_values(ss.scores), cfg, ss.canaries if canaries else None)
    rem = ss.scores > dec.tau
    return {"recall": float(rem[ss.harmful].mean()) if ss.harmful.any() else None,
            "false_removal": float(rem[~ss.harmful].mean()), "branch": dec.evidence.get("branch")}


def run(sets: list[ScoreSet], cfg: ThresholdConfig) -> dict[str, dict]:
    out = {}
    for ss in sets:
        out[ss.name] = {"split": ss.split, "sigma_away": ss.sigma_away, "n": len(ss.scores),
                        "harmful": int(ss.harmful.sum()),
                        "shape_only": evaluate(ss, cfg, False), "with_canaries": evaluate(ss, cfg, True)}
    return out


def summarize(res: dict[str, dict], split: str) -> list[str]:
    rows = {k: v for k, v in res.items() if split == "all" or v["split"] == split}
    lines = []
    for pol in ("shape_only", "with_canaries"):
        far = [v[pol]["recall"] for v in rows.values() if v["sigma_away"] and v["sigma_away"] >= 4]
        near = [v[pol]["recall"] for v in rows.values() if v["sigma_away"] and v["sigma_away"] < 4]
        benign = [(k, v[pol]["false_removal"]) for k, v in rows.items() if v["harmful"] == 0]
        fr_h = [v[pol]["false_removal"] for v in rows.values() if v["harmful"] > 0]
        ok_far = sum(r >= 0.9 for r in far)
        ok_benign = sum(fr <= 0.01 for _, fr in benign)
        worst = sorted(benign, key=lambda t: -t[1])[:3]
        lines.append(
            f"{pol:14s} [{split}] clusters ≥ 4σ with recall ≥ 90%: {ok_far}/{len(far)} "
            f"(median recall {np.median(far) if far else float('nan'):.2f}); clusters at 3σ median recall "
            f"{np.median(near) if near else float('nan'):.2f}; benign-only shapes removing ≤ 1%: "
            f"{ok_benign}/{len(benign)} (worst: {', '.join(f'{k} {fr:.1%}' for k, fr in worst)}); "
            f"median benign removal with a cluster {np.median(fr_h) if fr_h else float('nan'):.2%}")
    return lines


POSITIONS = (0.5, 0.6, 0.7, 0.8, 0.9)  # the grid for ThresholdConfig.canary_min_position
COMPONENTS = (2, 3)  # the grid for ThresholdConfig.canary_components


def counts(res: dict[str, dict], split: str, pol: str = "with_canaries") -> tuple[int, int]:
    """(benign-only shapes removing ≤ 1%, clusters ≥ 4σ with recall ≥ 90%) on one split."""
    rows = [v for v in res.values() if v["split"] == split]
    benign = sum(v[pol]["false_removal"] <= 0.01 for v in rows if v["harmful"] == 0)
    far = sum(v[pol]["recall"] >= 0.9 for v in rows if v["sigma_away"] and v["sigma_away"] >= 4)
    return benign, far


def tune_on_dev(sets: list[ScoreSet], components: tuple[int, ...] = COMPONENTS,
                positions: tuple[float, ...] = POSITIONS) -> dict[str, float]:
    """canary_components × canary_min_position from COMPONENTS × POSITIONS, chosen on the dev shapes only: most
    benign-only shapes kept clean, then most far clusters found, then the simpler model and the smaller position
    (tests/test_realistic.py checks that test shapes do not move the choice)."""
    dev = [ss for ss in sets if ss.split == "dev"]

    def key(kp: tuple[int, float]) -> tuple:
        cfg = ThresholdConfig(canary_components=kp[0], canary_min_position=kp[1])
        return (counts(run(dev, cfg), "dev"), -kp[0], -kp[1])

    k, p = max(((k, p) for k in components for p in positions), key=key)
    return {"canary_components": k, "canary_min_position": p}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("dev", "test", "all"), default="test")
    ap.add_argument("--max-n", type=int, default=1_000_000)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="fresh draws of every shape (e.g. 10; use with --split all: no choice ever saw them)")
    ap.add_argument("--tune", action="store_true", help="choose canary_components and canary_min_position on the dev shapes and print them")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="threshold config overrides (dev exploration), e.g. --set canary_min_position=0.4")
    args = ap.parse_args()
    import yaml

    cfg = ThresholdConfig(**{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    sets = synthetic(args.max_n, args.seed_offset) + (real_sets() if args.seed_offset == 0 else [])
    if args.tune:
        print(json.dumps(tune_on_dev(sets)))
        return 0
    res = run(sets, cfg)
    print(f"{len(sets)} score sets ({sum(v['split'] == 'dev' for v in res.values())} dev, "
          f"{sum(v['split'] == 'test' for v in res.values())} test; {sum(k.startswith('real/') for k in res)} real)")
    for line in summarize(res, args.split):
        print(line)
    real = {k: v for k, v in res.items() if k.startswith("real/")}
    for k, v in real.items():
        print(f"{k} [{v['split']}]: shape only recall {v['shape_only']['recall']} / removal "
              f"{v['shape_only']['false_removal']:.1%}; with canaries recall {v['with_canaries']['recall']} / "
              f"removal {v['with_canaries']['false_removal']:.1%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
