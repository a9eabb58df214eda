"""The distributed filter, as a driver: pass 1 (score, resumable) → reduce (τ) → pass 2 (split) →
manifest.json last. The stages are in stages.py, the commit/resume state in ledger.py, the input listing
in listing.py.

Output layout under `output` (local path or s3://):
  run.json                        the run's identity (config + model fingerprint); a rerun must match it
  _lease.json                     held while a run is active (lease.py): a second run here fails fast
  scored/<file>/rg-<k>[-r<start>].parquet   scored rows of one unit (a row group, or a row range of one)
  scored/_commits/<attempt>-<n>.json        batches of unit commits with their merged score summary
  _pass2/plan.json, _pass2/commits/         pass 2's plan (τ, groups by digest) and its committed groups
  kept/ removed/ errors/          part-<group>.parquet: files of ~output_files.target_file_bytes, none empty
  canaries.json                   the calibration canaries' scores (threshold.canaries; scored once per run)
  threshold.json, report.json, report.html, histogram.png, manifest.json (the commit marker of the whole run)

Resume: state lives in object storage. A rerun skips committed units, deletes the scored files of the
others and rescores them; pass 2 splits only the groups not committed under the same τ. Units committed
without a summary (older markers) are reduced from their files' fihs column instead.

Fail fast: the driver checks the model (tokenizer, config, weight-file headers), the probes, the input
listing and the output prefix (bucket, credentials, identity) before Ray starts. run.json is written just
before the first unit commits, so a prefix holds a run identity exactly when it holds committed work.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Any

import numpy as np

from gradshield_ray import faults as fault
from gradshield_ray import report, report_html, storage
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.errors import DatasetFailed, RunError  # noqa: F401  (re-exported for callers)
from gradshield_ray.lease import Lease
from gradshield_ray.ledger import Ledger, SplitLedger, check_output, unit_groups, verify_splits
from gradshield_ray.ledger import differences as _differences  # noqa: F401  (re-exported for tests)
from gradshield_ray.ledger import run_identity  # noqa: F401  (re-exported)
from gradshield_ray.listing import Unit, list_input, list_units
from gradshield_ray.model import check_weights
from gradshield_ray.stages import (
    SPLITS, UnitScoreActor, aggregate_parts, cluster_canaries, iter_rows, read_render, split_group, storage_json,
    write_parts,
)
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.threshold import Canaries, ThresholdDecision, decide

log = logging.getLogger("gradshield_ray")
NODE_FIELDS = ("rows_rendered", "rows_scored", "model_loads")  # report.json `nodes`, per Ray node id


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


def _progress(stats: dict[str, int], to_score: int, t1: float, last: list[float]) -> None:
    """A progress line at most every 5 s (O(1) per commit: no per-unit sums)."""
    now = time.perf_counter()
    if now - last[0] < 5 or not log.isEnabledFor(logging.INFO):
        return
    last[0] = now
    rate = stats["rows"] / max(now - t1, 1e-9)
    log.info("scored %d/%d rows, %d tokens (%.1f rows/s, ETA %.0fs)", stats["rows"], to_score, stats["tokens"],
             rate, (to_score - stats["rows"]) / max(rate, 1e-9))


def pass1(cfg: GradShieldConfig, units: list[Unit], ledger: Ledger, faults: fault.Faults,
          nodes: dict[str, dict[str, int]]) -> tuple[dict[str, int], dict[str, int]]:
    """Score every unit not committed; one scored file per unit, committed in batches. Returns the rows and
    tokens scored in this attempt and the sizes of every committed scored file."""
    import ray

    pending = [u for u in units if u.key not in ledger.done]
    log.info("pass 1: %d units (%d rows); %d already committed, %d to score", len(units),
             sum(u.n_rows for u in units), len(units) - len(pending), len(pending))
    sizes = ledger.cleanup(pending)  # one listing; files of a dead attempt's uncommitted units go
    stats = {"rows": 0, "tokens": 0}
    if not pending:
        return stats, sizes
    by_key = {u.key: u for u in pending}
    sj, cj = storage_json(cfg), cfg.model_dump_json(exclude={"storage"})
    lo, hi = cfg.ray.pool_size()
    # a few blocks of unit descriptors (not one per unit): the driver puts O(units / 64) blocks
    ds = ray.data.from_items([asdict(u) for u in pending],
                             override_num_blocks=min(len(pending), max(16, -(-len(pending) // 64))))
    ds = ds.map_batches(read_render, batch_size=1, batch_format="pyarrow",
                        fn_kwargs=dict(input_uri=cfg.input, storage_json=sj, cfg_json=cj),
                        num_cpus=cfg.ray.render_num_cpus)
    ds = ds.map_batches(UnitScoreActor, batch_size=1, batch_format="pyarrow",
                        fn_constructor_kwargs=dict(cfg=cj, faults=faults, storage_json=sj),
                        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                        num_gpus=cfg.ray.num_gpus_per_actor, num_cpus=cfg.ray.num_cpus_per_actor)
    ds = ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow",
                        fn_kwargs=dict(output_uri=cfg.output, storage_json=sj, faults=faults), num_cpus=0.25)
    to_score, t1, last = sum(u.n_rows for u in pending), time.perf_counter(), [time.perf_counter()]
    ledger.start(len(pending))
    try:
        rows, ds = iter_rows(ds), None  # only the generator holds the dataset (see iter_rows)
        for row in rows:
            u = by_key[row["unit"]]
            nodes[row["score_node"]]["model_loads"] += row["loads"]  # before the retry check: a retry's actor
            if u.key in ledger.done:  # a retried task reported a unit committed in this attempt again
                continue
            if row["n"] != u.n_rows or (u.n_rows and (row["first"], row["last"]) != (u.offset, u.offset + u.n_rows - 1)):
                raise RunError(f"unit {u.key}: rows {row['first']}..{row['last']} ({row['n']}) written for its "
                               f"{u.n_rows} input rows from {u.offset}")
            ledger.commit(u, row["bytes"], ScoreSummary.from_dict(json.loads(row["summary"])))
            sizes[row["path"]] = row["bytes"]
            stats["rows"] += row["n"]
            stats["tokens"] += row["tokens"]
            nodes[row["render_node"]]["rows_rendered"] += row["n"]
            nodes[row["score_node"]]["rows_scored"] += row["n"]
            _progress(stats, to_score, t1, last)
    finally:
        ledger.close()  # what is committed stays committed, even when the dataset failed
    return stats, sizes


def run_canaries(cfg: GradShieldConfig, ledger: Ledger) -> Canaries | None:
    """The calibration canaries' scores (threshold.canaries != off): scored once per run in a Ray task and
    kept in <output>/canaries.json, so a resumed attempt or a threshold-only rerun (same run identity, so
    the same θ₀ and score) reads them instead of loading the model again."""
    if cfg.threshold.canaries == "off":
        return None
    path = storage.join(ledger.out_root, "canaries.json")
    if storage.exists(ledger.fs, path):
        d = storage.read_json(ledger.fs, path)
        return Canaries(harmful=np.asarray(d["harmful"], float), benign=np.asarray(d["benign"], float))
    can = cluster_canaries(cfg)
    storage.write_json(ledger.fs, path, {"harmful": can.harmful.tolist(), "benign": can.benign.tolist()})
    return can


def reduce(cfg: GradShieldConfig, ledger: Ledger) -> tuple[ThresholdDecision, ScoreSummary]:
    """τ from the merged summaries of every committed unit and the canaries; units whose summary is unknown
    (committed by a version that kept none, or in a batch shared with units of another input) are reduced
    from their scored files' fihs column instead."""
    legacy = sorted(p for k in ledger.legacy for p in ledger.files(k))
    summary = ledger.scores.merge(aggregate_parts(legacy, ledger.fs)) if legacy else ledger.scores
    decision = decide(summary, cfg.threshold, run_canaries(cfg, ledger))
    log.info("threshold: tau=%.6g (%s)", decision.tau, decision.policy)
    storage.write_json(ledger.fs, storage.join(ledger.out_root, "threshold.json"), report._jsonable(
        {"tau": decision.tau, "policy": decision.policy, "evidence": decision.evidence,
         "summary": summary.to_dict()}))
    return decision, summary


