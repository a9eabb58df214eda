"""The Ray Data stages of the pipeline, as plain functions and one actor class.

Row-level transforms, usable on ANY Ray Dataset of rows with the configured chat columns:
  render_batch(batch, cfg) -> batch      CPU: + gs_input_ids, gs_loss_mask, gs_n_tokens, gs_n_loss_tokens,
                                         gs_truncated, gs_error (rows that cannot render get gs_error)
  ScoreActor(cfg)(batch) -> batch        GPU: rendered rows → input columns + fihs and the gs_* score
                                         columns (token columns dropped); the model loads once per actor
Unit-level stages of the resumable runner (ray_pipeline.run_pipeline), wrapping the two above:
  read_render      unit descriptors → their rows read, row ids attached, rendered → one IPC row per unit
  UnitScoreActor   one unit's IPC row → scored in chunks of ray.batch_rows rows (deterministic composition)
  write_parts      scored units → one scored/ file per unit, reported with its score summary
  split_group      pass 2: a group of scored files → one kept/ removed/ errors/ file each (by τ)
  aggregate_parts  a Ray Data reduce of parts' fihs column into one ScoreSummary
"""
from __future__ import annotations

import functools
import gc
import hashlib
import io
import json
import logging
import os
import traceback
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradshield_ray import faults as fault
from gradshield_ray import jsonl, report_html, storage
from gradshield_ray.config import DataConfig, GradShieldConfig
from gradshield_ray.errors import DatasetFailed, RunError
from gradshield_ray.render import required_columns
from gradshield_ray.listing import row_id
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.tables import ROW_ID, finite_scores, render_table, score_rendered, split_table

log = logging.getLogger("gradshield_ray")
SPLITS = ("kept", "removed", "errors")
UNIT = "gs_unit"
OFFSET = "gs_offset"
BLOB = "gs_rendered"  # one unit's rendered rows as an Arrow IPC stream (see read_render)


def _config(cfg: GradShieldConfig | str, storage_json: str | None = None) -> GradShieldConfig:
    """The config a worker uses. A config travels as JSON without its secrets (SecretStr dumps masked), so
    storage settings resolved on the driver (storage_json) are put back here: an s3:// model needs them."""
    cfg = cfg if isinstance(cfg, GradShieldConfig) else GradShieldConfig.model_validate_json(cfg)
    if storage_json:
        cfg = cfg.model_copy(update={"storage": storage.StorageConfig.model_validate_json(storage_json)})
    return cfg


# ---------------------------------------------------------------- small I/O helpers (run in workers)


@functools.lru_cache(maxsize=4)
def _fs(uri: str, storage_json: str):
    from gradshield_ray.storage import StorageConfig

    return storage.filesystem(uri, StorageConfig.model_validate_json(storage_json))


def storage_json(cfg: GradShieldConfig) -> str:
    """Storage settings for workers, credentials resolved on the driver (see storage.resolved_json)."""
    return storage.resolved_json(cfg.storage)


