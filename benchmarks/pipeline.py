"""Ray pipeline overhead vs the same scorer in a plain loop, and the reduce step at 10^7 scores.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline.py [--rows 600,12000] [--repeats 2]

Part 1 runs, in one process and side by side, (a) the scorer called in a plain loop (render + score, one
process, local Parquet) and (b) the full Ray pipeline (read → render tasks → 1 scorer actor → commit →
reduce → split → manifest) on the same rows and model, and prints rows/s, tokens/s and their ratio
(medians over repeats) for each corpus size. Part 2 writes 10^7 synthetic scores as Parquet and times the Ray Data reduce
(fihs column → mergeable summary → τ), reporting the driver's peak traced memory and the summary's size.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


def build_model(root: Path) -> str:
    from gradshield_ray.testing import build_tiny_llama, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_llama(tok, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                             intermediate_size=688, seed=0)
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def plain_loop(cfg, files: list[Path]) -> tuple[float, int, int]:
    from gradshield_ray.scorer import FIHSScorer
    from gradshield_ray.tables import score_table

    scorer = FIHSScorer(cfg)  # load once, outside the timed region (the pipeline also loads once per actor)
    t = time.perf_counter()
    rows = 0
    for f in files:
        table = pq.read_table(f)
        score_table(scorer, table, [f"{f.name}:{i}" for i in range(table.num_rows)])
        rows += table.num_rows
    return time.perf_counter() - t, rows, scorer.stats.tokens


def ray_pipeline(cfg) -> tuple[float, float, int, int]:
    from gradshield_ray.ray_pipeline import run_pipeline

    t = time.perf_counter()
    man = run_pipeline(cfg)
    wall = time.perf_counter() - t
    return wall, man["scoring"]["seconds"], man["counts"]["input"], man["scoring"]["tokens_scored_this_attempt"]


def reduce_bench(root: Path, n: int = 10_000_000, files: int = 20) -> dict:
    import ray

    from gradshield_ray.ray_pipeline import SummaryAgg
    from gradshield_ray.summary import ScoreSummary
    from gradshield_ray.threshold import ThresholdConfig, decide

    rng = np.random.default_rng(0)
    d = root / "scores"
    d.mkdir()
    per = n // files
    for k in range(files):
        x = np.concatenate([rng.standard_t(3, size=per - per // 10), rng.normal(12, 1, size=per // 10)])
        pq.write_table(pa.table({"fihs": x, "pad": np.zeros(per, np.int8)}), d / f"p{k:03d}.parquet")
    tracemalloc.start()
    t = time.perf_counter()
    agg = ray.data.read_parquet(str(d), columns=["fihs"]).aggregate(SummaryAgg.build())
    summary = ScoreSummary.from_dict(agg["summary"])
    decision = decide(summary, ThresholdConfig())
    wall = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    import json

    return {"rows": summary.count, "seconds": wall, "driver_peak_MiB": peak / 2**20,
            "summary_bytes": len(json.dumps(summary.to_dict())), "tau": decision.tau,
            "branch": decision.evidence.get("branch"),
            "raw_float64_MiB": n * 8 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="600,12000",
                    help="corpus sizes, comma-separated: the fixed costs (actor start, model load, four Ray Data "
                         "executions) weigh less as the corpus grows, so the ratio is reported per size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--row-group-rows", type=int, default=50,
                    help="rows per Parquet row group = per pipeline unit (one task, one part file and one commit "
                         "marker each); real corpora usually have 10^4-10^6")
    ap.add_argument("--skip-reduce", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import ray

    from gradshield_ray.config import GradShieldConfig
    from gradshield_ray.demo import make_corpus

    root = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    try:
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        model = build_model(root)
        table_rows = []
        for n_rows in [int(x) for x in args.rows.split(",")]:
            src = make_corpus(root / f"in{n_rows}", n_rows=n_rows, n_files=6, seed=1)
            files = sorted(src.glob("*.parquet"))
            for f in files:  # several row groups per file, as real corpora have
                pq.write_table(pq.read_table(f), f, row_group_size=args.row_group_rows)
            base = {"input": str(src), "model": {"path": model}, "proxy": {"max_probes": 8},
                    "score": {"verify_rows": 0}, "ray": {"num_actors": 1, "batch_rows": 64}}
            loop_t, ray_t = [], []
            for r in range(args.repeats):
                cfg = GradShieldConfig.model_validate({**base, "output": str(root / f"out{n_rows}-{r}")})
                lt, rows, tokens = plain_loop(cfg, files)
                wall, _, prow, ptok = ray_pipeline(cfg)
                assert prow == rows and ptok == tokens
                loop_t.append(lt)
                ray_t.append(wall)
                print(f"{n_rows} rows, repeat {r}: plain loop {lt:.1f}s, ray pipeline {wall:.1f}s "
                      "(end to end, incl. reduce + split)", flush=True)
            lt, rt = statistics.median(loop_t), statistics.median(ray_t)
            table_rows.append((rows, tokens, lt, rt))
        print(f"\nmedians of {args.repeats}; 1 torch thread; 2-core box; score.answer_tokens = default; "
              f"{args.row_group_rows} rows per row group")
        print("| rows | tokens | plain loop s | plain rows/s | Ray end-to-end s | Ray rows/s | Ray tokens/s | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for rows, tokens, lt, rt in table_rows:
            print(f"| {rows} | {tokens} | {lt:.1f} | {rows / lt:.1f} | {rt:.1f} | {rows / rt:.1f} | "
                  f"{tokens / rt:.0f} | {lt / rt:.2f} |")
        if not args.skip_reduce:
            r = reduce_bench(root)
            print(f"\nreduce of {r['rows']:,} scores: {r['seconds']:.1f}s, driver peak traced memory "
                  f"{r['driver_peak_MiB']:.1f} MiB (raw float64 would be {r['raw_float64_MiB']:.0f} MiB), "
                  f"summary {r['summary_bytes']:,} bytes as JSON, tau={r['tau']:.3f} ({r['branch']})")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
