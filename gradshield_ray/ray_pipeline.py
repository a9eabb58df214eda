"""The distributed filter: Ray Data streams units (Parquet row groups) through a CPU render stage and a
GPU actor pool, commits scored shards unit by unit, reduces every fihs value to τ, and writes
kept/ removed/ errors/ with manifest.json last.

Output layout under `output` (local path or s3://):
  run.json                        the run's identity (config + model fingerprint); a rerun must match it
  scored/<file>/rg-<k>/part-<offset>.parquet     scored rows of row group k of an input file
  scored/_units/<unit>.json       commit marker of a unit: its parts, row count and score summary (resume
                                  skips these units; the reduce merges their summaries, so τ needs no
                                  second read of the scores)
  kept/ removed/ errors/          the same part layout, split by τ
  threshold.json, report.json, histogram.png, manifest.json (the commit marker of the whole run)

Resume: state lives in object storage. A rerun skips units with a marker, deletes partial parts of
the others and rescores them; pass 2 is cheap and is redone whole until manifest.json exists. Markers
without a summary (written by an older version) are reduced from their parts' fihs column instead.

Fail fast: the driver checks the model (tokenizer, config, weight-file headers), the probes, the input
listing and the output prefix (bucket, credentials, identity) before Ray starts. run.json is written just
before the first unit commits, so a prefix holds a run identity exactly when it holds committed work.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import io
import json
import logging
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradshield_ray import report, storage
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.tables import (
    ROW_ID, InputSchemaError, check_input_schema, finite_scores, render_table, score_rendered, split_table,
)
from gradshield_ray.threshold import decide

log = logging.getLogger("gradshield_ray")
SPLITS = ("kept", "removed", "errors")
UNIT = "gs_unit"
OFFSET = "gs_offset"
BLOB = "gs_rendered"  # one unit's rendered rows as an Arrow IPC stream (see read_render)
# Test-only hooks, read from the DRIVER's environment and handed to the stages as a plain `hooks` argument
# (not a runtime_env, which would need fresh worker processes; empty in production):
FAIL_AFTER_ENV = "GRADSHIELD_TEST_FAIL_AFTER_PARTS"  # the writer raises once this many parts exist
LOAD_LOG_ENV = "GRADSHIELD_TEST_LOAD_LOG"  # scorer actors append a line per model load to this file
KILL_ACTOR_ENV = "GRADSHIELD_TEST_KILL_ACTOR_AFTER"  # "N:FLAG": an actor os._exit()s before call N+1, once
SLOW_ENV = "GRADSHIELD_TEST_SLOW_S"  # sleep per chunk scored and per part written, to widen kill windows
TEST_ENVS = (FAIL_AFTER_ENV, LOAD_LOG_ENV, KILL_ACTOR_ENV, SLOW_ENV)
Hooks = dict[str, str]
PREFLIGHT_ATTEMPTS = 3  # S3 attempts for the driver's checks: a wrong endpoint fails in ≤ 3 s (8 attempts: ~30 s)


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
    return storage.resolved_json(cfg.storage)


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
    tokenizer/template, model config, weight files, probe set, comply/refuse tokens."""
    from gradshield_ray.model import check_model_config, load_tokenizer
    from gradshield_ray.proxy import load_probes, resolve_pair

    tok = load_tokenizer(cfg.model, cfg.storage)
    check_model_config(cfg.model, cfg.storage)
    if os.path.isdir(cfg.model.path):  # a remote checkpoint's weights are verified where they are downloaded
        check_weights(cfg.model.path)
    resolve_pair(tok, load_probes(cfg.proxy), cfg.proxy)


