"""Faults, atomicity, determinism and secrets, on one S3 server (moto) and one local Ray for the module.

Every run here filters the same 24-row corpus (2 files × 3 row groups = 6 units) with the same config, so
each must give exactly the baseline's kept/removed/errors row ids (determinism), whatever happened to it:
  - a scorer actor killed hard mid-run (test-only hook in the actor) → Ray replaces it, the batch is retried;
  - transient S3 errors: a proxy in front of moto resets requests, before or after the server acted;
  - the driver (`gradshield-ray run`, a subprocess) SIGKILLed during pass 1 and during pass 2, then rerun;
  - actor pool size 1 instead of 2.
The Ray processes inherit AWS_SECRET_ACCESS_KEY and the config carries the same fake secret; the secret test
runs its own jobs and greps everything written or printed for it (in any test order).
A driver killed between report.json and manifest.json (a proxy holds the manifest's PUT), with the adaptive
threshold, checks that the next attempt deletes the dead attempt's report before pass 2.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest

from flaky_proxy import flaky_proxy
from s3server import FAKE_KEY, FAKE_SECRET, moto_server, s3_client, upload_dir

from gradshield_ray.config import GradShieldConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BUCKET = "faults"
SPLITS = ("kept", "removed", "errors")
N_UNITS = 6


@dataclass
class Env:
    url: str
    client: Any
    corpus: Path
    model: str
    ray_tmp: str
    gcs: str
    expected_ids: set[str]
    printed: list[str] = field(default_factory=list)  # everything the module's jobs printed or raised


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir) -> Iterator[Env]:
    """moto + a local Ray whose processes inherit the AWS credentials from the environment (as in a
    RayJob), with its session logs under a temp dir of this module; a private copy of the tiny model."""
    import ray

    from gradshield_ray.miniature.demo import make_corpus

    base = tmp_path_factory.mktemp("faults")
    model = shutil.copytree(tiny_model_dir, base / "model")
    src = make_corpus(base / "src", n_rows=24, n_files=2, seed=11)
    corpus = base / "in"
    corpus.mkdir()
    for f in sorted(src.glob("*.parquet")):
        pq.write_table(pq.read_table(f), corpus / f.name, row_group_size=4)
    ids = {f"{f.name}:{i}" for f in corpus.glob("*.parquet") for i in range(pq.read_metadata(f).num_rows)}
    ray_tmp = tempfile.mkdtemp(prefix="gsf", dir="/tmp")  # short: Ray's socket paths have a length limit
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with moto_server() as url:
            client = s3_client(url)
            client.create_bucket(Bucket=BUCKET)
            upload_dir(client, corpus, BUCKET, "in")
            ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False,
                     log_to_driver=False, _temp_dir=ray_tmp, _node_ip_address="127.0.0.1")
            try:
                yield Env(url, client, corpus, str(model), ray_tmp, ray.get_runtime_context().gcs_address, ids)
            finally:
                ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def config(env: Env, output: str, num_actors: int = 2, endpoint: str | None = None) -> dict:
    return {"input": f"s3://{BUCKET}/in", "output": f"s3://{BUCKET}/{output}", "model": {"path": env.model},
            "proxy": {"max_probes": 2}, "score": {"verify_rows": 0},
            "threshold": {"policy": "top_fraction", "fraction": 0.25},
            "storage": {"endpoint_url": endpoint or env.url, "access_key_id": FAKE_KEY,
                        "secret_access_key": FAKE_SECRET},
            "ray": {"num_actors": num_actors, "num_gpus_per_actor": 0.5, "num_cpus_per_actor": 0.5,
                    "batch_rows": 4, "render_num_cpus": 0.5},
            "output_files": {"target_file_bytes": 1}}  # one pass-2 group (one file per split) per unit


def keys(env: Env, prefix: str) -> list[str]:
    return sorted(o["Key"] for page in env.client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix) for o in page.get("Contents", []))


def outcome(env: Env, prefix: str, man: dict) -> dict[str, dict[str, float | None]]:
    """{split: {row id: fihs}} of a committed run, after checking conservation and no duplicate ids."""
    out: dict[str, dict[str, float | None]] = {}
    seen: list[str] = []
    for split in SPLITS:
        out[split] = {}
        for k in keys(env, f"{prefix}/{split}/"):
            t = pq.read_table(io.BytesIO(env.client.get_object(Bucket=BUCKET, Key=k)["Body"].read()),
                              columns=["gs_row_id", "fihs"])
            out[split].update(zip(t["gs_row_id"].to_pylist(), t["fihs"].to_pylist()))
            seen += t["gs_row_id"].to_pylist()
    assert len(seen) == len(set(seen)), "duplicated row ids"
    assert set(seen) == env.expected_ids and man["counts"]["input"] == len(env.expected_ids)
    assert {k: len(v) for k, v in out.items()} == {k: man["counts"][k] for k in SPLITS}
    return out


def same_kept_set(a: dict, b: dict) -> None:
    """The same rows in each split, with bit-identical scores."""
    assert {k: set(v) for k, v in a.items()} == {k: set(v) for k, v in b.items()}
    for split in SPLITS:
        assert a[split] == b[split], split


@contextmanager
def capture_fds() -> Iterator[list[str]]:
    """Everything written to fd 1 and 2 (and every log record) inside the block."""
    got: list[str] = []
    tmp = tempfile.TemporaryFile()
    saved = [os.dup(1), os.dup(2)]
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(tmp.fileno(), 1), os.dup2(tmp.fileno(), 2)
    try:
        yield got
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        logging.getLogger().removeHandler(handler)
        tmp.seek(0)
        got.append(tmp.read().decode(errors="replace"))
        got.extend(records)


@pytest.fixture(scope="module")
def baseline(env: Env) -> dict:
    """Pool of 2 actors, no faults. Every write the driver makes is recorded with what the bucket holds at
    that moment, to check the commit order; everything printed and logged is kept for the secret grep."""
    from gradshield_ray import storage
    from gradshield_ray.ray_pipeline import run_pipeline

    writes: list[tuple[str, list[str]]] = []
    real = storage.write_bytes

    def spy(fs, path: str, data: bytes) -> None:
        name = path.rsplit("/", 1)[-1]
        writes.append((name, keys(env, "base/") if name in ("report.json", "manifest.json") else []))
        real(fs, path, data)

    with pytest.MonkeyPatch.context() as mp, capture_fds() as printed:
        mp.setattr(storage, "write_bytes", spy)
        man = run_pipeline(GradShieldConfig.model_validate(config(env, "base")))
    env.printed += printed
    return {"manifest": man, "outcome": outcome(env, "base", man), "writes": writes}


# ---------------------------------------------------------------- determinism


def test_same_kept_set_across_reruns_and_pool_sizes(env, baseline):
    from gradshield_ray.ray_pipeline import run_pipeline

    man = run_pipeline(GradShieldConfig.model_validate(config(env, "pool1", num_actors=1)))
    got = outcome(env, "pool1", man)
    same_kept_set(got, baseline["outcome"])
    assert man["tau"] == pytest.approx(baseline["manifest"]["tau"], rel=1e-12)
    assert 0 < man["counts"]["removed"] < man["counts"]["input"]  # a real split, not a trivial one


# ---------------------------------------------------------------- atomicity


def test_report_and_manifest_written_after_every_shard(env, baseline):
    writes = baseline["writes"]
    names = [n for n, _ in writes]
    assert names[-2:] == ["report.json", "manifest.json"]  # nothing is written after the commit marker
    assert names.index("threshold.json") < names.index("histogram.png") < names.index("report.json")
    commits = [i for i, n in enumerate(names) if re.fullmatch(r"[0-9a-f]{12}-[0-9]{6}\.json", n)]
    assert commits and names.index("run.json") < commits[0]  # identity before the first commit
    assert names.index("threshold.json") < names.index("histogram.png") < names.index("report.json")
    man = baseline["manifest"]
    files = [f["path"].removeprefix(f"s3://{BUCKET}/") for s in SPLITS for f in man["files"][s]]
    for name, listed in writes[-2:]:
        scored = [k for k in listed if k.startswith("base/scored/") and k.endswith(".parquet")]
        assert len(scored) == N_UNITS  # one scored file per unit
        assert all(f in listed for f in files), name  # every output file exists when the report, then the manifest, is written
        assert ("base/report.json" in listed) == (name == "manifest.json")
        assert "base/manifest.json" not in listed
    assert sorted(man["kept_parts"]) == sorted(f"s3://{BUCKET}/{k}" for k in keys(env, "base/kept/"))
    assert man["scoring"]["groups"] == N_UNITS and 0 < len(man["files"]["removed"]) < N_UNITS  # no empty files


def test_rerun_with_changed_model_or_config_refuses(env, baseline, tmp_path):
    """The committed prefix `base` was made with env.model: a rerun with other weights at the same path,
    another model path, or another scoring config fails at once with the difference named."""
    from gradshield_ray.ray_pipeline import RunError, run_pipeline
    from gradshield_ray.miniature.testing import save_tiny_model

    weights = Path(env.model) / "model.safetensors"
    original = weights.read_bytes()
    other = save_tiny_model(tmp_path / "other", seed=1)
    try:
        weights.write_bytes((other / "model.safetensors").read_bytes())
        t = time.perf_counter()
        with pytest.raises(RunError, match=r"holds a run with a different model \(model_fingerprint"):
            run_pipeline(GradShieldConfig.model_validate(config(env, "base")))
        assert time.perf_counter() - t < 10
    finally:
        weights.write_bytes(original)
    cfg = config(env, "base")
    cfg["model"]["path"] = str(other)
    with pytest.raises(RunError, match="different config.model.path, model"):
        run_pipeline(GradShieldConfig.model_validate(cfg))
    cfg = config(env, "base")
    cfg["data"] = {"max_tokens": 512}
    with pytest.raises(RunError, match="different config.data.max_tokens; use a new output prefix"):
        run_pipeline(GradShieldConfig.model_validate(cfg))
    # the committed run itself is untouched and still returned as is
    assert run_pipeline(GradShieldConfig.model_validate(config(env, "base")))["tau"] == baseline["manifest"]["tau"]


# ---------------------------------------------------------------- faults


def test_scorer_actor_killed_mid_run(env, baseline, tmp_path, monkeypatch):
    from gradshield_ray.ray_pipeline import run_pipeline

    flag, loads = tmp_path / "killed", tmp_path / "loads"
    monkeypatch.setenv("GRADSHIELD_TEST_KILL_ACTOR_AFTER", f"1:{flag}")
    monkeypatch.setenv("GRADSHIELD_TEST_LOAD_LOG", str(loads))
    man = run_pipeline(GradShieldConfig.model_validate(config(env, "actor-kill", num_actors=2)))
    assert flag.exists(), "the hook never fired"
    assert len(loads.read_text().split()) >= 3  # 2 actors + at least one replacement
    same_kept_set(outcome(env, "actor-kill", man), baseline["outcome"])


def test_transient_s3_errors(env, baseline):
    from gradshield_ray.ray_pipeline import run_pipeline

    # faults start after the driver's preflight (which uses few attempts on purpose, to fail fast)
    with flaky_proxy(env.url, rate=0.1, max_faults=8, seed=7, skip_first=60, ttl_s=400) as proxy:
        cfg = config(env, "flaky", num_actors=1, endpoint=f"http://127.0.0.1:{proxy.port}")
        man = run_pipeline(GradShieldConfig.model_validate(cfg))
    assert proxy.n_faults >= 5 and all(proxy.faults.values()), proxy.faults
    same_kept_set(outcome(env, "flaky", man), baseline["outcome"])


def _train_module():
    from pipelines import filter_then_train

    return filter_then_train


def _start_cli(env: Env, cfg_path: Path, log: Path, slow_s: str = "1.0") -> subprocess.Popen:
    """The CLI as its own driver process, joining the module's Ray (RAY_ADDRESS), as a RayJob driver would."""
    e = {**os.environ, "RAY_ADDRESS": env.gcs, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1",
         "GRADSHIELD_TEST_SLOW_S": slow_s}  # a pause per part written widens the window each kill must land in
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "gradshield_ray.cli", "run", "--config", str(cfg_path)],
                                env=e, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def committed(env: Env, prefix: str) -> list:
    """The records of the commit batches under prefix (units of pass 1, groups of pass 2)."""
    return [it for k in keys(env, prefix)
            for it in json.loads(env.client.get_object(Bucket=BUCKET, Key=k)["Body"].read())["items"]]


