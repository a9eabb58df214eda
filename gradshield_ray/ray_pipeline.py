"""The distributed filter, as a driver: pass 1 (score, resumable) → reduce (τ) → pass 2 (split) →
manifest.json last. The stages are in stages.py, the commit/resume state in ledger.py, the input listing
in listing.py.

Output layout under `output` (local path or s3://):
  run.json                        the run's identity (config + model fingerprint); a rerun must match it
  scored/<file>/rg-<k>/part-<offset>.parquet     scored rows of row group k of an input file
  scored/_units/<unit>.json       commit marker of a unit: its parts, row count and score summary (resume
                                  skips these units; the reduce merges their summaries, so τ needs no
                                  second read of the scores)
  kept/ removed/ errors/          the same part layout, split by τ
  threshold.json, report.json, report.html, histogram.png, manifest.json (the commit marker of the whole run)

Resume: state lives in object storage. A rerun skips units with a marker, deletes partial parts of
the others and rescores them; pass 2 is cheap and is redone whole until manifest.json exists. Markers
without a summary (written by an older version) are reduced from their parts' fihs column instead.

Fail fast: the driver checks the model (tokenizer, config, weight-file headers), the probes, the input
listing and the output prefix (bucket, credentials, identity) before Ray starts. run.json is written just
before the first unit commits, so a prefix holds a run identity exactly when it holds committed work.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from gradshield_ray import faults as fault
from gradshield_ray import report, report_html, storage
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.errors import DatasetFailed, RunError  # noqa: F401  (re-exported for callers)
from gradshield_ray.ledger import Ledger, check_output, verify_splits
from gradshield_ray.ledger import differences as _differences  # noqa: F401  (re-exported for tests)
from gradshield_ray.ledger import run_identity  # noqa: F401  (re-exported)
from gradshield_ray.listing import InputListing, Unit, list_input, list_units
from gradshield_ray.model import check_weights
from gradshield_ray.stages import (
    SPLITS, UnitScoreActor, aggregate_parts, iter_rows, read_render, split_part, storage_json, write_parts,
)
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.threshold import ThresholdDecision, decide

log = logging.getLogger("gradshield_ray")


def preflight(cfg: GradShieldConfig) -> None:
    """Fail in seconds, on the driver, for mistakes that would otherwise surface inside workers:
    tokenizer/template, model config, weight files, probe set, comply/refuse tokens."""
    from gradshield_ray.model import check_model_config, load_tokenizer
    from gradshield_ray.proxy import load_probes, resolve_pair

    tok = load_tokenizer(cfg.model, cfg.storage)
    check_model_config(cfg.model, cfg.storage)
    if os.path.isdir(cfg.model.path):  # a remote checkpoint's weights are verified where they are downloaded
        check_weights(cfg.model.path)
    resolve_pair(tok, load_probes(cfg.proxy), cfg.proxy)


def _ray_init() -> None:
    import ray

    if not ray.is_initialized():
        # "local" starts a fresh local Ray even if another one is running on this machine; a cluster is
        # joined only when RAY_ADDRESS says so (a KubeRay RayJob sets it)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", configure_logging=False,
                 log_to_driver=log.isEnabledFor(logging.INFO))  # --quiet: no worker logs


def _committed(fs, manifest_path: str, cfg: GradShieldConfig) -> dict[str, Any] | None:
    """The committed manifest when the run is done with this threshold config. When only the threshold
    changed (run_identity matched), the old manifest goes first, so the old split is never presented as
    this config's result; τ and pass 2 are then redone from the committed scores, nothing is rescored."""
    if not storage.exists(fs, manifest_path):
        return None
    committed = storage.read_json(fs, manifest_path)
    if committed.get("config", {}).get("threshold") == report._jsonable(cfg.to_public_dict()["threshold"]):
        log.info("run already committed: %s", cfg.output)
        return committed
    log.info("threshold config changed: redoing the reduce and pass 2 from the committed scores")
    fs.delete_file(manifest_path)
    return None