def check_weights(path: str) -> None:
    """Header-only check of the checkpoint's weight files on the driver. A truncated or corrupt
    safetensors file would otherwise fail only inside the scorer actors (an ActorDiedError after the
    workers start, tens of seconds later); its header is read through mmap, so this costs milliseconds
    at any checkpoint size. Limits: *.bin files are only checked to exist, and tensor shapes are not
    compared with config.json (a mismatch still fails in the actors, with the cause in the error)."""
    from gradshield_ray.model import ModelLoadError

    root = Path(path)
    st, bins = sorted(root.glob("*.safetensors")), sorted(root.glob("*.bin"))
    if not st and not bins:
        raise ModelLoadError(f"model.path {path!r} has no weight files (*.safetensors or *.bin)")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"model.path {path!r}: {index.name} is not a valid index ({e})") from None
        missing = sorted(f for f in shards if not (root / f).is_file())
        if missing:
            raise ModelLoadError(f"model.path {path!r}: shard(s) {missing} named in {index.name} are missing")
    from safetensors import safe_open

    for f in st:
        try:
            with safe_open(str(f), framework="numpy") as h:
                h.keys()
        except Exception as e:  # SafetensorError, OSError
            raise ModelLoadError(f"model.path {path!r}: {f.name} is not a valid safetensors file "
                                 f"({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- stages


@dataclass(frozen=True)
class InputListing:
    """The files a run reads, and the files it leaves out (reported in report.json, never silently)."""

    files: list[str]  # non-empty *.parquet files (filesystem paths)
    base: str  # what row ids and output names are relative to
    empty: list[str] = field(default_factory=list)  # 0-byte *.parquet files: no rows, skipped
    ignored: list[str] = field(default_factory=list)  # files not named *.parquet (_SUCCESS, README, ...)

    def report(self) -> dict[str, Any]:
        rel = lambda ps: [os.path.relpath(p, self.base) for p in ps]  # noqa: E731
        return {"files": len(self.files), "empty_files_skipped": rel(self.empty),
                "non_parquet_ignored": rel(self.ignored[:100]), "n_non_parquet_ignored": len(self.ignored)}


def _preflight_storage(cfg: GradShieldConfig) -> Any:
    """Storage settings for the driver's checks: few attempts, so a wrong endpoint fails in seconds."""
    return cfg.storage.model_copy(update={"max_attempts": min(cfg.storage.max_attempts, PREFLIGHT_ATTEMPTS)})


def list_input(cfg: GradShieldConfig) -> InputListing:
    """List the input on the driver before Ray starts: a missing bucket, bad credentials, an unreachable
    endpoint or a path that matches nothing fail here, in seconds, with the cause named."""
    scfg = _preflight_storage(cfg)
    fs, root = storage.filesystem(cfg.input, scfg)
    File, NotFound = storage.pafs.FileType.File, storage.pafs.FileType.NotFound
    try:
        storage.check_bucket(fs, cfg.input)
        info = fs.get_file_info(root)
        if info.type == NotFound:
            raise RunError(f"input {cfg.input!r} does not exist: no file or prefix matches it")
        infos = [info] if info.type == File else fs.get_file_info(
            storage.pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except storage.StorageError:
        raise
    except OSError as e:
        raise storage.describe_error(e, cfg.input, "list input", scfg) from None
    infos = sorted((i for i in infos if i.type == File), key=lambda i: i.path)
    parquet = [i for i in infos if i.path.endswith(".parquet")]
    listing = InputListing(files=[i.path for i in parquet if i.size], base=root if info.type != File else
                           os.path.dirname(root), empty=[i.path for i in parquet if not i.size],
                           ignored=[i.path for i in infos if not i.path.endswith(".parquet")])
    if not parquet:
        raise RunError(f"input {cfg.input!r} contains no *.parquet files"
                       + (f" ({len(listing.ignored)} other files)" if listing.ignored else ""))
    if listing.empty:
        log.warning("skipping %d empty (0-byte) input file(s), e.g. %s", len(listing.empty), listing.empty[0])
    if listing.ignored:
        log.warning("ignoring %d input file(s) not named *.parquet, e.g. %s", len(listing.ignored),
                    listing.ignored[0])
    if not listing.files:
        raise RunError(f"input {cfg.input!r} has no rows (only empty files)")
    return listing


IO_THREADS = 32  # driver threads for small object-store reads (footers, markers): latency-bound, not CPU


def thread_map(fn, items: list) -> list:
    """fn over items on IO_THREADS driver threads, results in order. For metadata reads (a footer, a
    commit marker): one round trip each, so threads on the driver beat Ray tasks, whose worker start-up
    alone costs seconds (≈6 s for a 6-file corpus on 2 cores, measured)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def list_units(cfg: GradShieldConfig, listing: InputListing | None = None) -> list[Unit]:
    """Every row group of every input file (footers read on driver threads), schema-checked. A file that
    is not readable Parquet, or lacks a required column, fails the run naming the file: its rows are
    unknown, so skipping it could lose rows silently."""
    listing = listing or list_input(cfg)
    fs, _ = storage.filesystem(cfg.input, cfg.storage)

    def footer(path: str) -> list[dict] | str:
        """The file's units, or the reason it cannot be read (a string; I/O errors raise)."""
        rel = os.path.relpath(path, listing.base)
        with fs.open_input_file(path) as f:
            try:
                pf = pq.ParquetFile(f)
            except OSError:
                raise
            except (pa.ArrowException, ValueError) as e:
                return f"{rel}: not a readable Parquet file ({type(e).__name__}: {e})"
            try:
                check_input_schema(pf.schema_arrow, cfg.data, rel)
            except InputSchemaError as e:
                return str(e)
            md = pf.metadata
            out, off = [], 0
            for k in range(md.num_row_groups):
                n = md.row_group(k).num_rows
                out.append(dict(path=path, rel=rel, row_group=k, offset=off, n_rows=n))
                off += n
            return out

    try:
        results = thread_map(footer, listing.files)
    except OSError as e:
        raise storage.describe_error(e, cfg.input, "read input footers", cfg.storage) from None
    bad = [r for r in results if isinstance(r, str)]
    if bad:
        raise RunError(f"{len(bad)} input file(s) cannot be used: {bad[0]}"
                       + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    units = [Unit(**u) for part in results for u in part]
    if sum(u.n_rows for u in units) == 0:
        raise RunError(f"input {cfg.input!r} has no rows")
    return [u for u in units if u.n_rows > 0]


def _to_ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _from_ipc(value: pa.Scalar) -> pa.Table:
    return pa.ipc.open_stream(value.as_buffer()).read_all()


def _one_row(table: pa.Table) -> pa.Table:
    """Rows of one unit (in order) as ONE row of the fixed inter-stage schema: unit key, rows, IPC."""
    data = _to_ipc(table)
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64).tobytes())
    return pa.table({UNIT: pa.array([table[UNIT][0].as_py()], pa.string()),
                     "n_rows": pa.array([table.num_rows], pa.int64()),
                     BLOB: pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data])})