def _write_parquet(fs, path: str, table: pa.Table) -> bytes:
    """One Parquet object (one PUT); returns its bytes (for sizes and checksums)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(fs, path, buf.getvalue())
    return buf.getvalue()


@functools.lru_cache(maxsize=2)
def _tokenizer(model_json: str, storage_json: str):
    from gradshield_ray.config import ModelConfig

    try:
        from gradshield_ray.model import load_tokenizer
    except (ImportError, AttributeError) as e:
        if "partially initialized" not in str(e):
            raise
        # a task cancelled while this worker imported torch (Ray Data cancels in-flight tasks when a dataset
        # fails) leaves a half-imported torch behind, and every later task here would fail the same way: exit,
        # so Ray replaces the worker and retries the task on a fresh one (seen once in test_ray_pipeline)
        log.error("worker has a half-imported module (%s); exiting so Ray retries on a fresh worker", e)
        os._exit(1)

    return load_tokenizer(ModelConfig.model_validate_json(model_json),
                          storage.StorageConfig.model_validate_json(storage_json))


# ---------------------------------------------------------------- row-level transforms (any dataset)


def render_batch(batch: pa.Table, cfg: GradShieldConfig | str) -> pa.Table:
    """CPU stage on any batch of rows: render + tokenize with the model's chat template (the tokenizer is
    loaded once per worker process). Pure: the same rows give the same tokens."""
    cfg = _config(cfg)
    return render_table(_tokenizer(cfg.model.model_dump_json(), storage_json(cfg)), batch, cfg.data)


class ScoreActor:
    """GPU stage on any batch of rendered rows: the model and v are loaded once per actor, in __init__;
    each call returns the batch with its token columns replaced by fihs and the gs_* score columns.
    Which rows share a scorer call can change a score in its last bits: for bit-identical reruns, feed
    batches of a fixed composition (the unit runner does: see UnitScoreActor)."""

    def __init__(self, cfg: GradShieldConfig | str, faults: fault.Faults | None = None,
                 storage_json: str | None = None):
        from gradshield_ray.scorer import FIHSScorer

        cfg = _config(cfg, storage_json)
        self.batch_rows = cfg.ray.batch_rows
        self.scorer = FIHSScorer(cfg)
        self.faults = faults or {}
        fault.log_load(self.faults, str(os.getpid()))
        self.calls = 0  # scorer calls on this actor (the test-only kill hook counts them)

    def score(self, table: pa.Table) -> pa.Table:
        """Score one batch of rendered rows in one scorer call."""
        self.calls += 1
        fault.maybe_kill_actor(self.faults, self.calls)
        fault.slow(self.faults)
        return score_rendered(self.scorer, table)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.score(batch)


def score_canaries(cfg_json: str, storage_json: str | None = None) -> dict[str, list[float]]:
    """The calibration canaries' FIHS (gradshield_ray/canaries.py) with the run's θ₀, v and settings: a Ray
    task with one scorer's resources, once per run (the model loads once more). Never written as rows."""
    from gradshield_ray.scorer import FIHSScorer

    can = FIHSScorer(_config(cfg_json, storage_json)).score_canaries()
    return {"harmful": can.harmful.tolist(), "benign": can.benign.tolist()}


def cluster_canaries(cfg: GradShieldConfig):
    """score_canaries on the cluster, with the scorer actors' GPU and CPU request; None when
    threshold.canaries is off. The Ray runner caches the result in the output prefix (canaries.json)."""
    import ray

    from gradshield_ray.threshold import Canaries

    if cfg.threshold.canaries == "off":
        return None
    task = ray.remote(num_gpus=cfg.ray.num_gpus_per_actor, num_cpus=cfg.ray.num_cpus_per_actor)(score_canaries)
    d = ray.get(task.remote(cfg.model_dump_json(exclude={"storage"}), storage_json(cfg)))
    return Canaries(harmful=np.asarray(d["harmful"], float), benign=np.asarray(d["benign"], float))


# ---------------------------------------------------------------- unit-level stages (the resumable runner)


def _to_ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _from_ipc(value: pa.Scalar) -> pa.Table:
    return pa.ipc.open_stream(value.as_buffer()).read_all()


def _one_row(table: pa.Table, key: str, **info: Any) -> pa.Table:
    """Rows of one unit (in order) as ONE row of the fixed inter-stage schema: unit key, rows, IPC, and
    where it was processed (node ids, model loads: the report's `nodes` section)."""
    data = _to_ipc(table)
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64).tobytes())
    return pa.table({UNIT: pa.array([key], pa.string()), "n_rows": pa.array([table.num_rows], pa.int64()),
                     BLOB: pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data]),
                     **{k: [v] for k, v in info.items()}})


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def read_unit(fs, u: dict) -> pa.Table:
    """A unit's rows: its whole row group, or its row range read in batches of that size, so no more than
    ray.unit_rows rows are decoded at a time."""
    with fs.open_input_file(u["path"]) as f:
        pf = pq.ParquetFile(f)
        if not u.get("part_of_group"):
            return pf.read_row_group(u["row_group"])
        first, n, pos, got = u["start"], u["n_rows"], 0, []
        for rb in pf.iter_batches(batch_size=n, row_groups=[u["row_group"]]):
            lo, hi = max(first - pos, 0), min(first + n - pos, rb.num_rows)
            if hi > lo:
                got.append(rb.slice(lo, hi - lo))
            pos += rb.num_rows
            if pos >= first + n:
                break
        return pa.Table.from_batches(got, schema=pf.schema_arrow)