def _kill_when(env: Env, p: subprocess.Popen, prefix: str, timeout: float = 240, at_least: int = 0) -> None:
    """SIGKILL the driver as soon as an object under `prefix` exists (and, with at_least, once the commit
    batches there hold that many records)."""
    t = time.monotonic()
    while not keys(env, prefix) or (at_least and len(committed(env, prefix)) < at_least):
        assert p.poll() is None, f"the driver exited before the kill: {p.args}"
        assert time.monotonic() - t < timeout, f"nothing under {prefix} after {timeout}s"
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    time.sleep(1.0)  # Ray notices the dead driver and stops its job's workers


def test_driver_killed_in_pass1_and_pass2_then_rerun(env, baseline, tmp_path, monkeypatch):
    """`gradshield-ray run` (a subprocess driver joining the module's Ray, as a RayJob driver would) is
    SIGKILLed in pass 1; a rerun finishes pass 1; another `gradshield-ray run` is SIGKILLed in pass 2; the
    same config then completes the run. The reruns without a kill run in-process, on warm workers (the
    first one stopped by the test right after pass 1, so the second CLI attempt starts at the reduce)."""
    from gradshield_ray import ray_pipeline
    from gradshield_ray.storage import StorageConfig

    cfg = config(env, "dk", num_actors=1)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    logs = [tmp_path / f"attempt{i}.log" for i in range(2)]
    train = _train_module()
    tcfg = train.TrainJobConfig(run=f"s3://{BUCKET}/dk", output=f"s3://{BUCKET}/train",
                                storage=StorageConfig(endpoint_url=env.url))
    # attempt 1 (CLI): killed in pass 1, once the first units have committed
    _kill_when(env, _start_cli(env, cfg_path, logs[0]), "dk/scored/_commits/")
    assert 1 <= len(committed(env, "dk/scored/_commits/")) < N_UNITS and not keys(env, "dk/manifest.json")
    # attempt 2 (in-process): resumes pass 1 and scores only the uncommitted units; stopped before the reduce
    def stop(*a, **k):
        raise RuntimeError("stopped by the test after pass 1")

    with monkeypatch.context() as mp:
        mp.setattr(ray_pipeline, "decide", stop)
        with pytest.raises(RuntimeError, match="stopped by the test"):
            ray_pipeline.run_pipeline(GradShieldConfig.model_validate(cfg))
    assert len(committed(env, "dk/scored/_commits/")) == N_UNITS and not keys(env, "dk/kept/")
    # attempt 3 (CLI): killed late in pass 2, once 4 of its 6 groups are committed
    _kill_when(env, _start_cli(env, cfg_path, logs[1]), "dk/_pass2/commits/", at_least=4)
    split_before = len(committed(env, "dk/_pass2/commits/"))
    assert 4 <= split_before and not keys(env, "dk/manifest.json") and not keys(env, "dk/report.json")
    env.printed += [log.read_text(errors="replace") for log in logs]
    # partial outputs are never presented as a result: training refuses; the same config finishes the run
    with pytest.raises(train.NotCommitted):
        train.read_manifest(tcfg)
    man = ray_pipeline.run_pipeline(GradShieldConfig.model_validate(cfg))
    assert man == train.read_manifest(tcfg)
    assert man["scoring"]["rows_scored_this_attempt"] == 0  # every unit was committed before
    # pass 2 resumed: only the groups not committed before the kill were split again, with the exact result
    assert man["scoring"]["groups"] == N_UNITS
    assert man["scoring"]["groups_split_this_attempt"] == N_UNITS - split_before <= 2
    same_kept_set(outcome(env, "dk", man), baseline["outcome"])