def pass2(cfg: GradShieldConfig, units: list[Unit], ledger: Ledger, sizes: dict[str, int], tau: float,
          faults: fault.Faults) -> tuple[dict[str, int], list[dict], dict[str, int], dict[str, list]]:
    """Split the committed scored files by τ, in groups of about output_files.target_file_bytes, one
    output file per split and group. Resumable: groups are committed in batches, and a rerun under the
    same τ splits only the others. A report left by an attempt that died before its manifest is removed
    first, so no report outlives its attempt. Returns counts, the output files, what was redone, and
    report.html's row samples (each group's top rows, merged)."""
    import ray

    fs, out_root = ledger.fs, ledger.out_root
    for name in ("report.json", "report.html"):
        if storage.exists(fs, storage.join(out_root, name)):
            fs.delete_file(storage.join(out_root, name))
    target = cfg.output_files.target_file_bytes
    groups = unit_groups([u.key for u in units], {u.key: ledger.files(u.key) for u in units}, sizes, target)
    split_ledger = SplitLedger(fs, out_root, storage_json(cfg))
    done = split_ledger.begin(tau, groups, target)
    todo = [{"gid": gid, "parts": g} for gid, g in enumerate(groups) if gid not in done]
    try:
        if todo:
            ds = ray.data.from_items(todo, override_num_blocks=min(len(todo), 10_000))
            ds = ds.map_batches(split_group, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                                fn_kwargs=dict(output_uri=cfg.output, storage_json=storage_json(cfg), tau=tau,
                                               faults=faults, data_json=cfg.data.model_dump_json()))
            rows, ds = iter_rows(ds), None
            for row in rows:
                got = {"files": json.loads(row["files"]), "counts": {k: row[k] for k in SPLITS},
                       "top": {k: json.loads(row[f"top_{k}"]) for k in ("kept", "removed")}}
                prev = done.setdefault(row["gid"], got)  # a retried split task reports its group again
                if prev is got:
                    split_ledger.commit(row["gid"], got["files"], got["counts"], got["top"])
                elif prev["counts"] != got["counts"]:
                    raise RunError(f"group {row['gid']} was split twice with different counts")
    finally:
        split_ledger.close()
    if len(done) != len(groups):
        raise RunError(f"pass 2 split {len(done)} of {len(groups)} groups")
    counts = {k: sum(g["counts"][k] for g in done.values()) for k in SPLITS}
    files = [f for gid in sorted(done) for f in done[gid]["files"]]
    samples: dict[str, list] = {"kept": [], "removed": []}
    for g in done.values():
        for name in samples:
            samples[name] = report_html.merge_top(samples[name], (g.get("top") or {}).get(name, []))
    return counts, files, {"groups": len(groups), "groups_split_this_attempt": len(todo)}, samples


