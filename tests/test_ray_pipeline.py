"""The Ray pipeline end to end against a real S3 server process, on a local Ray with a logical GPU."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3server import FAKE_KEY, FAKE_SECRET, s3_bucket, upload_dir

from gradshield_ray.config import GradShieldConfig
from gradshield_ray.miniature.demo import make_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    with s3_bucket("corpus") as s:
        yield s


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3):
    """6 Parquet files × 2+ row groups, uploaded to s3://corpus/in/."""
    local = tmp_path_factory.mktemp("corpus")
    src = make_corpus(local / "src", n_rows=72, n_files=6, seed=3)
    out = local / "in"
    out.mkdir()
    for f in sorted(src.glob("*.parquet")):
        pq.write_table(pq.read_table(f), out / f.name, row_group_size=5)
    upload_dir(s3[1], out, "corpus", "in")
    return out


def cfg_for(model_dir, url, output, **extra) -> GradShieldConfig:
    d = {"input": "s3://corpus/in", "output": output, "model": {"path": model_dir},
         "proxy": {"max_probes": 6},
         "storage": {"endpoint_url": url, "access_key_id": FAKE_KEY, "secret_access_key": FAKE_SECRET},
         "ray": {"num_actors": 2, "num_gpus_per_actor": 0.5, "num_cpus_per_actor": 0.5, "batch_rows": 4}}
    for k, v in extra.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return GradShieldConfig.model_validate(d)


def read_s3_dir(client, bucket, prefix) -> pa.Table | None:
    import io

    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", []) if o["Key"].endswith(".parquet")]
    tabs = [pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read())) for k in keys]
    tabs = [t for t in tabs if t.num_rows]
    return pa.concat_tables(tabs) if tabs else None


