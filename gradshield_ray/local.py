"""The single-process runner over local Parquet: score → threshold → filter, one file at a time.

Layout under the output directory (input layout mirrored below each folder):
  scored/   every input column + gs_row_id + fihs, gs_n_tokens, gs_n_loss_tokens, gs_truncated, gs_error
  kept/     scored rows with fihs ≤ τ        removed/  scored rows with fihs > τ
  errors/   rows that could not be scored, with gs_error
  threshold.json, histogram.png, report.html (the review page), report.json (written last)
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import LocalFileSystem

from gradshield_ray import jsonl, report, report_html, storage
from gradshield_ray.render import required_columns
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.listing import list_input, row_id
from gradshield_ray.parquet_io import InputError, iter_batches, list_parquet, write_table
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.tables import (
    SCORE_SCHEMA, ROW_ID, check_input_schema, finite_scores, score_table, split_table,
)
from gradshield_ray.threshold import Canaries, ThresholdDecision, decide

log = logging.getLogger("gradshield_ray")
SPLITS = ("kept", "removed", "errors")
CANARIES = "canaries.json"  # the calibration canaries' scores (never rows of any output)


def _out(cfg: GradShieldConfig) -> Path:
    if not cfg.output:
        raise ValueError("output is not set (--output or `output:` in the config)")
    return Path(cfg.output)


def preflight(cfg: GradShieldConfig) -> tuple[Path, list[Path], int]:
    """List the input, check every file's schema and count rows before any model is loaded. A 0-byte
    *.parquet file has no rows and is skipped (reported); any other unreadable file fails the run, naming
    it, because its rows are unknown."""
    if not cfg.input:
        raise ValueError("input is not set (--input or `input:` in the config)")
    root, files = list_parquet(cfg.input, with_jsonl=True)
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:
        log.warning("skipping %d empty (0-byte) input file(s), e.g. %s", len(empty), empty[0])
        files = [f for f in files if f.stat().st_size > 0]
    total = 0
    for f in files:
        if jsonl.is_jsonl(f.name):  # no schema to check: a line without the chat column is an error row
            total += jsonl.count_rows(LocalFileSystem(), str(f), f.relative_to(root).as_posix())
            continue
        try:
            meta = pq.ParquetFile(f)
        except Exception as e:
            raise InputError(f"{f}: not a readable Parquet file ({e})") from None
        check_input_schema(meta.schema_arrow, cfg.data, str(f))
        total += meta.metadata.num_rows
    if total == 0:
        raise InputError(f"input {cfg.input!r} has no rows")
    return root, files, total


def input_inventory(cfg: GradShieldConfig) -> dict[str, Any]:
    """What the input holds besides the files read: 0-byte *.parquet files (skipped) and files not named
    *.parquet (not input); written into report.json so nothing is left out silently. The same listing as
    the Ray runner's (listing.list_input), so both report the same."""
    return list_input(cfg).report()