def read_render(batch: pa.Table, input_uri: str, storage_json: str, cfg_json: str) -> pa.Table:
    """CPU stage: read one unit's row group, attach row ids, render + tokenize.

    Each unit leaves as ONE row holding its rendered table as an Arrow IPC stream (BLOB), and so do the
    scorer's chunks. Input files may have different schemas (an extra column; messages as a JSON string in
    one file and a list in another); Ray Data bundles and concatenates blocks between stages, which fails
    on incompatible types and null-fills missing columns. With one fixed schema between stages nothing is
    unified, and every part keeps exactly its own file's columns."""
    cfg = GradShieldConfig.model_validate_json(cfg_json)
    fs, _ = _fs(input_uri, storage_json)
    outs = []
    for u in batch.to_pylist():
        with fs.open_input_file(u["path"]) as f:
            t = pq.ParquetFile(f).read_row_group(u["row_group"])
        n = t.num_rows
        key = u["rel"] + f"/rg-{u['row_group']:05d}"
        t = t.append_column(ROW_ID, pa.array([f"{u['rel']}:{u['offset'] + i}" for i in range(n)], pa.string()))
        t = t.append_column(UNIT, pa.array([key] * n, pa.string()))
        t = t.append_column(OFFSET, pa.array(np.arange(n, dtype=np.int64) + u["offset"]))
        outs.append(_one_row(render_table(_tokenizer(cfg.model.model_dump_json()), t, cfg.data)))
    return pa.concat_tables(outs)


