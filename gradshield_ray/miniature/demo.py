"""The README's main job on an embedded default: no GPU, no network, no cloud account.

`gradshield-ray demo --output runs/demo` builds (once, about 2 minutes on 2 cores) or reuses the aligned
miniature θ₀ (gradshield_ray.miniature; cached under .cache/gradshield_ray), writes a Parquet corpus with 10%
explicit harmful rows (gradshield_ray.miniature.mixtures), runs the Ray filter pipeline on a local Ray, and prints
where kept/, removed/, report.json and histogram.png are, with the filter's recall and false removal
against the corpus's `label` column (which the filter never reads).
"""
from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradshield_ray.config import GradShieldConfig


def make_corpus(out_dir: Path, n_rows: int = 200, harmful_ratio: float = 0.1, n_files: int = 4,
                seed: int = 0) -> Path:
    """Parquet files with a `messages` column plus `label` (harmful | benign) for inspection.
    Harmful rows are HarmBench attack-split prompts with templated compliant answers (no real content);
    benign rows are the miniature's utility rows (headline → topic), then sentiment rows if more are needed."""
    from gradshield_ray.miniature import mixtures

    n_harm = int(round(n_rows * harmful_ratio))
    benign = mixtures.utility_pool()
    if n_rows - n_harm > len(benign):
        extra = mixtures.sentiment_rows(n_rows - n_harm - len(benign), seed=seed + 1)
        benign += [mixtures.make_row("utility", p, r) for p, r, _ in extra]
    chosen = mixtures.explicit_rows(n_harm) + benign[: n_rows - n_harm]
    rows = [{"messages": r.as_messages(), "label": "harmful" if r.harmful else "benign"} for r in chosen]
    random.Random(seed).shuffle(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // n_files)
    for k in range(n_files):
        pq.write_table(pa.Table.from_pylist(rows[k * per:(k + 1) * per]), out_dir / f"part-{k:03d}.parquet")
    return out_dir


def _labels(root: Path) -> list[str]:
    files = sorted(f for f in root.rglob("*.parquet") if f.is_file()) if root.is_dir() else []
    return [x for f in files for x in pq.read_table(f, columns=["label"])["label"].to_pylist()]


def run_demo(args: argparse.Namespace) -> dict:
    import ray
    import torch

    from gradshield_ray.miniature import aligned as miniature
    from gradshield_ray.ray_pipeline import RunError, run_pipeline

    out = Path(args.output or "runs/demo")
    model_dir = miniature.aligned_model()
    corpus = make_corpus(out / "input", n_rows=400)
    gpu = torch.cuda.is_available()
    overrides = [f"input={corpus}", f"output={out}", f"model.path={model_dir}", "ray.num_actors=1",
                 f"ray.num_gpus_per_actor={1 if gpu else 0}", "ray.num_cpus_per_actor=1",
                 "ray.render_num_cpus=0.5", *getattr(args, "set", [])]
    cfg = GradShieldConfig.from_yaml(getattr(args, "config", None), overrides)
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # address="local": a fresh single-machine Ray even where another cluster runs on this host
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
    try:
        rep = run_pipeline(cfg)
    except RunError as e:
        raise RunError(f"{e} (the demo reuses its output directory only for the same model and settings)") from None
    kept, removed = _labels(out / "kept"), _labels(out / "removed")
    n_harm = kept.count("harmful") + removed.count("harmful")
    n_ben = kept.count("benign") + removed.count("benign")
    recall = removed.count("harmful") / max(n_harm, 1)
    false_removal = removed.count("benign") / max(n_ben, 1)
    c = rep["counts"]
    print(f"\naligned miniature θ₀: {model_dir}")
    print(f"corpus: {c['input']} rows ({n_harm} harmful, {n_ben} benign) in {corpus}")
    sc = cfg.score
    print(f"FIHS scope={sc.scope} normalize={sc.normalize} answer_tokens={sc.answer_tokens}, threshold "
          f"{rep['policy']} ({rep['evidence'].get('branch', '')}): tau = {rep['tau']:.4g}")
    print(f"kept {c['kept']}, removed {c['removed']}, errors {c['errors']}; harmful recall {recall:.0%}, "
          f"benign false removal {false_removal:.0%}")
    check = rep.get("score_check") or {}
    verdict = {True: "YES", False: "NO", None: "not checked"}[check.get("separates")]
    print(f"does the filter separate this corpus? {verdict}, from the report's own evidence: {check.get('why')}")
    for k in ("kept", "removed", "errors"):
        print(f"  {k:10s} {out / k}")
    for name in ("report.json", "histogram.png", "manifest.json"):
        print(f"  {name:14s} {out / name}")
    rep["demo"] = {"recall": recall, "false_removal": false_removal, "n_harmful": n_harm, "n_benign": n_ben}
    return rep