def progress_bar(total: int):
    """A rows progress bar (rows/s, ETA) on a terminal; nothing when stderr is not a TTY or logging is
    quieter than INFO (--quiet). The same numbers are logged either way."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc="scoring", dynamic_ncols=True,
                disable=not (sys.stderr.isatty() and log.isEnabledFor(logging.INFO)))


def _batches(f: Path, rel: str, cfg: GradShieldConfig) -> Iterator[tuple[pa.Table, list[str] | None]]:
    """(rows, their ids or None for file:index) in batches of rows_per_batch. A JSONL file is read whole
    (its row ids are file:line, from the reader); a Parquet file batch by batch."""
    if not jsonl.is_jsonl(f.name):
        yield from ((t, None) for t in iter_batches(f, cfg.rows_per_batch))
        return
    t = jsonl.read_file(LocalFileSystem(), str(f), rel, required_columns(cfg.data))
    for start in range(0, t.num_rows, cfg.rows_per_batch):
        part = t.slice(start, cfg.rows_per_batch)
        yield part.drop_columns([ROW_ID]), part[ROW_ID].to_pylist()


def run_score(cfg: GradShieldConfig, scorer=None) -> dict[str, Any]:
    """Score every input row into scored/ (one output file per input file)."""
    from gradshield_ray.scorer import FIHSScorer

    root, files, total = preflight(cfg)
    out = _out(cfg)
    scorer = scorer or FIHSScorer(cfg)
    (out / CANARIES).unlink(missing_ok=True)
    t0, done = time.perf_counter(), 0
    bar = progress_bar(total)
    for f in files:
        rel = f.relative_to(root)
        parts, offset = [], 0
        for table, ids in _batches(f, rel.as_posix(), cfg):
            ids = ids or [row_id(rel.as_posix(), offset + i) for i in range(table.num_rows)]
            parts.append(score_table(scorer, table, ids))
            offset += table.num_rows
            done += table.num_rows
            bar.update(table.num_rows)
            rate = done / max(time.perf_counter() - t0, 1e-9)
            log.info("scored %d/%d rows (%.1f rows/s, ETA %.0fs)", done, total, rate, (total - done) / rate)
        if not parts:  # a zero-row file still gets its (empty) outputs
            schema = (jsonl.read_file(LocalFileSystem(), str(f), rel.as_posix(), required_columns(cfg.data)).schema
                      if jsonl.is_jsonl(f.name) else pq.ParquetFile(f).schema_arrow.append(pa.field(ROW_ID, pa.string())))
            for fld in SCORE_SCHEMA:
                schema = schema.append(fld)
            parts = [schema.empty_table()]
        write_table(pa.concat_tables(parts), out / "scored" / (
            rel.with_name(rel.name + ".parquet") if jsonl.is_jsonl(rel.name) else rel))
    bar.close()
    if cfg.threshold.canaries != "off":
        can = scorer.score_canaries()
        report.write_json({"harmful": can.harmful.tolist(), "benign": can.benign.tolist()}, out / CANARIES)
    return {"rows": done, "files": len(files), "seconds": time.perf_counter() - t0,
            "tokens": scorer.stats.tokens, "padded_tokens": scorer.stats.padded_tokens,
            "memory_budget_mb": scorer.budget_bytes / 2**20, "oom_splits": scorer.stats.oom_splits,
            "proxy": {"S_theta0": scorer.s0, "v_norm": scorer.v_norm, "n_probes": scorer.n_probes,
                      "comply_id": scorer.comply_id, "refuse_id": scorer.refuse_id}}


def scored_files(cfg: GradShieldConfig) -> tuple[Path, list[Path]]:
    d = _out(cfg) / "scored"
    if not d.is_dir():
        raise InputError(f"{d} does not exist: run `gradshield-ray score` first")
    return list_parquet(d)


def load_canaries(cfg: GradShieldConfig) -> Canaries | None:
    """The canary scores `score` wrote beside scored/ (None when threshold.canaries is off)."""
    if cfg.threshold.canaries == "off":
        return None
    path = _out(cfg) / CANARIES
    if not path.is_file():
        raise InputError(f"{path} does not exist: rerun `gradshield-ray score` (threshold.canaries is "
                         f"{cfg.threshold.canaries!r}), or set threshold.canaries=off")
    d = json.loads(path.read_text())
    return Canaries(harmful=np.asarray(d["harmful"], float), benign=np.asarray(d["benign"], float))


def run_threshold(cfg: GradShieldConfig) -> tuple[ThresholdDecision, ScoreSummary]:
    """The global reduce: a mergeable summary of every fihs value → the policy's τ."""
    _, files = scored_files(cfg)
    summary = ScoreSummary.empty()
    for f in files:
        summary = summary.merge(ScoreSummary.from_values(finite_scores(pq.read_table(f, columns=["fihs"]))))
    decision = decide(summary, cfg.threshold, load_canaries(cfg))
    report.write_json({"tau": decision.tau, "policy": decision.policy, "evidence": decision.evidence,
                       "summary": summary.to_dict()}, _out(cfg) / "threshold.json")
    return decision, summary


def run_filter(cfg: GradShieldConfig, scorer=None) -> dict[str, Any]:
    """score → threshold → split; report.json is written last, after every shard exists."""
    out = _out(cfg)
    for stale in ("report.json", "report.html"):  # never leave a stale report beside new shards
        (out / stale).unlink(missing_ok=True)
    score_info = run_score(cfg, scorer)
    decision, summary = run_threshold(cfg)
    root, files = scored_files(cfg)
    counts = {k: 0 for k in ("input", *SPLITS)}
    samples: dict[str, list] = {"kept": [], "removed": []}  # report.html's rows (highest fihs of each)
    for f in files:
        scored = pq.read_table(f)
        counts["input"] += scored.num_rows
        for name, part in split_table(scored, decision.tau).items():
            counts[name] += part.num_rows
            write_table(part, out / name / f.relative_to(root))
            if name in samples:
                samples[name] = report_html.merge_top(samples[name], report_html.top_rows(part, cfg.data))
    fs, root_out = storage.filesystem(str(out), storage.StorageConfig())
    return report.finalize(cfg, fs, root_out, counts, decision, summary, score_info, input_inventory(cfg),
                           samples=samples)