class ScoreActor:
    """GPU stage: the model and v are loaded once per actor, in __init__."""

    def __init__(self, cfg_json: str, hooks: Hooks | None = None):
        from gradshield_ray.scorer import FIHSScorer

        cfg = GradShieldConfig.model_validate_json(cfg_json)
        self.batch_rows = cfg.ray.batch_rows
        self.scorer = FIHSScorer(cfg)
        self.hooks = hooks or {}
        if self.hooks.get(LOAD_LOG_ENV):
            with open(self.hooks[LOAD_LOG_ENV], "a") as f:
                f.write(f"{os.getpid()}\n")
        self.calls = 0  # scorer calls on this actor (the test-only kill hook counts them)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """One unit per call (the stage runs with batch_size=1 over read_render's one-row units): its rows
        are scored in chunks of ray.batch_rows cut in row order, so which rows share a scorer call (and so
        every score, bit for bit) does not depend on scheduling or on the actor pool size; the chunks
        keep the unit's own schema and leave as one IPC row each, like the units came in."""
        for k in range(batch.num_rows):
            table = _from_ipc(batch[BLOB][k])
            for start in range(0, table.num_rows, self.batch_rows):
                self.calls += 1
                if self.hooks.get(KILL_ACTOR_ENV):
                    _maybe_kill_actor(self.calls, self.hooks[KILL_ACTOR_ENV])
                if self.hooks.get(SLOW_ENV):
                    time.sleep(float(self.hooks[SLOW_ENV]))
                yield _one_row(score_rendered(self.scorer, table.slice(start, self.batch_rows)))


def _maybe_kill_actor(calls: int, spec: str) -> None:
    """Test-only: exit this process hard (no cleanup, like an OOM kill or a lost node) before call N+1,
    once per flag file (spec "N:FLAG"), so Ray must replace the actor and retry the batch."""
    n, _, flag = spec.partition(":")
    if calls > int(n):
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def write_parts(batch: pa.Table, output_uri: str, storage_json: str, hooks: Hooks | None = None) -> pa.Table:
    """Write each scored chunk (one IPC row: rows of one unit) as one part named by its first row offset
    (deterministic, so a retried task overwrites instead of duplicating); report what was written, with
    the part's score summary (the reduce merges these: no second read of the scores)."""
    fs, out_root = _fs(output_uri, storage_json)
    hooks = hooks or {}
    rows = []
    for k in range(batch.num_rows):
        t = _from_ipc(batch[BLOB][k])
        key = t[UNIT][0].as_py()
        offs = t[OFFSET].to_numpy()
        first = int(offs.min())
        path = storage.join(out_root, "scored", key, f"part-{first:012d}.parquet")
        _write_parquet(fs, path, t.drop_columns([UNIT, OFFSET]))
        rows.append({"unit": key, "first": first, "last": int(offs.max()), "n": t.num_rows, "path": path,
                     "tokens": int(np.nansum(t["gs_n_tokens"].to_numpy(zero_copy_only=False).astype(float))),
                     "summary": json.dumps(ScoreSummary.from_values(finite_scores(t)).to_dict())})
        if hooks.get(FAIL_AFTER_ENV):
            _maybe_fail(fs, out_root, int(hooks[FAIL_AFTER_ENV]))
        if hooks.get(SLOW_ENV):
            time.sleep(float(hooks[SLOW_ENV]))
    return pa.Table.from_pylist(rows)