def test_s3_end_to_end_matches_core_cli(tmp_path, s3, ray_local, corpus, tiny_model_dir, monkeypatch):
    from gradshield_ray import local
    from gradshield_ray.ray_pipeline import run_pipeline

    url, client = s3
    load_log = tmp_path / "loads.txt"
    monkeypatch.setenv("GRADSHIELD_TEST_LOAD_LOG", str(load_log))
    man = run_pipeline(cfg_for(tiny_model_dir, url, "s3://corpus/run1"))
    assert len(pq.ParquetFile(next(corpus.glob("*.parquet"))).metadata.to_dict()["row_groups"]) >= 2
    # loaded once per actor: 2 actors, 18 units of ≤ 5 rows in batches of 4 rows
    assert len(load_log.read_text().split()) == 2
    parts = {k: read_s3_dir(client, "corpus", f"run1/{k}/") for k in ("kept", "removed", "errors")}
    n = {k: 0 if t is None else t.num_rows for k, t in parts.items()}
    inp = pa.concat_tables([pq.read_table(f) for f in sorted(corpus.glob("*.parquet"))])
    assert sum(n.values()) == inp.num_rows == man["counts"]["input"]
    assert n == {k: man["counts"][k] for k in n}
    got = pa.concat_tables([t for t in parts.values() if t is not None])
    ids = got["gs_row_id"].to_pylist()
    assert len(set(ids)) == len(ids) == inp.num_rows
    # the single-process core CLI on the same data gives the same τ and per-row scores
    core = local.run_filter(GradShieldConfig.model_validate(
        {"input": str(corpus), "output": str(tmp_path / "core"), "model": {"path": tiny_model_dir},
         "proxy": {"max_probes": 6}}))
    assert man["tau"] == pytest.approx(core["tau"], rel=1e-6)
    core_scores = {r["gs_row_id"]: r["fihs"] for r in pa.concat_tables(
        [pq.read_table(f) for f in sorted((tmp_path / "core" / "scored").glob("*.parquet"))]).to_pylist()}
    ray_scores = dict(zip(ids, got["fihs"].to_pylist()))
    a = np.array([ray_scores[k] for k in core_scores])
    b = np.array(list(core_scores.values()))
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
    # original columns byte-identical
    by_id = {r["gs_row_id"]: r for r in got.to_pylist()}
    for f in sorted(corpus.glob("*.parquet")):
        for i, row in enumerate(pq.read_table(f).to_pylist()):
            assert {k: by_id[f"{f.name}:{i}"][k] for k in row} == row
    # the manifest lists every output file (none empty) with its rows, bytes and sha256, and nothing else is there
    import hashlib

    listed = [f for split in ("kept", "removed", "errors") for f in man["files"][split]]
    assert sum(f["rows"] for f in listed) == inp.num_rows and all(f["rows"] > 0 for f in listed)
    for split in ("kept", "removed", "errors"):
        assert sum(f["rows"] for f in man["files"][split]) == man["counts"][split]
    on_s3 = {o["Key"]: o["Size"] for p in ("kept", "removed", "errors")
             for o in client.list_objects_v2(Bucket="corpus", Prefix=f"run1/{p}/").get("Contents", [])}
    assert {f["path"].removeprefix("s3://corpus/") for f in listed} == set(on_s3)
    for f in listed:
        body = client.get_object(Bucket="corpus", Key=f["path"].removeprefix("s3://corpus/"))["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (f["bytes"], f["sha256"])
    # default target_file_bytes (256 MiB): one file per split for this small corpus, whatever the 30 units
    assert len(man["files"]["kept"]) == 1 and man["kept_parts"] == [man["files"]["kept"][0]["path"]]
    # the nodes section: every row rendered and scored on this one node, 2 model loads (one per actor)
    (node,) = man["nodes"].values()
    assert node == {"rows_rendered": inp.num_rows, "rows_scored": inp.num_rows, "model_loads": 2}
    # the manifest and report hold no credential
    blob = json.dumps(man)
    assert FAKE_SECRET not in blob and FAKE_KEY not in blob
    # a rerun of a committed run is a no-op that returns the same manifest
    assert run_pipeline(cfg_for(tiny_model_dir, url, "s3://corpus/run1"))["tau"] == man["tau"]


def test_resume_after_failure_scores_fewer_rows(tmp_path, s3, ray_local, corpus, tiny_model_dir, monkeypatch):
    from gradshield_ray.ray_pipeline import run_pipeline

    url, client = s3
    # units of ≤ 3 rows (row groups of 5 are split into row ranges) and an autoscaling pool of 1–2 actors
    cfg = cfg_for(tiny_model_dir, url, "s3://corpus/run2", ray={"unit_rows": 3, "min_actors": 1, "max_actors": 2})
    monkeypatch.setenv("GRADSHIELD_TEST_FAIL_AFTER_PARTS", "8")
    with pytest.raises(Exception, match="injected failure"):
        run_pipeline(cfg)
    monkeypatch.delenv("GRADSHIELD_TEST_FAIL_AFTER_PARTS")
    commits = [o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="run2/scored/_commits/")
               .get("Contents", [])]
    assert commits, "some units must have been committed before the failure"
    assert client.list_objects_v2(Bucket="corpus", Prefix="run2/manifest.json").get("KeyCount", 0) == 0
    man = run_pipeline(cfg)
    total = man["counts"]["input"]
    assert 0 < man["scoring"]["rows_scored_this_attempt"] < total
    got = pa.concat_tables([t for t in (read_s3_dir(client, "corpus", f"run2/{k}/")
                                        for k in ("kept", "removed", "errors")) if t is not None])
    ids = got["gs_row_id"].to_pylist()
    assert len(ids) == len(set(ids)) == total
    _check_reduce_from_markers(client, cfg, man)