def test_report_of_a_dead_attempt_is_deleted_adaptive_threshold(env, baseline, tmp_path):
    """With the adaptive threshold (the default policy): the driver is SIGKILLed after report.json is written
    and while manifest.json is being written (a proxy holds that PUT, so the kill lands exactly there). The
    rerun deletes that report when pass 2 starts; pass 2 is resumable and the dead attempt had committed every
    group, so nothing is split again, and the check is made while a proxy holds the rerun's first write of its
    own report files (histogram.png, written by finalize before report.json). Then it commits the exact result:
    the baseline's scores, split at the adaptive τ."""
    from gradshield_ray.ray_pipeline import run_pipeline
    from gradshield_ray.summary import ScoreSummary
    from gradshield_ray.threshold import Canaries, ThresholdConfig, decide

    cfg = config(env, "rk", num_actors=1)
    cfg["threshold"] = {"policy": "adaptive"}
    cfg_path = tmp_path / "run.yaml"
    with flaky_proxy(env.url, rate=0.0, max_faults=0, hold=rb"^PUT /faults/rk/manifest\.json") as proxy:
        cfg_path.write_text(json.dumps({**cfg, "storage": {**cfg["storage"],
                                                            "endpoint_url": f"http://127.0.0.1:{proxy.port}"}}))
        p = _start_cli(env, cfg_path, tmp_path / "attempt.log", slow_s="0")
        assert proxy.held.wait(240), "the driver never wrote manifest.json"
        assert "rk/report.json" in keys(env, "rk/report.json") and not keys(env, "rk/manifest.json")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    env.printed.append((tmp_path / "attempt.log").read_text(errors="replace"))
    time.sleep(1.0)  # Ray notices the dead driver and stops its job's workers
    dead_report = env.client.get_object(Bucket=BUCKET, Key="rk/report.json")["Body"].read()
    assert json.loads(dead_report)["policy"] == "adaptive" and not keys(env, "rk/manifest.json")

    # the rerun takes over the dead driver's lease (_lease.json) through the proxy, by a conditional PUT
    result: dict = {}
    with flaky_proxy(env.url, rate=0.0, max_faults=0, hold=rb"^PUT /faults/rk/histogram\.png") as proxy:
        rerun = {**cfg, "storage": {**cfg["storage"], "endpoint_url": f"http://127.0.0.1:{proxy.port}"}}
        worker = threading.Thread(target=lambda: result.update(
            man=run_pipeline(GradShieldConfig.model_validate(rerun))), daemon=True)
        worker.start()
        assert proxy.held.wait(240), "the rerun never reached its report"
        at_pass2 = keys(env, "rk/")
        proxy.release.set()
        worker.join(240)
    assert "rk/threshold.json" in at_pass2 and "rk/report.json" not in at_pass2, at_pass2
    man = result["man"]
    assert man["scoring"]["rows_scored_this_attempt"] == 0 and man["policy"] == "adaptive"
    assert man["scoring"]["groups_split_this_attempt"] == 0  # pass 2 resumed: every group was committed
    got = outcome(env, "rk", man)
    base = {rid: f for split in ("kept", "removed") for rid, f in baseline["outcome"][split].items()}
    assert {**got["kept"], **got["removed"]} == base and got["errors"] == baseline["outcome"]["errors"]
    # the adaptive τ of the baseline's scores, with the canaries this run scored (threshold.canaries: gate)
    can = json.loads(env.client.get_object(Bucket=BUCKET, Key="rk/canaries.json")["Body"].read())
    tau = decide(ScoreSummary.from_values(np.array(list(base.values()))), ThresholdConfig(),
                 Canaries(np.array(can["harmful"]), np.array(can["benign"]))).tau
    assert man["tau"] == pytest.approx(tau, rel=1e-12)
    assert all(f <= man["tau"] for f in got["kept"].values()) and all(f > man["tau"] for f in got["removed"].values())
    assert json.loads(env.client.get_object(Bucket=BUCKET, Key="rk/report.json")["Body"].read()) != json.loads(
        dead_report)  # the committed report is the rerun's own