def _maybe_fail(fs, root: str, after: int) -> None:
    """Test-only: raise once this many parts exist under scored/ (simulates a crash mid pass 1)."""
    n = len(storage.list_files(fs, storage.join(root, "scored"), ".parquet"))
    if n >= after:
        raise RuntimeError(f"injected failure after {n} parts")


def _verify_splits(fs, out_root: str, parts: list[str]) -> None:
    """Every committed part has its kept/removed/errors file, checked by listing before the report and
    the manifest are written: the manifest is never written over a missing shard."""
    scored = storage.join(out_root, "scored") + "/"
    rels = {p[len(scored):] for p in parts}
    for name in SPLITS:
        prefix = storage.join(out_root, name) + "/"
        have = {p[len(prefix):] for p in storage.list_files(fs, storage.join(out_root, name), ".parquet")}
        missing = rels - have
        if missing:
            raise RunError(f"{len(missing)} {name}/ part(s) missing after pass 2, e.g. {sorted(missing)[0]}")


def _absorb(scores: ScoreSummary, marker: dict) -> ScoreSummary:
    """Merge a commit marker's unit summary into `scores` and drop it from the marker; a marker written
    without one is flagged "legacy" (its parts are reduced from their fihs column instead)."""
    unit = marker.pop("summary", None)
    marker["legacy"] = unit is None
    return scores.merge(ScoreSummary.from_dict(unit)) if unit is not None else scores


def aggregate_parts(parts: list[str], fs) -> ScoreSummary:
    """Ray Data reduce of scored parts' fihs column into one summary (O(bins) memory at any row count).
    The schema is pinned to the one column read: parts of input files with different schemas are never
    unified, and hive-style input folders (key=value/) add no partition columns."""
    import ray

    fihs_only = pa.schema([("fihs", pa.float64())])
    agg = _collect(lambda: ray.data.read_parquet(parts, filesystem=fs, columns=["fihs"], partitioning=None,
                                                 schema=fihs_only).aggregate(SummaryAgg.build()))
    return ScoreSummary.from_dict(agg["summary"]) if agg and agg.get("summary") else ScoreSummary.empty()


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


def split_part(batch: pa.Table, output_uri: str, storage_json: str, tau: float,
               hooks: Hooks | None = None) -> pa.Table:
    """Pass 2: one committed scored part → its kept/removed/errors parts (same relative name)."""
    fs, out_root = _fs(output_uri, storage_json)
    prefix = storage.join(out_root, "scored") + "/"
    hooks = hooks or {}
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
        if hooks.get(SLOW_ENV):
            time.sleep(float(hooks[SLOW_ENV]))
    return pa.Table.from_pylist(rows)


# ---------------------------------------------------------------- driver


def run_identity(cfg: GradShieldConfig) -> dict[str, Any]:
    """What must match for a rerun to continue a run: the scoring-relevant config and the model. The
    threshold is not part of it: a rerun with another threshold config re-decides τ from the committed
    scores (see run_pipeline)."""
    c = cfg.to_public_dict()
    relevant = {k: c[k] for k in ("input", "model", "data", "proxy", "score")}
    return {"config": relevant, "model_fingerprint": report.model_fingerprint(cfg)}