def _check_reduce_from_markers(client, cfg, man) -> None:
    """τ comes from the summaries in the commit batches (merged on the driver while read, the scores are not
    read again). They must equal a Ray Data scan of the committed files' fihs column, bin for bin; and
    units committed as an earlier version did (one marker per unit, no summary) are reduced from their
    files to the same τ."""
    import hashlib

    from gradshield_ray.ray_pipeline import aggregate_parts, run_pipeline
    from gradshield_ray.storage import filesystem
    from gradshield_ray.summary import ScoreSummary

    keys = [o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="run2/scored/_commits/")["Contents"]]
    batches = {k: json.loads(client.get_object(Bucket="corpus", Key=k)["Body"].read()) for k in keys}
    merged = ScoreSummary.merge_all(ScoreSummary.from_dict(b["summary"]) for b in batches.values())
    units = [it[0] for b in batches.values() for it in b["items"]]
    assert len(units) == len(set(units)) == man["scoring"]["units"]
    fs, _ = filesystem(cfg.output, cfg.storage)
    scan = aggregate_parts(sorted(f"corpus/run2/scored/{u}.parquet" for u in units), fs)
    assert np.array_equal(merged.counts, scan.counts)
    assert (merged.count, merged.min, merged.max) == (scan.count, scan.min, scan.max)
    assert merged.count == man["counts"]["kept"] + man["counts"]["removed"]
    assert merged.sum == pytest.approx(scan.sum, rel=1e-12, abs=1e-12)
    for k in keys[::2]:  # half the batches as an older version wrote them: a marker per unit, no summary
        for key, n, _ in batches[k]["items"]:
            legacy = {"unit": key, "n_rows": n, "parts": [f"corpus/run2/scored/{key}.parquet"]}
            name = hashlib.sha1(key.encode()).hexdigest()[:20] + ".json"
            client.put_object(Bucket="corpus", Key=f"run2/scored/_units/{name}", Body=json.dumps(legacy).encode())
        client.delete_object(Bucket="corpus", Key=k)
    client.delete_object(Bucket="corpus", Key="run2/manifest.json")
    again = run_pipeline(cfg)
    assert again["scoring"]["rows_scored_this_attempt"] == 0
    assert again["tau"] == pytest.approx(man["tau"], rel=1e-9) and again["counts"] == man["counts"]


def test_rerun_with_other_config_refuses(s3, ray_local, corpus, tiny_model_dir):
    """Another scoring config on a committed prefix is refused; another threshold config re-decides τ from
    the committed scores (nothing rescored) and replaces the split and the manifest."""
    from gradshield_ray.ray_pipeline import RunError, run_pipeline

    url, client = s3
    keep_all = run_pipeline(cfg_for(tiny_model_dir, url, "s3://corpus/run3", threshold={"policy": "keep_all"}))
    assert keep_all["counts"]["removed"] == 0
    with pytest.raises(RunError, match="different config.score.scope"):
        run_pipeline(cfg_for(tiny_model_dir, url, "s3://corpus/run3", threshold={"policy": "keep_all"},
                             score={"scope": "mlp"}))
    top = run_pipeline(cfg_for(tiny_model_dir, url, "s3://corpus/run3",
                               threshold={"policy": "top_fraction", "fraction": 0.25}))
    assert top["scoring"]["rows_scored_this_attempt"] == 0
    assert top["policy"] == "top_fraction" and top["counts"]["removed"] > 0
    assert top["counts"]["input"] == keep_all["counts"]["input"]
    removed = read_s3_dir(client, "corpus", "run3/removed/")
    assert removed is not None and removed.num_rows == top["counts"]["removed"]
    assert min(removed["fihs"].to_pylist()) > top["tau"]


@pytest.mark.parametrize("override,message", [
    ({"proxy": {"comply": "Absolutely-not-a-token"}}, "is not a single token"),
    ({"model": {"path": "/nonexistent"}}, "does not exist"),
    ({"proxy": {"probes": "/nonexistent/probes.txt"}}, "does not exist"),
])
def test_driver_preflight_fails_fast(tmp_path, tiny_model_dir, override, message):
    """Mistakes that would otherwise surface inside workers fail on the driver, before Ray starts."""
    import time

    from gradshield_ray.ray_pipeline import run_pipeline

    cfg = cfg_for(tiny_model_dir, "http://127.0.0.1:9", str(tmp_path / "o"), **override)
    t = time.perf_counter()
    with pytest.raises(Exception, match=message):
        run_pipeline(cfg)
    assert time.perf_counter() - t < 10


def test_run_identity_tolerates_new_fields_but_not_changes():
    from gradshield_ray.ray_pipeline import _differences

    prev = {"config": {"score": {"scope": "all", "method": "hooks"}}, "model_fingerprint": "abc"}
    newer = {"config": {"score": {"scope": "all", "method": "hooks", "max_padding": 0.15}}, "model_fingerprint": "abc"}
    assert _differences(prev, newer) == []
    changed = {"config": {"score": {"scope": "mlp", "method": "hooks"}}, "model_fingerprint": "xyz"}
    assert _differences(prev, changed) == ["config.score.scope", "model_fingerprint"]


