"""The commit/resume ledger of the Ray pipeline: what a run has committed, kept in object storage.

  run.json                   the run's identity (config + model fingerprint); a rerun must match it
  scored/_units/<unit>.json  commit marker of a unit: its parts, row count and score summary
A rerun skips committed units, and merges their summaries into the reduce while reading the markers.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from gradshield_ray import report, storage
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.errors import RunError
from gradshield_ray.listing import Unit, preflight_storage, thread_map
from gradshield_ray.stages import SPLITS
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


def absorb(scores: ScoreSummary, marker: dict) -> ScoreSummary:
    """Merge a commit marker's unit summary into `scores` and drop it from the marker; a marker written
    without one is flagged "legacy" (its parts are reduced from their fihs column instead)."""
    unit = marker.pop("summary", None)
    marker["legacy"] = unit is None
    return scores.merge(ScoreSummary.from_dict(unit)) if unit is not None else scores


class Ledger:
    """The pass-1 commits of one output prefix, as the driver sees them: committed units (marker without
    its summary) and the merged summary of every committed unit."""

    def __init__(self, fs, out_root: str, cfg: GradShieldConfig, has_identity: bool):
        self.fs, self.out_root, self.cfg, self.has_identity = fs, out_root, cfg, has_identity
        self.markers = storage.join(out_root, "scored", "_units")
        self.done: dict[str, dict] = {}
        self.scores = ScoreSummary.empty()

    def load(self, units: list[Unit]) -> None:
        """Read the markers of this run's units, merging each summary as it is read."""
        keys = {u.key for u in units}
        for m in thread_map(lambda p: storage.read_json(self.fs, p), storage.list_files(self.fs, self.markers, ".json")):
            if m["unit"] in keys:
                self.scores = absorb(self.scores, m)
                self.done[m["unit"]] = m

    def commit(self, u: Unit, parts: list[dict]) -> None:
        """Write unit u's marker (run.json first, just before the first commit), merge its summary."""
        m = {"unit": u.key, "n_rows": u.n_rows, "parts": sorted(r["path"] for r in parts),
             "summary": ScoreSummary.merge_all(ScoreSummary.from_dict(json.loads(r["summary"]))
                                               for r in parts).to_dict()}
        if not self.has_identity:  # recorded just before the first commit (see ray_pipeline's docstring)
            storage.write_json(self.fs, storage.join(self.out_root, "run.json"), run_identity(self.cfg))
            self.has_identity = True
        storage.write_json(self.fs, storage.join(self.markers, u.marker_name), m)
        self.scores = absorb(self.scores, m)
        self.done[u.key] = m


def verify_splits(fs, out_root: str, parts: list[str]) -> None:
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
