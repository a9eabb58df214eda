"""The commit/resume ledger of the Ray pipeline: what a run has committed, kept in object storage.

  run.json                        the run's identity (config + model fingerprint); a rerun must match it
  scored/_commits/<attempt>-<n>.json  a batch of pass-1 commits: [unit, rows, bytes] each, and the merged
                                  score summary of those units
  _pass2/plan.json, _pass2/commits/<attempt>-<n>.json   pass 2's plan (τ, groups) and its split groups
A rerun skips committed units and groups, and merges the summaries into the reduce while reading them.
Markers of earlier versions (scored/_units/<sha>.json, one per unit) are still read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

from gradshield_ray import report, storage
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.errors import RunError
from gradshield_ray.listing import IO_THREADS, Unit, preflight_storage
from gradshield_ray.stages import SPLITS, scored_path
from gradshield_ray.summary import ScoreSummary

log = logging.getLogger("gradshield_ray")


def run_identity(cfg: GradShieldConfig) -> dict[str, Any]:
    """What must match for a rerun to continue a run: the scoring-relevant config and the model. The
    threshold is not part of it: a rerun with another threshold config re-decides τ from the committed
    scores (see run_pipeline)."""
    c = cfg.to_public_dict()
    relevant = {k: c[k] for k in ("input", "model", "data", "proxy", "score")}
    return {"config": relevant, "model_fingerprint": report.model_fingerprint(cfg)}


def differences(prev: Any, cur: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ. Keys that `prev` lacks are ignored, so a newer version of this
    tool that adds a config field (with its default) can still resume a run an older one started."""
    if isinstance(prev, dict) and isinstance(cur, dict):
        return [d for k in prev for d in differences(prev[k], cur.get(k), f"{path}.{k}" if path else k)]
    return [] if prev == cur else [path]


def check_identity(fs, out_root: str, cfg: GradShieldConfig) -> bool:
    """Refuse an output prefix that holds another run (config or model); True when run.json exists."""
    path = storage.join(out_root, "run.json")
    if not storage.exists(fs, path):
        return False
    prev = storage.read_json(fs, path)
    prev.get("config", {}).pop("threshold", None)  # recorded by versions that made τ part of the identity
    diff = differences(prev, run_identity(cfg))
    if diff:
        what = ["model (model_fingerprint: the weights or config.json at model.path changed)"
                if d == "model_fingerprint" else d for d in diff]
        raise RunError(f"output {cfg.output!r} holds a run with a different {', '.join(what)}; "
                       "use a new output prefix")
    return True


def check_output(cfg: GradShieldConfig) -> bool:
    """Driver check of the output prefix before Ray starts: bucket, credentials (read and write), run
    identity. True when the prefix already holds this run's identity."""
    scfg = preflight_storage(cfg)
    fs, root = storage.filesystem(cfg.output, scfg)
    try:
        storage.check_bucket(fs, cfg.output)
        has_identity = check_identity(fs, root, cfg)
        if not storage.exists(fs, storage.join(root, "manifest.json")):
            probe = storage.join(root, "_write_check")  # write access, checked now rather than by a worker
            storage.write_bytes(fs, probe, b"")
            fs.delete_file(probe)
    except (storage.StorageError, RunError):
        raise
    except OSError as e:
        raise storage.describe_error(e, cfg.output, "use output", scfg) from None
    return has_identity


class BatchCommits:
    """Commit records written in batches, in the background: one object per batch under `prefix`, so a
    run writes O(tasks / batch) commit objects and the driver never waits on a PUT per record. A batch
    is written when it holds `every` records or is `max_age_s` old; close() writes the rest and waits.
    Each object is written whole (one PUT), so a record is committed exactly when its object exists."""

    def __init__(self, fs, prefix: str, every: int, max_age_s: float = 2.0, before_first=None):
        self.fs, self.prefix, self.every, self.max_age_s = fs, prefix, max(1, every), max_age_s
        self.before_first = before_first  # called once, synchronously, before the first batch is written
        self.attempt = uuid.uuid4().hex[:12]
        self.pool = ThreadPoolExecutor(4)
        self.futures: list[Future] = []
        self.items: list[Any] = []
        self.summary = ScoreSummary.empty()
        self.seq, self.t = 0, time.monotonic()

    def add(self, item: Any, summary: ScoreSummary | None = None) -> None:
        self.items.append(item)
        if summary is not None:
            self.summary = self.summary.merge(summary)
        if len(self.items) >= self.every or time.monotonic() - self.t >= self.max_age_s:
            self.flush()

    def flush(self) -> None:
        self.t = time.monotonic()
        if not self.items:
            return
        if self.before_first is not None:
            self.before_first()
            self.before_first = None
        body = {"items": self.items, "summary": self.summary.to_dict()}
        path = storage.join(self.prefix, f"{self.attempt}-{self.seq:06d}.json")
        self.items, self.summary, self.seq = [], ScoreSummary.empty(), self.seq + 1
        finished = [f for f in self.futures if f.done()]
        for f in finished:
            f.result()  # a failed commit write fails the run now, not at close()
        self.futures = [f for f in self.futures if f not in finished]
        self.futures.append(self.pool.submit(storage.write_bytes, self.fs, path, json.dumps(
            body, separators=(",", ":")).encode()))

    def close(self) -> None:
        """Write what is buffered and wait for every write (raising the first error)."""
        self.flush()
        try:
            for f in self.futures:
                f.result()
        finally:
            self.pool.shutdown(wait=True)