def test_second_run_into_one_prefix_fails_fast(tmp_path, s3, ray_local, corpus, tiny_model_dir):
    """Two concurrent drivers on one prefix: the first (`gradshield-ray run`, a subprocess joining this Ray)
    holds output/_lease.json (created with If-None-Match: *); the second fails in seconds naming the holder.
    After the first is SIGKILLed the same command resumes at once (the holder's process is gone on this
    host); a lease of another host is refused until it expires."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    from gradshield_ray.lease import LeaseHeld
    from gradshield_ray.ray_pipeline import run_pipeline

    url, client = s3
    cfg = cfg_for(tiny_model_dir, url, "s3://corpus/lease")
    path = tmp_path / "c.json"
    path.write_text(cfg.model_dump_json())  # YAML is a superset of JSON
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "GRADSHIELD_TEST_SLOW_S": "0.5",
           "AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    first = subprocess.Popen([sys.executable, "-m", "gradshield_ray.cli", "run", "--config", str(path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t = time.monotonic()
        while client.list_objects_v2(Bucket="corpus", Prefix="lease/_lease.json").get("KeyCount", 0) == 0:
            assert first.poll() is None and time.monotonic() - t < 120, "the first driver never took the lease"
            time.sleep(0.2)
        t = time.perf_counter()
        with pytest.raises(LeaseHeld, match=r"in use by another run \(host .*, pid %d" % first.pid):
            run_pipeline(cfg)
        assert time.perf_counter() - t < 10
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    time.sleep(1.0)  # Ray notices the dead driver and stops its job's workers
    man = run_pipeline(cfg)  # the holder is gone: taken over at once, and the run completes
    assert man["counts"]["kept"] + man["counts"]["removed"] + man["counts"]["errors"] == man["counts"]["input"]
    assert client.list_objects_v2(Bucket="corpus", Prefix="lease/_lease.json").get("KeyCount", 0) == 0  # released
    # a live lease of another host is refused until it expires
    other = cfg_for(tiny_model_dir, url, "s3://corpus/lease2", output_files={"lease_s": 3})
    client.put_object(Bucket="corpus", Key="lease2/_lease.json", Body=json.dumps(
        {"owner": "x", "host": "another-host", "pid": 1, "expires": time.time() + 3}).encode())
    with pytest.raises(LeaseHeld, match="another-host"):
        run_pipeline(other)
    time.sleep(3.5)
    from gradshield_ray.lease import Lease
    from gradshield_ray.stages import storage_json

    with Lease(other.output, storage_json(other), 3):  # expired: taken over
        held = json.loads(client.get_object(Bucket="corpus", Key="lease2/_lease.json")["Body"].read())
        assert held["host"] != "another-host" and held["pid"] == os.getpid()


def test_unit_rows_split_row_groups_into_ranges(tmp_path):
    """A row group larger than ray.unit_rows becomes row ranges that tile it; each is read on its own."""
    from gradshield_ray import storage
    from gradshield_ray.listing import list_units
    from gradshield_ray.stages import read_unit

    d = tmp_path / "in"
    d.mkdir()
    rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(17)]
    pq.write_table(pa.table({"messages": rows, "k": list(range(17))}), d / "a.parquet", row_group_size=10)
    cfg = GradShieldConfig.model_validate({"input": str(d), "ray": {"unit_rows": 4}})
    units = list_units(cfg)
    assert [(u.row_group, u.start, u.n_rows, u.offset) for u in units] == [
        (0, 0, 4, 0), (0, 4, 4, 4), (0, 8, 2, 8), (1, 0, 4, 10), (1, 4, 3, 14)]
    assert len({u.key for u in units}) == 5 and units[0].key == "a.parquet/rg-00000-r0000000000"
    fs, _ = storage.filesystem(str(d), cfg.storage)
    got = [k for u in units for k in read_unit(fs, u.__dict__)["k"].to_pylist()]
    assert got == list(range(17))
    whole = list_units(GradShieldConfig.model_validate({"input": str(d)}))  # default: whole row groups, old keys
    assert [u.key for u in whole] == ["a.parquet/rg-00000", "a.parquet/rg-00001"]


def test_actor_pool_bounds():
    from gradshield_ray.config import RayConfig

    assert RayConfig(num_actors=3).pool_size() == (3, 3)
    assert RayConfig(min_actors=1, max_actors=8).pool_size() == (1, 8)
    assert RayConfig(num_actors=2, max_actors=4).pool_size() == (2, 4)
    with pytest.raises(ValueError, match="larger than ray.max_actors"):
        RayConfig(min_actors=5, max_actors=2)
