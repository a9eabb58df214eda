"""Ray pipeline overhead vs the same scorer in a plain loop, and the reduce step at 10^7 scores.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline.py [--rows 600,12000] [--repeats 2]

Part 1 runs, in one process and side by side, (a) the scorer called in a plain loop (render + score, one
process, local Parquet) and (b) the full Ray pipeline (read → render tasks → 1 scorer actor → commit →
reduce → split → manifest) on the same rows and model, and prints rows/s, tokens/s and their ratio
(medians over repeats) for each corpus size. Part 2 decides τ from 10^7 synthetic scores the pipeline's way
(unit summaries from commit markers merged on the driver) and by a Ray Data scan of the fihs column (the
path for markers without a summary), reporting times, the driver's peak traced memory and summary sizes.
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
    from gradshield_ray.miniature.testing import build_tiny_llama, build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_llama(tok, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                             intermediate_size=688, seed=0)
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def plain_loop(cfg, files: list[Path]) -> tuple[float, int, int]:
    """The same scorer in one process, end to end: load the model and v, then read each row group and
    score it in chunks of cfg.ray.batch_rows cut in row order, exactly as the scorer actor does (same
    micro-batches, so the ratio measures Ray's overhead, not a different batch composition)."""
    from gradshield_ray.scorer import FIHSScorer
    from gradshield_ray.tables import score_table

    t = time.perf_counter()
    scorer = FIHSScorer(cfg)  # the pipeline's actors load too, inside its timed region
    rows, chunk = 0, cfg.ray.batch_rows
    for f in files:
        pf, off = pq.ParquetFile(f), 0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            for s in range(0, table.num_rows, chunk):
                part = table.slice(s, chunk)
                score_table(scorer, part, [f"{f.name}:{off + s + i}" for i in range(part.num_rows)])
            off += table.num_rows
        rows += off
    return time.perf_counter() - t, rows, scorer.stats.tokens


def ray_pipeline(cfg) -> tuple[float, float, int, int]:
    from gradshield_ray.ray_pipeline import run_pipeline

    t = time.perf_counter()
    man = run_pipeline(cfg)
    wall = time.perf_counter() - t
    return wall, man["scoring"]["seconds"], man["counts"]["input"], man["scoring"]["tokens_scored_this_attempt"]


def timed_then_traced(fn) -> tuple[float, int, object]:
    """(seconds of a plain call, peak traced bytes of a second call under tracemalloc, result). Two calls,
    because tracemalloc slows Python allocation several-fold and would inflate the time."""
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, out


def reduce_bench(root: Path, n: int = 10_000_000, unit_rows: int = 1000) -> dict:
    """τ from 10^7 synthetic scores, two ways, side by side:
    - merge: what the pipeline does. Each unit's summary is built where its parts are written (timed here
      as `build`, once per unit; in a run it is spread over the writer tasks) and travels in its commit
      marker; the driver merges n/unit_rows of them and decides τ (timed as `merge`).
    - scan: a Ray Data aggregate over the fihs column of the Parquet parts, which the pipeline uses only
      for units committed without a summary (markers of an older version)."""
    import json

    from gradshield_ray.ray_pipeline import aggregate_parts
    from gradshield_ray.summary import ScoreSummary
    from gradshield_ray.threshold import ThresholdConfig, decide

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_t(3, size=n - n // 10), rng.normal(12, 1, size=n // 10)])
    rng.shuffle(x)
    units = x.reshape(-1, unit_rows)
    t = time.perf_counter()
    markers = [json.dumps(ScoreSummary.from_values(u).to_dict()) for u in units]
    build = time.perf_counter() - t
    def merge_markers() -> tuple[ScoreSummary, float]:
        merged = ScoreSummary.merge_all(ScoreSummary.from_dict(json.loads(m)) for m in markers)
        return merged, decide(merged, ThresholdConfig()).tau

    merge, merge_peak, (merged, tau_merge) = timed_then_traced(merge_markers)
    d = root / "scores"
    d.mkdir()
    files = 20
    for k, chunk in enumerate(np.array_split(x, files)):
        pq.write_table(pa.table({"fihs": chunk, "pad": np.zeros(len(chunk), np.int8)}), d / f"p{k:03d}.parquet")
    import pyarrow.fs as pafs

    def scan_parts() -> tuple[ScoreSummary, object]:
        scanned = aggregate_parts(sorted(str(p) for p in d.glob("*.parquet")), pafs.LocalFileSystem())
        return scanned, decide(scanned, ThresholdConfig())

    scan, scan_peak, (scanned, decision) = timed_then_traced(scan_parts)
    assert np.array_equal(merged.counts, scanned.counts) and tau_merge == decision.tau
    return {"rows": merged.count, "units": len(markers), "build_s": build, "merge_s": merge,
            "merge_peak_MiB": merge_peak / 2**20, "scan_s": scan, "scan_peak_MiB": scan_peak / 2**20,
            "marker_KiB": statistics.median(len(m) for m in markers) / 1024,
            "summary_bytes": len(json.dumps(merged.to_dict())), "tau": decision.tau,
            "branch": decision.evidence.get("branch"), "raw_float64_MiB": n * 8 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="600,12000",
                    help="corpus sizes, comma-separated: the fixed costs (actor start, model load, four Ray Data "
                         "executions) weigh less as the corpus grows, so the ratio is reported per size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--row-group-rows", type=int, default=1000,
                    help="rows per Parquet row group = per pipeline unit (one task, one part file and one commit "
                         "marker each); real corpora usually have 10^4-10^6")
    ap.add_argument("--skip-reduce", action="store_true")
    ap.add_argument("--only-reduce", action="store_true", help="part 2 only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import ray

    from gradshield_ray.config import GradShieldConfig
    from gradshield_ray.miniature.demo import make_corpus

    root = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    try:
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        model = build_model(root)
        table_rows = []
        for n_rows in [] if args.only_reduce else [int(x) for x in args.rows.split(",")]:
            src = make_corpus(root / f"in{n_rows}", n_rows=n_rows, n_files=6, seed=1)
            files = sorted(src.glob("*.parquet"))
            for f in files:  # several row groups per file, as real corpora have
                pq.write_table(pq.read_table(f), f, row_group_size=args.row_group_rows)
            base = {"input": str(src), "model": {"path": model}, "proxy": {"max_probes": 8},
                    "score": {"verify_rows": 0}, "ray": {"num_actors": 1}}
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
            print(f"\nreduce of {r['rows']:,} scores (raw float64 would be {r['raw_float64_MiB']:.0f} MiB), "
                  f"tau={r['tau']:.3f} ({r['branch']}), the same both ways:")
            print(f"  merge (the pipeline): {r['units']:,} unit summaries (median {r['marker_KiB']:.1f} KiB "
                  f"as JSON) merged in {r['merge_s']:.1f}s, driver peak traced memory "
                  f"{r['merge_peak_MiB']:.1f} MiB; building them took {r['build_s']:.1f}s in total "
                  "(spread over the writer tasks in a run)")
            print(f"  scan (units without a summary): Ray Data aggregate over the fihs column {r['scan_s']:.1f}s, "
                  f"driver peak traced memory {r['scan_peak_MiB']:.1f} MiB; merged summary "
                  f"{r['summary_bytes']:,} bytes as JSON")
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