# ---------------------------------------------------------------- security


def test_secret_never_written_or_printed(env, baseline, tmp_path):
    """The secret (in the config and in every Ray process's environment) appears in no object the jobs
    wrote, no Ray session log, nothing printed or logged, and no error message. The test runs its own
    jobs (the baseline, a CLI driver process whose output it captures, a refused rerun), so what it checks
    does not depend on which other tests ran before it; whatever they printed is checked too."""
    from gradshield_ray.ray_pipeline import RunError, run_pipeline

    secret, key_id = FAKE_SECRET.encode(), FAKE_KEY.encode()
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(config(env, "secret", num_actors=1)))
    p = _start_cli(env, cfg_path, tmp_path / "cli.log", slow_s="0")
    assert p.wait(300) == 0, (tmp_path / "cli.log").read_text(errors="replace")[-3000:]
    env.printed.append((tmp_path / "cli.log").read_text(errors="replace"))
    assert keys(env, "secret/manifest.json") and keys(env, "base/manifest.json")
    objects = keys(env, "")
    assert len(objects) > 50
    for k in objects:
        if k.startswith("in/"):
            continue
        body = env.client.get_object(Bucket=BUCKET, Key=k)["Body"].read()
        assert secret not in body and key_id not in body, k
    n_logs = 0
    for root, _, files in os.walk(env.ray_tmp):
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                n_logs += 1
                assert secret not in path.read_bytes(), path
    assert n_logs > 10
    # an error on a committed prefix: the message names the difference, never a credential
    cfg = config(env, "base")
    cfg["score"]["scope"] = "mlp"
    with pytest.raises(RunError) as e:
        run_pipeline(GradShieldConfig.model_validate(cfg))
    env.printed.append(f"{e.value!s} {e.value!r}")
    for text in env.printed:
        assert FAKE_SECRET not in text and FAKE_KEY not in text