def read_batches(fs, prefix: str) -> Iterator[dict]:
    """The commit batches under prefix, parsed on driver threads, yielded one at a time (so a caller
    merges them while they are read instead of holding them all)."""
    paths = storage.list_files(fs, prefix, ".json")
    with ThreadPoolExecutor(min(IO_THREADS, max(1, len(paths)))) as pool:
        yield from pool.map(lambda p: storage.read_json(fs, p), paths)


class Ledger:
    """The pass-1 commits of one output prefix, as the driver sees them. Per committed unit it keeps its
    scored bytes (an int: the file is scored/<unit>.parquet), or the part list of a unit committed by an
    earlier version; the score summaries are merged into one as they are read, never kept per unit."""

    def __init__(self, fs, out_root: str, cfg: GradShieldConfig, has_identity: bool, storage_json: str):
        self.fs, self.out_root, self.cfg, self.has_identity = fs, out_root, cfg, has_identity
        self.storage_json = storage_json
        self.markers = storage.join(out_root, "scored", "_units")  # earlier versions: one marker per unit
        self.commits = storage.join(out_root, "scored", "_commits")
        self.done: dict[str, int] = {}
        self.old_parts: dict[str, list[str]] = {}  # units committed by an earlier version (one marker each)
        self.legacy: set[str] = set()  # committed units whose summary is unknown: reduced from their parts
        self.scores = ScoreSummary.empty()
        self.writer: BatchCommits | None = None

    def load(self, units: list[Unit]) -> None:
        """Read the commits of this run's units, merging summaries while reading. A batch that also holds
        units outside this run's input cannot be split: its units are reduced from their files instead."""
        keys = {u.key for u in units}
        for b in read_batches(self.fs, self.commits):
            mine = [it for it in b["items"] if it[0] in keys]
            for key, _n, size in mine:
                if key in self.done:
                    raise RunError(f"unit {key} is committed twice under {self.commits}")
                self.done[key] = size
            if len(mine) == len(b["items"]):
                self.scores = self.scores.merge(ScoreSummary.from_dict(b["summary"]))
            else:
                self.legacy.update(it[0] for it in mine)
        for m in read_batches(self.fs, self.markers):
            if m["unit"] in keys and m["unit"] not in self.done:
                self.old_parts[m["unit"]] = m["parts"]
                self.done[m["unit"]] = -1
                if m.get("summary") is None:
                    self.legacy.add(m["unit"])
                else:
                    self.scores = self.scores.merge(ScoreSummary.from_dict(m["summary"]))

    def files(self, key: str) -> list[str]:
        """The scored files of a committed unit."""
        return self.old_parts.get(key) or [scored_path(self.out_root, key)]

    def start(self, n_pending: int) -> None:
        """Open the commit writer of this attempt (run.json is written just before the first commit)."""
        self.writer = BatchCommits(self.fs, self.commits, every=max(16, n_pending // 50),
                                   before_first=self._identity)

    def _identity(self) -> None:
        if not self.has_identity:  # recorded just before the first commit (see ray_pipeline's docstring)
            storage.write_json(self.fs, storage.join(self.out_root, "run.json"), run_identity(self.cfg))
            self.has_identity = True

    def commit(self, u: Unit, size: int, summary: ScoreSummary) -> None:
        """Unit u's scored file is written: record it (in the next commit batch), merge its summary."""
        self.writer.add([u.key, u.n_rows, size], summary)
        self.scores = self.scores.merge(summary)
        self.done[u.key] = size

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def cleanup(self, pending: list[Unit]) -> dict[str, int]:
        """One listing of scored/: delete the files of units that are not committed (a dead attempt's),
        in batched requests; return the sizes of the files left (the committed ones)."""
        root = storage.join(self.out_root, "scored")
        infos = storage.list_infos(self.fs, root)
        keep = {p for k in self.done for p in self.files(k)}
        stale = [i.path for i in infos if i.path not in keep and i.path.endswith(".parquet")]
        if stale:
            log.info("removing %d scored file(s) of uncommitted units", len(stale))
            storage.delete_files(self.fs, stale, self.storage_json)
        return {i.path: i.size for i in infos if i.path in keep}


def unit_groups(keys: list[str], files: dict[str, list[str]], sizes: dict[str, int], target: int) -> list[list[str]]:
    """Scored files in unit order, cut into consecutive groups of at most `target` bytes (a file larger
    than target is a group of its own): each group becomes one output file per split in pass 2."""
    groups: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for k in keys:
        for p in files[k]:
            if p not in sizes:
                raise RunError(f"scored file {p} of a committed unit is missing")
            if cur and size + sizes[p] > target:
                groups.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += sizes[p]
    if cur:
        groups.append(cur)
    return groups


class SplitLedger:
    """Pass 2's commits: the plan (τ and the groups, by digest) and the groups already split under it.
    A rerun with the same plan splits only the groups not committed; another plan (a new τ) redoes all."""

    def __init__(self, fs, out_root: str, storage_json: str):
        self.fs, self.out_root, self.storage_json = fs, out_root, storage_json
        self.root = storage.join(out_root, "_pass2")
        self.plan_path = storage.join(self.root, "plan.json")
        self.commits = storage.join(self.root, "commits")

    def begin(self, tau: float, groups: list[list[str]], target: int) -> dict[int, dict]:
        """The committed groups {gid: {files, counts}} of this plan; outputs of any other plan (and files
        of uncommitted groups) are deleted first."""
        digest = hashlib.sha256(json.dumps([repr(float(tau)), target, groups]).encode()).hexdigest()
        prev = storage.read_json(self.fs, self.plan_path) if storage.exists(self.fs, self.plan_path) else {}
        done: dict[int, dict] = {}
        if prev.get("digest") == digest:
            for b in read_batches(self.fs, self.commits):
                for gid, files, counts, *top in b["items"]:  # top: report.html's samples of the group
                    done[gid] = {"files": files, "counts": counts, "top": top[0] if top else {}}
            keep = {f["path"] for g in done.values() for f in g["files"]}
            stale = [i.path for s in SPLITS for i in storage.list_infos(self.fs, storage.join(self.out_root, s))
                     if i.path not in keep]
            storage.delete_files(self.fs, stale, self.storage_json)
            log.info("pass 2: %d of %d groups already split under this τ; %d to split", len(done), len(groups),
                     len(groups) - len(done))
        else:
            if prev:
                log.warning("pass 2: τ or the scored files changed since the last attempt: all %d groups are "
                            "split again", len(groups))
            for name in (*SPLITS, "_pass2"):
                storage.delete_dir(self.fs, storage.join(self.out_root, name))
            storage.write_json(self.fs, self.plan_path, {"tau": repr(float(tau)), "digest": digest,
                                                         "groups": len(groups)})
        self.writer = BatchCommits(self.fs, self.commits, every=max(1, len(groups) // 50), max_age_s=1.0)
        return done

    def commit(self, gid: int, files: list[dict], counts: dict[str, int], top: dict | None = None) -> None:
        self.writer.add([gid, files, counts, top or {}])

    def close(self) -> None:
        self.writer.close()


def verify_splits(fs, out_root: str, files: list[dict]) -> None:
    """kept/ removed/ errors/ hold exactly the files pass 2 reported, at their sizes, checked by one
    listing before the report and the manifest are written: the manifest never lists a missing file, and
    no file outside it is left in those folders."""
    want = {f["path"]: f["bytes"] for f in files}
    have = {i.path: i.size for s in SPLITS for i in storage.list_infos(fs, storage.join(out_root, s))}
    missing = sorted(set(want) - set(have))
    if missing:
        raise RunError(f"{len(missing)} output file(s) missing after pass 2, e.g. {missing[0]}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise RunError(f"{len(extra)} output file(s) no attempt reported, e.g. {extra[0]}")
    wrong = sorted(p for p in want if want[p] != have[p])
    if wrong:
        raise RunError(f"{len(wrong)} output file(s) have another size than written, e.g. {wrong[0]}")