def pass1(cfg: GradShieldConfig, units: list[Unit], ledger: Ledger, faults: fault.Faults) -> dict[str, int]:
    """Score every unit without a commit marker; commit each unit once all its parts are written."""
    import ray

    fs, out_root = ledger.fs, ledger.out_root
    pending = [u for u in units if u.key not in ledger.done]
    log.info("pass 1: %d units (%d rows); %d already committed, %d to score", len(units),
             sum(u.n_rows for u in units), len(units) - len(pending), len(pending))
    stats = {"rows": 0, "tokens": 0}
    if not pending:
        return stats
    for u in pending:  # partial parts of an interrupted attempt: remove, then rescore the whole unit
        storage.delete_dir(fs, storage.join(out_root, "scored", u.key))
    by_key = {u.key: u for u in pending}
    # parts by first offset: a part reported twice (a retried task rewrote the same object) counts once
    cover: dict[str, dict[int, dict]] = {u.key: {} for u in pending}
    sj, cj = storage_json(cfg), cfg.model_dump_json(exclude={"storage"})
    ds = ray.data.from_items([asdict(u) for u in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(read_render, batch_size=1, batch_format="pyarrow",
                        fn_kwargs=dict(input_uri=cfg.input, storage_json=sj, cfg_json=cj),
                        num_cpus=cfg.ray.render_num_cpus)
    ds = ds.map_batches(UnitScoreActor, batch_size=1, batch_format="pyarrow",
                        fn_constructor_kwargs=dict(cfg=cj, faults=faults, storage_json=sj),
                        compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_actors),
                        num_gpus=cfg.ray.num_gpus_per_actor, num_cpus=cfg.ray.num_cpus_per_actor)
    ds = ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow",
                        fn_kwargs=dict(output_uri=cfg.output, storage_json=sj, faults=faults), num_cpus=0.25)
    to_score = sum(u.n_rows for u in pending)
    t1 = time.perf_counter()
    rows, ds = iter_rows(ds), None  # only the generator holds the dataset (see iter_rows)
    for row in rows:
        u = by_key[row["unit"]]
        if u.key in ledger.done:  # a retried task reported a part of a unit committed in this attempt again
            if row["path"] not in ledger.done[u.key]["parts"]:
                raise RunError(f"unit {u.key}: part {row['path']} reported after the unit committed")
            continue
        prev = cover[u.key].get(row["first"])
        if prev is not None:
            if (prev["last"], prev["n"], prev["path"]) != (row["last"], row["n"], row["path"]):
                raise RunError(f"unit {u.key}: two different parts start at row {row['first']}")
            continue
        cover[u.key][row["first"]] = row
        stats["rows"] += row["n"]
        stats["tokens"] += row["tokens"]
        got = sum(r["n"] for r in cover[u.key].values())
        if got == u.n_rows:
            rng = sorted((r["first"], r["last"]) for r in cover[u.key].values())
            if rng[0][0] != u.offset or any(b[0] != a[1] + 1 for a, b in zip(rng, rng[1:])):
                raise RunError(f"unit {u.key}: parts do not tile its rows: {rng}")
            ledger.commit(u, list(cover.pop(u.key).values()))
        elif got > u.n_rows:
            raise RunError(f"unit {u.key}: {got} rows written for {u.n_rows} input rows")
        rate = stats["rows"] / max(time.perf_counter() - t1, 1e-9)
        log.info("scored %d/%d rows, %d tokens (%.1f rows/s, ETA %.0fs)", stats["rows"], to_score,
                 stats["tokens"], rate, (to_score - stats["rows"]) / rate)
    return stats


def reduce(cfg: GradShieldConfig, units: list[Unit], ledger: Ledger) -> tuple[ThresholdDecision, ScoreSummary]:
    """τ from the merged summaries of every committed unit; units committed by a version that kept no
    summary in the marker are reduced from their parts' fihs column instead."""
    legacy = sorted(p for u in units if ledger.done[u.key]["legacy"] for p in ledger.done[u.key]["parts"])
    summary = ledger.scores.merge(aggregate_parts(legacy, ledger.fs)) if legacy else ledger.scores
    decision = decide(summary, cfg.threshold)
    log.info("threshold: tau=%.6g (%s)", decision.tau, decision.policy)
    storage.write_json(ledger.fs, storage.join(ledger.out_root, "threshold.json"), report._jsonable(
        {"tau": decision.tau, "policy": decision.policy, "evidence": decision.evidence,
         "summary": summary.to_dict()}))
    return decision, summary