def read_render(batch: pa.Table, input_uri: str, storage_json: str, cfg_json: str) -> pa.Table:
    """CPU stage: read units, attach row ids, render + tokenize.

    Each unit leaves as ONE row holding its rendered table as an Arrow IPC stream (BLOB), and so does the
    scorer's output. Input files may have different schemas (an extra column; messages as a JSON string in
    one file and a list in another); Ray Data bundles and concatenates blocks between stages, which fails
    on incompatible types and null-fills missing columns. With one fixed schema between stages nothing is
    unified, and every output file keeps exactly its own input file's columns."""
    from gradshield_ray.listing import Unit

    cfg = _config(cfg_json, storage_json)
    fs, _ = _fs(input_uri, storage_json)
    outs = []
    for u in batch.to_pylist():
        if jsonl.is_jsonl(u["path"]):  # a whole file; row ids file:line come from the reader
            t = jsonl.read_file(fs, u["path"], u["rel"], required_columns(cfg.data))
            if t.num_rows != u["n_rows"]:
                raise RunError(f"{u['rel']} has {t.num_rows} rows now, {u['n_rows']} when listed: it changed "
                               "during the run; rerun with a new output prefix")
        else:
            t = read_unit(fs, u)
            t = t.append_column(ROW_ID, pa.array([row_id(u["rel"], u["offset"] + i) for i in range(t.num_rows)],
                                                 pa.string()))
        n = t.num_rows
        t = t.append_column(OFFSET, pa.array(np.arange(n, dtype=np.int64) + u["offset"]))
        outs.append(_one_row(render_batch(t, cfg), Unit(**u).key, render_node=_node_id()))
    return pa.concat_tables(outs)


class UnitScoreActor(ScoreActor):
    """ScoreActor over the unit runner's one-row units (batch_size=1 over read_render's output)."""

    def __init__(self, cfg: GradShieldConfig | str, faults: fault.Faults | None = None,
                 storage_json: str | None = None):
        super().__init__(cfg, faults, storage_json)
        self.node = _node_id()
        self.loads = 1  # reported with this actor's first unit (the report's model loads per node)
        log.info("scorer actor loaded the model: node %s, pid %d", self.node, os.getpid())

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """One unit per call: its rows are scored in chunks of ray.batch_rows cut in row order, so which
        rows share a scorer call (and so every score, bit for bit) does not depend on scheduling or on the
        actor pool size; the unit leaves whole, as one IPC row, like it came in."""
        for k in range(batch.num_rows):
            table = _from_ipc(batch[BLOB][k])
            scored = pa.concat_tables([self.score(table.slice(start, self.batch_rows))
                                       for start in range(0, table.num_rows, self.batch_rows)])
            yield _one_row(scored, batch[UNIT][k].as_py(), render_node=batch["render_node"][k].as_py(),
                           score_node=self.node, loads=self.loads)
            self.loads = 0


def scored_path(out_root: str, key: str) -> str:
    """Where a unit's scored rows go: one file per unit, named by the unit (a retried task overwrites)."""
    return storage.join(out_root, "scored", key + ".parquet")


