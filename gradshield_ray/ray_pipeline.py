"""The distributed filter: Ray Data streams units (Parquet row groups) through a CPU render stage and a
GPU actor pool, commits scored shards unit by unit, reduces every fihs value to τ, and writes
kept/ removed/ errors/ with manifest.json last.

Output layout under `output` (local path or s3://):
  run.json                        the run's identity (config + model fingerprint); a rerun must match it
  scored/<file>/rg-<k>/part-<offset>.parquet     scored rows of row group k of an input file
  scored/_units/<unit>.json       commit marker of a unit: its parts and row count (resume skips these)
  kept/ removed/ errors/          the same part layout, split by τ
  threshold.json, report.json, histogram.png, manifest.json (the commit marker of the whole run)

Resume: state lives in object storage. A rerun skips units with a marker, deletes partial parts of
the others and rescores them; pass 2 is cheap and is redone whole until manifest.json exists.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradshield_ray import report, storage
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.tables import (
    ROW_ID, TOKEN_SCHEMA, check_input_schema, finite_scores, render_table, score_rendered, split_table,
)
from gradshield_ray.threshold import decide

log = logging.getLogger("gradshield_ray")
SPLITS = ("kept", "removed", "errors")
UNIT = "gs_unit"
OFFSET = "gs_offset"
FAIL_AFTER_ENV = "GRADSHIELD_TEST_FAIL_AFTER_PARTS"  # test-only fault injection in the writer
LOAD_LOG_ENV = "GRADSHIELD_TEST_LOAD_LOG"  # test-only: scorer actors append a line per model load


class RunError(RuntimeError):
    """The run cannot proceed (mismatched output prefix, lost rows, bad input)."""


@dataclass(frozen=True)
class Unit:
    """One row group of one input file: the unit of scheduling, commit and resume."""

    path: str  # filesystem path of the input file
    rel: str  # path relative to the input root (names the outputs)
    row_group: int
    offset: int  # index of the unit's first row within its file
    n_rows: int

    @property
    def key(self) -> str:
        return f"{self.rel}/rg-{self.row_group:05d}"

    @property
    def marker_name(self) -> str:
        return hashlib.sha1(self.key.encode()).hexdigest()[:20] + ".json"


# ---------------------------------------------------------------- small I/O helpers (run in workers)


@functools.lru_cache(maxsize=4)
def _fs(uri: str, storage_json: str):
    from gradshield_ray.storage import StorageConfig

    return storage.filesystem(uri, StorageConfig.model_validate_json(storage_json))


def _storage_json(cfg: GradShieldConfig) -> str:
    """Storage settings for workers, with credentials resolved on the driver (config first, then the
    driver's AWS environment), so workers on other nodes need no credentials of their own. This travels
    as a task argument only; it is never logged or written."""
    d = cfg.storage.model_dump()
    for k, v in d.items():
        if hasattr(v, "get_secret_value"):
            d[k] = v.get_secret_value()
    for key, env in (("access_key_id", "AWS_ACCESS_KEY_ID"), ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                     ("session_token", "AWS_SESSION_TOKEN"), ("region", "AWS_REGION")):
        if d.get(key) is None and os.environ.get(env):
            d[key] = os.environ[env]
    if d.get("endpoint_url") is None:
        d["endpoint_url"] = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return json.dumps(d)


def _write_parquet(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(fs, path, buf.getvalue())


@functools.lru_cache(maxsize=2)
def _tokenizer(model_json: str):
    from gradshield_ray.config import ModelConfig
    from gradshield_ray.model import load_tokenizer

    return load_tokenizer(ModelConfig.model_validate_json(model_json))


def preflight(cfg: GradShieldConfig) -> None:
    """Fail in seconds, on the driver, for mistakes that would otherwise surface inside workers:
    tokenizer/template, model config, probe set, comply/refuse tokens."""
    from gradshield_ray.model import check_model_config, load_tokenizer
    from gradshield_ray.proxy import load_probes, resolve_pair

    tok = load_tokenizer(cfg.model)
    check_model_config(cfg.model)
    resolve_pair(tok, load_probes(cfg.proxy), cfg.proxy)


# ---------------------------------------------------------------- stages


def list_units(cfg: GradShieldConfig) -> list[Unit]:
    """Every row group of every input file (footers read in parallel Ray tasks), schema-checked."""
    import ray

    fs, root = storage.filesystem(cfg.input, cfg.storage)
    info = fs.get_file_info(root)
    if info.type == storage.pafs.FileType.NotFound:
        raise RunError(f"input {cfg.input!r} does not exist")
    files = storage.list_files(fs, root)
    files = [f for f in files if f.endswith(".parquet")]
    if not files:
        raise RunError(f"input {cfg.input!r} contains no *.parquet files")
    base = root if info.type == storage.pafs.FileType.Directory else os.path.dirname(root)
    sj, data_cfg = _storage_json(cfg), cfg.data

    @ray.remote(num_cpus=0.5)
    def footer(path: str) -> list[dict]:
        fs_, _ = _fs(cfg.input, sj)
        with fs_.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            check_input_schema(pf.schema_arrow, data_cfg, path)
            md = pf.metadata
            out, off = [], 0
            for k in range(md.num_row_groups):
                n = md.row_group(k).num_rows
                out.append(dict(path=path, rel=os.path.relpath(path, base), row_group=k, offset=off, n_rows=n))
                off += n
            return out

    units = [Unit(**u) for part in ray.get([footer.remote(f) for f in files]) for u in part]
    if sum(u.n_rows for u in units) == 0:
        raise RunError(f"input {cfg.input!r} has no rows")
    return [u for u in units if u.n_rows > 0]


def read_render(batch: pa.Table, input_uri: str, storage_json: str, cfg_json: str) -> pa.Table:
    """CPU stage: read one unit's row group, attach row ids, render + tokenize."""
    cfg = GradShieldConfig.model_validate_json(cfg_json)
    fs, _ = _fs(input_uri, storage_json)
    outs = []
    for u in batch.to_pylist():
        with fs.open_input_file(u["path"]) as f:
            t = pq.ParquetFile(f).read_row_group(u["row_group"])
        n = t.num_rows
        t = t.append_column(ROW_ID, pa.array([f"{u['rel']}:{u['offset'] + i}" for i in range(n)], pa.string()))
        t = t.append_column(UNIT, pa.array([u["rel"] + f"/rg-{u['row_group']:05d}"] * n, pa.string()))
        t = t.append_column(OFFSET, pa.array(np.arange(n, dtype=np.int64) + u["offset"]))
        outs.append(render_table(_tokenizer(cfg.model.model_dump_json()), t, cfg.data))
    return pa.concat_tables(outs)


class ScoreActor:
    """GPU stage: the model and v are loaded once per actor, in __init__."""

    def __init__(self, cfg_json: str):
        from gradshield_ray.scorer import FIHSScorer

        self.scorer = FIHSScorer(GradShieldConfig.model_validate_json(cfg_json))
        if os.environ.get(LOAD_LOG_ENV):
            with open(os.environ[LOAD_LOG_ENV], "a") as f:
                f.write(f"{os.getpid()}\n")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_rendered(self.scorer, batch)


def write_parts(batch: pa.Table, output_uri: str, storage_json: str) -> pa.Table:
    """Write each unit's rows in this batch as one part named by its first row offset (deterministic,
    so a retried task overwrites instead of duplicating); report what was written."""
    fs, out_root = _fs(output_uri, storage_json)
    rows = []
    units = batch[UNIT].to_numpy(zero_copy_only=False)
    for key in dict.fromkeys(units):
        t = batch.filter(pa.array(units == key))
        offs = t[OFFSET].to_numpy()
        first = int(offs.min())
        path = storage.join(out_root, "scored", key, f"part-{first:012d}.parquet")
        _write_parquet(fs, path, t.drop_columns([UNIT, OFFSET]))
        rows.append({"unit": key, "first": first, "last": int(offs.max()), "n": t.num_rows, "path": path,
                     "tokens": int(np.nansum(t["gs_n_tokens"].to_numpy(zero_copy_only=False).astype(float)))})
        if os.environ.get(FAIL_AFTER_ENV):
            _maybe_fail(fs, out_root)
    return pa.Table.from_pylist(rows)


def _maybe_fail(fs, root: str) -> None:
    """Test-only: raise once this many parts exist under scored/ (simulates a crash mid pass 1)."""
    n = len(storage.list_files(fs, storage.join(root, "scored"), ".parquet"))
    if n >= int(os.environ[FAIL_AFTER_ENV]):
        raise RuntimeError(f"injected failure after {n} parts")


class SummaryAgg:
    """Ray Data aggregate: fihs column → mergeable ScoreSummary (O(bins) memory at any row count)."""

    @staticmethod
    def build():
        from ray.data.aggregate import AggregateFnV2

        class _Agg(AggregateFnV2):
            def __init__(self):
                super().__init__("summary", zero_factory=lambda: ScoreSummary.empty().to_dict(),
                                 on="fihs", ignore_nulls=True)

            def aggregate_block(self, block) -> dict:
                col = block["fihs"] if isinstance(block, pa.Table) else block.to_arrow()["fihs"]
                vals = pa.compute.drop_null(col).to_numpy().astype(np.float64)
                return ScoreSummary.from_values(vals).to_dict()

            def combine(self, a: dict, b: dict) -> dict:
                return ScoreSummary.from_dict(a).merge(ScoreSummary.from_dict(b)).to_dict()

            def finalize(self, acc: dict) -> dict:
                return acc

        return _Agg()


def split_part(batch: pa.Table, output_uri: str, storage_json: str, tau: float) -> pa.Table:
    """Pass 2: one committed scored part → its kept/removed/errors parts (same relative name)."""
    fs, out_root = _fs(output_uri, storage_json)
    prefix = storage.join(out_root, "scored") + "/"
    rows = []
    for path in batch["path"].to_pylist():
        with fs.open_input_file(path) as f:
            scored = pq.read_table(f)
        rel = path[len(prefix):]
        counts = {"path": path}
        for name, part in split_table(scored, tau).items():
            _write_parquet(fs, storage.join(out_root, name, rel), part)
            counts[name] = part.num_rows
        rows.append(counts)
    return pa.Table.from_pylist(rows)


# ---------------------------------------------------------------- driver


def run_identity(cfg: GradShieldConfig) -> dict[str, Any]:
    """What must match for a rerun to continue a run: the scoring-relevant config and the model."""
    c = cfg.to_public_dict()
    relevant = {k: c[k] for k in ("input", "model", "data", "proxy", "score", "threshold")}
    return {"config": relevant, "model_fingerprint": report.model_fingerprint(cfg.model.path)}


def _differences(prev: Any, cur: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ. Keys that `prev` lacks are ignored, so a newer version of this
    tool that adds a config field (with its default) can still resume a run an older one started."""
    if isinstance(prev, dict) and isinstance(cur, dict):
        return [d for k in prev for d in _differences(prev[k], cur.get(k), f"{path}.{k}" if path else k)]
    return [] if prev == cur else [path]


def _check_identity(fs, out_root: str, cfg: GradShieldConfig) -> None:
    ident = run_identity(cfg)
    path = storage.join(out_root, "run.json")
    if storage.exists(fs, path):
        diff = _differences(storage.read_json(fs, path), ident)
        if diff:
            raise RunError(f"output {cfg.output!r} holds a run with a different {', '.join(diff)}; "
                           "use a new output prefix")
    else:
        storage.write_json(fs, path, ident)


def _ray_init() -> None:
    import ray

    if not ray.is_initialized():
        # "local" starts a fresh local Ray even if another one is running on this machine; a cluster is
        # joined only when RAY_ADDRESS says so (a KubeRay RayJob sets it)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True,
                 configure_logging=False)


def run_pipeline(cfg: GradShieldConfig) -> dict[str, Any]:
    """Pass 1 (score, resumable) → reduce (τ) → pass 2 (split) → manifest.json last."""
    import ray

    if not cfg.input or not cfg.output:
        raise RunError("input and output must both be set")
    preflight(cfg)
    _ray_init()
    fs, out_root = storage.filesystem(cfg.output, cfg.storage)
    manifest_path = storage.join(out_root, "manifest.json")
    _check_identity(fs, out_root, cfg)
    if storage.exists(fs, manifest_path):
        log.info("run already committed: %s", cfg.output)
        return storage.read_json(fs, manifest_path)
    sj, cj = _storage_json(cfg), cfg.model_dump_json(exclude={"storage"})
    test_env = {k: os.environ[k] for k in (FAIL_AFTER_ENV, LOAD_LOG_ENV) if k in os.environ}
    extra = {"runtime_env": {"env_vars": test_env}} if test_env else {}
    t0 = time.perf_counter()

    units = list_units(cfg)
    total = sum(u.n_rows for u in units)
    done = {}
    markers = storage.join(out_root, "scored", "_units")
    for p in storage.list_files(fs, markers, ".json"):
        m = storage.read_json(fs, p)
        done[m["unit"]] = m
    pending = [u for u in units if u.key not in done]
    log.info("pass 1: %d units (%d rows); %d already committed, %d to score",
             len(units), total, len(units) - len(pending), len(pending))
    scored_rows = scored_tokens = 0
    if pending:
        for u in pending:  # partial parts of an interrupted attempt: remove, then rescore the whole unit
            storage.delete_dir(fs, storage.join(out_root, "scored", u.key))
        by_key = {u.key: u for u in pending}
        cover: dict[str, list] = {u.key: [] for u in pending}
        ds = ray.data.from_items([asdict(u) for u in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(read_render, batch_size=1, batch_format="pyarrow",
                            fn_kwargs=dict(input_uri=cfg.input, storage_json=sj, cfg_json=cj),
                            num_cpus=cfg.ray.render_num_cpus)
        ds = ds.map_batches(ScoreActor, batch_size=cfg.ray.batch_rows, batch_format="pyarrow",
                            fn_constructor_kwargs=dict(cfg_json=cj),
                            compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_actors),
                            num_gpus=cfg.ray.num_gpus_per_actor, num_cpus=cfg.ray.num_cpus_per_actor, **extra)
        ds = ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow",
                            fn_kwargs=dict(output_uri=cfg.output, storage_json=sj), num_cpus=0.25, **extra)
        t1 = time.perf_counter()
        for row in ds.iter_rows():
            cover[row["unit"]].append(row)
            scored_rows += row["n"]
            scored_tokens += row["tokens"]
            u = by_key[row["unit"]]
            got = sum(r["n"] for r in cover[u.key])
            if got == u.n_rows:
                rng = sorted((r["first"], r["last"]) for r in cover[u.key])
                if rng[0][0] != u.offset or any(b[0] != a[1] + 1 for a, b in zip(rng, rng[1:])):
                    raise RunError(f"unit {u.key}: parts do not tile its rows: {rng}")
                m = {"unit": u.key, "n_rows": u.n_rows, "parts": sorted(r["path"] for r in cover[u.key])}
                storage.write_json(fs, storage.join(markers, u.marker_name), m)
                done[u.key] = m
            elif got > u.n_rows:
                raise RunError(f"unit {u.key}: {got} rows written for {u.n_rows} input rows")
            rate = scored_rows / max(time.perf_counter() - t1, 1e-9)
            log.info("scored %d/%d rows, %d tokens (%.1f rows/s, ETA %.0fs)", scored_rows, sum(
                u.n_rows for u in pending), scored_tokens, rate, (sum(u.n_rows for u in pending) - scored_rows) / rate)
    missing = [u.key for u in units if u.key not in done]
    if missing:
        raise RunError(f"{len(missing)} units were not committed (first: {missing[0]})")
    parts = sorted(p for u in units for p in done[u.key]["parts"])

    # reduce: only the fihs column, into a fixed-size mergeable summary
    agg = ray.data.read_parquet(parts, filesystem=fs, columns=["fihs"]).aggregate(SummaryAgg.build())
    summary = ScoreSummary.from_dict(agg["summary"]) if agg and agg.get("summary") else ScoreSummary.empty()
    decision = decide(summary, cfg.threshold)
    log.info("threshold: tau=%.6g (%s)", decision.tau, decision.policy)
    storage.write_json(fs, storage.join(out_root, "threshold.json"), report._jsonable(
        {"tau": decision.tau, "policy": decision.policy, "evidence": decision.evidence,
         "summary": summary.to_dict()}))

    # pass 2: split every committed part; redone whole until the manifest exists
    for name in SPLITS:
        storage.delete_dir(fs, storage.join(out_root, name))
    split = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=max(1, min(len(parts), 1000)))
    split = split.map_batches(split_part, batch_size=16, batch_format="pyarrow", num_cpus=0.5,
                              fn_kwargs=dict(output_uri=cfg.output, storage_json=sj, tau=decision.tau))
    counts = {k: 0 for k in SPLITS}
    for row in split.iter_rows():
        for k in SPLITS:
            counts[k] += row[k]
    counts["input"] = total
    if counts["kept"] + counts["removed"] + counts["errors"] != total:
        raise RunError(f"conservation violated: {counts}")

    scoring = {"rows_scored_this_attempt": scored_rows, "tokens_scored_this_attempt": scored_tokens,
               "units": len(units), "seconds": time.perf_counter() - t0}
    outputs = {k: storage.join(cfg.output, k) for k in ("scored", *SPLITS)}
    outputs["histogram"] = storage.join(cfg.output, "histogram.png")
    rep = report.run_report(cfg, counts, decision, summary, scoring, outputs)
    png = io.BytesIO()
    report.histogram_png(summary, decision.tau, png)
    storage.write_bytes(fs, storage.join(out_root, "histogram.png"), png.getvalue())
    storage.write_json(fs, storage.join(out_root, "report.json"), report._jsonable(rep))
    manifest = report._jsonable({**rep, "kept_parts": [storage.join(cfg.output, "kept", p[len(
        storage.join(out_root, "scored")) + 1:]) for p in parts]})
    storage.write_json(fs, manifest_path, manifest)  # last: the commit marker
    return manifest