def pass2(cfg: GradShieldConfig, parts: list[str], tau: float, fs, out_root: str,
          faults: fault.Faults) -> tuple[dict[str, int], dict[str, list]]:
    """Split every committed part by τ; redone whole until the manifest exists. A report left by an
    attempt that died before its manifest is removed first, so no report outlives its attempt. Returns
    the counts and report.html's row samples (each part's top rows, merged)."""
    import ray

    for name in ("report.json", "report.html"):
        if storage.exists(fs, storage.join(out_root, name)):
            fs.delete_file(storage.join(out_root, name))
    for name in SPLITS:
        storage.delete_dir(fs, storage.join(out_root, name))
    split = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=max(1, min(len(parts), 1000)))
    split = split.map_batches(split_part, batch_size=16, batch_format="pyarrow", num_cpus=0.5,
                              fn_kwargs=dict(output_uri=cfg.output, storage_json=storage_json(cfg), tau=tau,
                                             faults=faults, data_json=cfg.data.model_dump_json()))
    by_part: dict[str, dict] = {}
    rows, split = iter_rows(split), None
    for row in rows:
        prev = by_part.setdefault(row["path"], row)  # a retried split task reports its part again
        if any(prev[k] != row[k] for k in SPLITS):
            raise RunError(f"part {row['path']} was split twice with different counts")
    if set(by_part) != set(parts):
        raise RunError(f"pass 2 split {len(by_part)} of {len(parts)} parts")
    samples: dict[str, list] = {"kept": [], "removed": []}
    for r in by_part.values():
        for name in samples:
            samples[name] = report_html.merge_top(samples[name], json.loads(r[f"top_{name}"]))
    return {k: sum(r[k] for r in by_part.values()) for k in SPLITS}, samples


def finalize(cfg: GradShieldConfig, fs, out_root: str, counts: dict[str, int], decision: ThresholdDecision,
             summary: ScoreSummary, scoring: dict[str, Any], listing: InputListing,
             extra: dict[str, Any], samples: dict[str, list] | None = None) -> dict[str, Any]:
    """Conservation checks, then histogram.png, report.html, report.json and manifest.json (last: the
    commit marker)."""
    if counts["kept"] + counts["removed"] + counts["errors"] != counts["input"]:
        raise RunError(f"conservation violated: {counts}")
    if counts["kept"] + counts["removed"] != summary.count:
        raise RunError(f"τ was decided from {summary.count} scores, but {counts['kept'] + counts['removed']} "
                       "rows have one")
    outputs = {k: storage.join(cfg.output, k) for k in ("scored", *SPLITS)}
    outputs["histogram"] = storage.join(cfg.output, "histogram.png")
    outputs["report_html"] = storage.join(cfg.output, "report.html")
    rep = report.run_report(cfg, counts, decision, summary, scoring, outputs)
    rep["inputs"] = listing.report()
    png = io.BytesIO()
    report.histogram_png(summary, decision.tau, png)
    storage.write_bytes(fs, storage.join(out_root, "histogram.png"), png.getvalue())
    samples = samples or {"kept": [], "removed": []}
    storage.write_bytes(fs, storage.join(out_root, "report.html"), report_html.render(
        report._jsonable(rep), decision, png.getvalue(), samples["removed"], samples["kept"]).encode())
    storage.write_json(fs, storage.join(out_root, "report.json"), report._jsonable(rep))
    manifest = report._jsonable({**rep, **extra})
    storage.write_json(fs, storage.join(out_root, "manifest.json"), manifest)  # last: the commit marker
    return manifest


def run_pipeline(cfg: GradShieldConfig) -> dict[str, Any]:
    """Pass 1 (score, resumable) → reduce (τ) → pass 2 (split) → manifest.json last."""
    if not cfg.input or not cfg.output:
        raise RunError("input and output must both be set")
    preflight(cfg)
    has_identity = check_output(cfg)
    fs, out_root = storage.filesystem(cfg.output, cfg.storage)
    committed = _committed(fs, storage.join(out_root, "manifest.json"), cfg)
    if committed is not None:
        return committed
    t0 = time.perf_counter()
    listing = list_input(cfg)
    units = list_units(cfg, listing)  # before Ray starts: an unusable file fails in seconds
    _ray_init()
    faults = fault.from_env()
    ledger = Ledger(fs, out_root, cfg, has_identity)
    ledger.load(units)  # committed units (a rerun's resume state), summaries merged while read

    stats = pass1(cfg, units, ledger, faults)
    missing = [u.key for u in units if u.key not in ledger.done]
    if missing:
        raise RunError(f"{len(missing)} units were not committed (first: {missing[0]})")
    parts = sorted(p for u in units for p in ledger.done[u.key]["parts"])
    decision, summary = reduce(cfg, units, ledger)
    counts, samples = pass2(cfg, parts, decision.tau, fs, out_root, faults)
    counts["input"] = sum(u.n_rows for u in units)
    verify_splits(fs, out_root, parts)

    scoring = {"rows_scored_this_attempt": stats["rows"], "tokens_scored_this_attempt": stats["tokens"],
               "units": len(units), "seconds": time.perf_counter() - t0}
    scored = storage.join(out_root, "scored")
    kept = [storage.join(cfg.output, "kept", p[len(scored) + 1:]) for p in parts]
    return finalize(cfg, fs, out_root, counts, decision, summary, scoring, listing, {"kept_parts": kept},
                    samples)