def write_parts(batch: pa.Table, output_uri: str, storage_json: str, faults: fault.Faults | None = None) -> pa.Table:
    """Write each scored unit (one IPC row) as one file named by the unit (deterministic, so a retried
    task overwrites instead of duplicating); report what was written, with the unit's score summary (the
    reduce merges these: no second read of the scores)."""
    fs, out_root = _fs(output_uri, storage_json)
    rows = []
    for k in range(batch.num_rows):
        t = _from_ipc(batch[BLOB][k])
        key = batch[UNIT][k].as_py()
        offs = t[OFFSET].to_numpy()
        path = scored_path(out_root, key)
        size = len(_write_parquet(fs, path, t.drop_columns([OFFSET])))
        rows.append({"unit": key, "first": int(offs.min()) if len(offs) else -1, "last": int(offs.max()) if len(
            offs) else -1, "n": t.num_rows, "path": path, "bytes": size,
            "tokens": int(np.nansum(t["gs_n_tokens"].to_numpy(zero_copy_only=False).astype(float))),
            "summary": json.dumps(ScoreSummary.from_values(finite_scores(t)).to_dict()),
            "render_node": batch["render_node"][k].as_py(), "score_node": batch["score_node"][k].as_py(),
            "loads": batch["loads"][k].as_py()})
        fault.maybe_fail(faults, lambda: len(storage.list_files(fs, storage.join(out_root, "scored"), ".parquet")))
        fault.slow(faults)
    return pa.Table.from_pylist(rows)


def split_group(batch: pa.Table, output_uri: str, storage_json: str, tau: float,
                faults: fault.Faults | None = None, data_json: str | None = None) -> pa.Table:
    """Pass 2: one group of committed scored files (about output_files.target_file_bytes) → one kept, one
    removed and one errors file (named by the group; none written empty), with the group's report.html samples
    (its top kept and removed rows, JSON) when data_json is given. Scored files of input files with different
    schemas are never unified: each schema in a group gets its own file."""
    fs, out_root = _fs(output_uri, storage_json)
    rows = []
    for gid, parts in zip(batch["gid"].to_pylist(), batch["parts"].to_pylist()):
        by_schema: dict[pa.Schema, list[pa.Table]] = {}
        for path in parts:
            with fs.open_input_file(path) as f:
                t = pq.read_table(f)
            by_schema.setdefault(t.schema, []).append(t)
        files, counts = [], dict.fromkeys(SPLITS, 0)
        top: dict[str, list] = {"kept": [], "removed": []}
        for j, tables in enumerate(by_schema.values()):
            for name, part in split_table(pa.concat_tables(tables), tau).items():
                counts[name] += part.num_rows
                if not part.num_rows:
                    continue
                if data_json and name in top:
                    top[name] = report_html.merge_top(
                        top[name], report_html.top_rows(part, DataConfig.model_validate_json(data_json)))
                path = storage.join(out_root, name, f"part-{gid:06d}" + (f"-{j}" if j else "") + ".parquet")
                data = _write_parquet(fs, path, part)
                files.append({"split": name, "path": path, "rows": part.num_rows, "bytes": len(data),
                              "sha256": hashlib.sha256(data).hexdigest()})
        rows.append({"gid": gid, "files": json.dumps(files), **counts,
                     **{f"top_{k}": json.dumps(v) for k, v in top.items()}})
        fault.slow(faults)
        fault.slow(faults, fault.SLOW_SPLIT_ENV)
    return pa.Table.from_pylist(rows)


# ---------------------------------------------------------------- running a dataset on the driver


def iter_rows(ds) -> Iterator[dict[str, Any]]:
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


def collect(fn) -> Any:
    """fn() (a Ray Data call), with a failure handled as in iter_rows."""
    try:
        return fn()
    except Exception as e:
        log.debug("dataset failed", exc_info=True)
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    gc.collect()
    raise DatasetFailed(msg)


def aggregate_parts(parts: list[str], fs) -> ScoreSummary:
    """Ray Data reduce of scored parts' fihs column into one summary (O(bins) memory at any row count).
    The schema is pinned to the one column read: parts of input files with different schemas are never
    unified, and hive-style input folders (key=value/) add no partition columns."""
    import ray

    fihs_only = pa.schema([("fihs", pa.float64())])
    agg = collect(lambda: ray.data.read_parquet(parts, filesystem=fs, columns=["fihs"], partitioning=None,
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