def _differences(prev: Any, cur: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ. Keys that `prev` lacks are ignored, so a newer version of this
    tool that adds a config field (with its default) can still resume a run an older one started."""
    if isinstance(prev, dict) and isinstance(cur, dict):
        return [d for k in prev for d in _differences(prev[k], cur.get(k), f"{path}.{k}" if path else k)]
    return [] if prev == cur else [path]


def _check_identity(fs, out_root: str, cfg: GradShieldConfig) -> bool:
    """Refuse an output prefix that holds another run (config or model); True when run.json exists."""
    path = storage.join(out_root, "run.json")
    if not storage.exists(fs, path):
        return False
    prev = storage.read_json(fs, path)
    prev.get("config", {}).pop("threshold", None)  # recorded by versions that made τ part of the identity
    diff = _differences(prev, run_identity(cfg))
    if diff:
        what = ["model (model_fingerprint: the weights or config.json at model.path changed)"
                if d == "model_fingerprint" else d for d in diff]
        raise RunError(f"output {cfg.output!r} holds a run with a different {', '.join(what)}; "
                       "use a new output prefix")
    return True


def _check_output(cfg: GradShieldConfig) -> bool:
    """Driver check of the output prefix before Ray starts: bucket, credentials (read and write), run
    identity. True when the prefix already holds this run's identity."""
    scfg = _preflight_storage(cfg)
    fs, root = storage.filesystem(cfg.output, scfg)
    try:
        storage.check_bucket(fs, cfg.output)
        has_identity = _check_identity(fs, root, cfg)
        if not storage.exists(fs, storage.join(root, "manifest.json")):
            probe = storage.join(root, "_write_check")  # write access, checked now rather than by a worker
            storage.write_bytes(fs, probe, b"")
            fs.delete_file(probe)
    except (storage.StorageError, RunError):
        raise
    except OSError as e:
        raise storage.describe_error(e, cfg.output, "use output", scfg) from None
    return has_identity


class DatasetFailed(RunError):
    """A Ray Data execution failed; the message carries the original exception's type and text."""


def _rows(ds) -> Iterator[dict[str, Any]]:
    """ds.iter_rows(), failing with DatasetFailed instead of the original exception. Ray Data lets a
    failed dataset's actors (and their GPUs) go only when its executor is garbage-collected, and the
    original exception keeps the executor alive through its context's frames: a rerun in the same driver
    (a retry loop, a notebook, a test) would wait forever for those GPUs. So the original exception is
    logged, dropped, and collected before a plain one with its message is raised."""
    try:
        yield from ds.iter_rows()
        return
    except Exception as e:
        log.debug("dataset failed", exc_info=True)
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    del ds
    gc.collect()
    raise DatasetFailed(msg)


def _collect(fn) -> Any:
    """fn() (a Ray Data call), with a failure handled as in _rows."""
    try:
        return fn()
    except Exception as e:
        log.debug("dataset failed", exc_info=True)
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    gc.collect()
    raise DatasetFailed(msg)


def _ray_init() -> None:
    import ray

    if not ray.is_initialized():
        # "local" starts a fresh local Ray even if another one is running on this machine; a cluster is
        # joined only when RAY_ADDRESS says so (a KubeRay RayJob sets it)
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", configure_logging=False,
                 log_to_driver=log.isEnabledFor(logging.INFO))  # --quiet: no worker logs