def run_pipeline(cfg: GradShieldConfig) -> dict[str, Any]:
    """Pass 1 (score, resumable) → reduce (τ) → pass 2 (split, resumable) → manifest.json last."""
    if not cfg.input or not cfg.output:
        raise RunError("input and output must both be set")
    cpu0, t0 = time.process_time(), time.perf_counter()
    preflight(cfg)
    has_identity = check_output(cfg)
    with Lease(cfg.output, storage_json(cfg), cfg.output_files.lease_s):  # a second run here fails fast
        return _run(cfg, has_identity, cpu0, t0)


def _run(cfg: GradShieldConfig, has_identity: bool, cpu0: float, t0: float) -> dict[str, Any]:
    fs, out_root = storage.filesystem(cfg.output, cfg.storage)
    committed = _committed(fs, storage.join(out_root, "manifest.json"), cfg)
    if committed is not None:
        return committed
    listing = list_input(cfg)
    units = list_units(cfg, listing)  # before Ray starts: an unusable file fails in seconds
    _ray_init()
    faults = fault.from_env()
    ledger = Ledger(fs, out_root, cfg, has_identity, storage_json(cfg))
    ledger.load(units)  # committed units (a rerun's resume state), summaries merged while read
    phases = {"listing": time.perf_counter() - t0}
    nodes: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(NODE_FIELDS, 0))

    t = time.perf_counter()
    stats, sizes = pass1(cfg, units, ledger, faults, nodes)
    missing = [u.key for u in units if u.key not in ledger.done]
    if missing:
        raise RunError(f"{len(missing)} units were not committed (first: {missing[0]})")
    phases["pass1"], t = time.perf_counter() - t, time.perf_counter()
    decision, summary = reduce(cfg, ledger)
    phases["reduce"], t = time.perf_counter() - t, time.perf_counter()
    counts, files, split_info, samples = pass2(cfg, units, ledger, sizes, decision.tau, faults)
    counts["input"] = sum(u.n_rows for u in units)
    verify_splits(fs, out_root, files)
    phases["pass2"] = time.perf_counter() - t

    scoring = {"rows_scored_this_attempt": stats["rows"], "tokens_scored_this_attempt": stats["tokens"],
               "units": len(units), "seconds": time.perf_counter() - t0, "phases": phases, **split_info,
               "driver": {"cpu_s": time.process_time() - cpu0,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}
    uri = lambda p: cfg.output.rstrip("/") + p[len(out_root):]  # noqa: E731
    out_files = {s: [{**{k: f[k] for k in ("rows", "bytes", "sha256")}, "path": uri(f["path"])}
                     for f in files if f["split"] == s] for s in SPLITS}
    return report.finalize(cfg, fs, out_root, counts, decision, summary, scoring, listing.report(),
                    {"nodes": dict(nodes), "files": out_files, "kept_parts": [f["path"] for f in out_files["kept"]]},
                    samples=samples)