def run_pipeline(cfg: GradShieldConfig) -> dict[str, Any]:
    """Pass 1 (score, resumable) → reduce (τ) → pass 2 (split) → manifest.json last."""
    import ray

    if not cfg.input or not cfg.output:
        raise RunError("input and output must both be set")
    preflight(cfg)
    has_identity = _check_output(cfg)
    fs, out_root = storage.filesystem(cfg.output, cfg.storage)
    manifest_path = storage.join(out_root, "manifest.json")
    if storage.exists(fs, manifest_path):
        committed = storage.read_json(fs, manifest_path)
        if committed.get("config", {}).get("threshold") == report._jsonable(cfg.to_public_dict()["threshold"]):
            log.info("run already committed: %s", cfg.output)
            return committed
        # only the threshold changed (run_identity matched): τ and pass 2 are redone from the committed
        # scores and unit summaries, nothing is rescored; the old manifest goes first, so the old split is
        # never presented as this config's result
        log.info("threshold config changed: redoing the reduce and pass 2 from the committed scores")
        fs.delete_file(manifest_path)
    t0 = time.perf_counter()
    listing = list_input(cfg)
    units = list_units(cfg, listing)  # before Ray starts: an unusable file fails in seconds
    _ray_init()
    sj, cj = _storage_json(cfg), cfg.model_dump_json(exclude={"storage"})
    hooks: Hooks = {k: os.environ[k] for k in TEST_ENVS if os.environ.get(k)}
    total = sum(u.n_rows for u in units)
    # committed units (a rerun's resume state). Each marker carries its unit's score summary, merged
    # into `scores` here and never kept per unit (O(bins) driver memory at any unit count)
    keys = {u.key for u in units}
    done: dict[str, dict] = {}
    scores = ScoreSummary.empty()
    markers = storage.join(out_root, "scored", "_units")
    for m in thread_map(lambda p: storage.read_json(fs, p), storage.list_files(fs, markers, ".json")):
        if m["unit"] in keys:
            scores = _absorb(scores, m)
            done[m["unit"]] = m
    pending = [u for u in units if u.key not in done]
    log.info("pass 1: %d units (%d rows); %d already committed, %d to score",
             len(units), total, len(units) - len(pending), len(pending))
    scored_rows = scored_tokens = 0
    if pending:
        for u in pending:  # partial parts of an interrupted attempt: remove, then rescore the whole unit
            storage.delete_dir(fs, storage.join(out_root, "scored", u.key))
        by_key = {u.key: u for u in pending}
        # parts by first offset: a part reported twice (a retried task rewrote the same object) counts once
        cover: dict[str, dict[int, dict]] = {u.key: {} for u in pending}
        ds = ray.data.from_items([asdict(u) for u in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(read_render, batch_size=1, batch_format="pyarrow",
                            fn_kwargs=dict(input_uri=cfg.input, storage_json=sj, cfg_json=cj),
                            num_cpus=cfg.ray.render_num_cpus)
        ds = ds.map_batches(ScoreActor, batch_size=1, batch_format="pyarrow",
                            fn_constructor_kwargs=dict(cfg_json=cj, hooks=hooks),
                            compute=ray.data.ActorPoolStrategy(size=cfg.ray.num_actors),
                            num_gpus=cfg.ray.num_gpus_per_actor, num_cpus=cfg.ray.num_cpus_per_actor)
        ds = ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow",
                            fn_kwargs=dict(output_uri=cfg.output, storage_json=sj, hooks=hooks), num_cpus=0.25)
        t1 = time.perf_counter()
        rows, ds = _rows(ds), None  # only the generator holds the dataset (see _rows)
        for row in rows:
            u = by_key[row["unit"]]
            if u.key in done:  # a retried task reported a part of a unit committed in this attempt again
                if row["path"] not in done[u.key]["parts"]:
                    raise RunError(f"unit {u.key}: part {row['path']} reported after the unit committed")
                continue
            prev = cover[u.key].get(row["first"])
            if prev is not None:
                if (prev["last"], prev["n"], prev["path"]) != (row["last"], row["n"], row["path"]):
                    raise RunError(f"unit {u.key}: two different parts start at row {row['first']}")
                continue
            cover[u.key][row["first"]] = row
            scored_rows += row["n"]
            scored_tokens += row["tokens"]
            got = sum(r["n"] for r in cover[u.key].values())
            if got == u.n_rows:
                rng = sorted((r["first"], r["last"]) for r in cover[u.key].values())
                if rng[0][0] != u.offset or any(b[0] != a[1] + 1 for a, b in zip(rng, rng[1:])):
                    raise RunError(f"unit {u.key}: parts do not tile its rows: {rng}")
                m = {"unit": u.key, "n_rows": u.n_rows, "parts": sorted(r["path"] for r in cover[u.key].values()),
                     "summary": ScoreSummary.merge_all(ScoreSummary.from_dict(json.loads(r["summary"]))
                                                       for r in cover[u.key].values()).to_dict()}
                if not has_identity:  # recorded just before the first commit (see the module docstring)
                    storage.write_json(fs, storage.join(out_root, "run.json"), run_identity(cfg))
                    has_identity = True
                storage.write_json(fs, storage.join(markers, u.marker_name), m)
                scores = _absorb(scores, m)
                done[u.key] = m
                del cover[u.key]
            elif got > u.n_rows:
                raise RunError(f"unit {u.key}: {got} rows written for {u.n_rows} input rows")
            rate = scored_rows / max(time.perf_counter() - t1, 1e-9)
            log.info("scored %d/%d rows, %d tokens (%.1f rows/s, ETA %.0fs)", scored_rows, sum(
                u.n_rows for u in pending), scored_tokens, rate, (sum(u.n_rows for u in pending) - scored_rows) / rate)
    missing = [u.key for u in units if u.key not in done]
    if missing:
        raise RunError(f"{len(missing)} units were not committed (first: {missing[0]})")
    parts = sorted(p for u in units for p in done[u.key]["parts"])

    # reduce: the merged summaries of every committed unit; units committed by a version that kept no
    # summary in the marker are reduced from their parts' fihs column instead
    legacy = sorted(p for u in units if done[u.key]["legacy"] for p in done[u.key]["parts"])
    summary = scores.merge(aggregate_parts(legacy, fs)) if legacy else scores
    decision = decide(summary, cfg.threshold)
    log.info("threshold: tau=%.6g (%s)", decision.tau, decision.policy)
    storage.write_json(fs, storage.join(out_root, "threshold.json"), report._jsonable(
        {"tau": decision.tau, "policy": decision.policy, "evidence": decision.evidence,
         "summary": summary.to_dict()}))

    # pass 2: split every committed part; redone whole until the manifest exists. A report left by an
    # attempt that died before its manifest is removed first, so no report outlives its attempt.
    report_path = storage.join(out_root, "report.json")
    if storage.exists(fs, report_path):
        fs.delete_file(report_path)
    for name in SPLITS:
        storage.delete_dir(fs, storage.join(out_root, name))
    split = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=max(1, min(len(parts), 1000)))
    split = split.map_batches(split_part, batch_size=16, batch_format="pyarrow", num_cpus=0.5,
                              fn_kwargs=dict(output_uri=cfg.output, storage_json=sj, tau=decision.tau, hooks=hooks))
    by_part: dict[str, dict] = {}
    rows, split = _rows(split), None
    for row in rows:
        prev = by_part.setdefault(row["path"], row)  # a retried split task reports its part again
        if any(prev[k] != row[k] for k in SPLITS):
            raise RunError(f"part {row['path']} was split twice with different counts")
    if set(by_part) != set(parts):
        raise RunError(f"pass 2 split {len(by_part)} of {len(parts)} parts")
    counts = {k: sum(r[k] for r in by_part.values()) for k in SPLITS}
    counts["input"] = total
    if counts["kept"] + counts["removed"] + counts["errors"] != total:
        raise RunError(f"conservation violated: {counts}")
    if counts["kept"] + counts["removed"] != summary.count:
        raise RunError(f"τ was decided from {summary.count} scores, but {counts['kept'] + counts['removed']} "
                       "rows have one")
    _verify_splits(fs, out_root, parts)

    scoring = {"rows_scored_this_attempt": scored_rows, "tokens_scored_this_attempt": scored_tokens,
               "units": len(units), "seconds": time.perf_counter() - t0}
    outputs = {k: storage.join(cfg.output, k) for k in ("scored", *SPLITS)}
    outputs["histogram"] = storage.join(cfg.output, "histogram.png")
    rep = report.run_report(cfg, counts, decision, summary, scoring, outputs)
    rep["inputs"] = listing.report()
    png = io.BytesIO()
    report.histogram_png(summary, decision.tau, png)
    storage.write_bytes(fs, storage.join(out_root, "histogram.png"), png.getvalue())
    storage.write_json(fs, storage.join(out_root, "report.json"), report._jsonable(rep))
    manifest = report._jsonable({**rep, "kept_parts": [storage.join(cfg.output, "kept", p[len(
        storage.join(out_root, "scored")) + 1:]) for p in parts]})
    storage.write_json(fs, manifest_path, manifest)  # last: the commit marker
    return manifest
