"""A real multi-process Ray cluster (a head and a second node started with `ray start`) running the
`gradshield-ray run` command as a separate driver with RAY_ADDRESS, against the S3 server: nothing may
depend on driver-local state (local paths, globals, fixtures captured by closure). The model itself is an
s3:// prefix: each node (its own model cache, as separate machines would have) downloads it once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3server import FAKE_KEY, FAKE_SECRET, free_port, moto_server, s3_client, upload_dir

from gradshield_ray.miniature.demo import make_corpus
from gradshield_ray.model_source import COMPLETE, DOWNLOAD_LOG

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _wait_nodes(address: str, n: int, env: dict, timeout: float = 90) -> None:
    code = (f"import ray,time; ray.init(address='{address}', logging_level='ERROR');"
            f"t=time.time()\nwhile len([x for x in ray.nodes() if x['Alive']])<{n} and time.time()-t<{timeout}:"
            " time.sleep(0.5)\nprint(len([x for x in ray.nodes() if x['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout + 60)
    assert out.stdout.strip().endswith(str(n)), out.stderr[-2000:]


def _gpu_nodes(address: str, env: dict) -> list[str]:
    """Node ids of the live nodes with a (logical) GPU."""
    code = (f"import json, ray; ray.init(address='{address}', logging_level='ERROR');"
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_node_cluster_run(tmp_path, tiny_model_dir):
    """Only the worker node has the (logical) GPU, so the scorer actor must run there: report.json's `nodes`
    must show every row scored and the one model load on the worker."""
    # a loopback test cluster: token auth off (KubeRay manages auth on real clusters)
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    with moto_server() as url:
        client = s3_client(url)
        client.create_bucket(Bucket="corpus")
        src = make_corpus(tmp_path / "in", n_rows=36, n_files=3, seed=5)
        upload_dir(client, src, "corpus", "in")
        upload_dir(client, Path(tiny_model_dir), "corpus", "models/tiny")
        caches = {n: tmp_path / f"cache-{n}" for n in ("head", "worker", "driver")}
        head = _start(["--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
                       "--node-ip-address=127.0.0.1"], {**env, "GRADSHIELD_RAY_MODEL_CACHE": str(caches["head"])})
        worker = None
        try:
            time.sleep(3)
            worker = _start([f"--address={address}", "--num-cpus=2", "--num-gpus=1", "--node-ip-address=127.0.0.1"],
                            {**env, "GRADSHIELD_RAY_MODEL_CACHE": str(caches["worker"])})
            _wait_nodes(address, 2, env)
            (worker_id,) = _gpu_nodes(address, env)
            cfg = tmp_path / "c.yaml"
            cfg.write_text(
                "input: s3://corpus/in\noutput: s3://corpus/cluster-run\nmodel:\n  path: s3://corpus/models/tiny\n"
                f"proxy:\n  max_probes: 4\nstorage:\n  endpoint_url: {url}\n"
                "ray:\n  num_actors: 1\n  num_cpus_per_actor: 0.5\n  render_num_cpus: 0.5\n")
            # credentials reach the job through the standard AWS environment, as in a RayJob
            job_env = {**env, "RAY_ADDRESS": address, "AWS_ACCESS_KEY_ID": FAKE_KEY,
                       "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "GRADSHIELD_RAY_MODEL_CACHE": str(caches["driver"])}
            out = subprocess.run([sys.executable, "-m", "gradshield_ray.cli", "run", "--config", str(cfg)], env=job_env,
                                 capture_output=True, text=True, timeout=600, cwd=tmp_path)
            assert out.returncode == 0, out.stderr[-4000:]
            result = json.loads(out.stdout[out.stdout.index("{"):])
            assert result["counts"]["input"] == 36
            assert result["counts"]["kept"] + result["counts"]["removed"] + result["counts"]["errors"] == 36
            man = json.loads(client.get_object(Bucket="corpus", Key="cluster-run/manifest.json")["Body"].read())
            assert man["counts"] == result["counts"]
            # the second node did the scoring: all 36 rows and the one model load are on the worker's node id
            assert man["nodes"][worker_id]["rows_scored"] == 36 and man["nodes"][worker_id]["model_loads"] == 1
            assert sum(n["rows_rendered"] for n in man["nodes"].values()) == 36
            assert FAKE_SECRET not in out.stdout + out.stderr
            # the s3:// model: per node and per copy (full, or tokenizer/config only), every file downloaded
            # exactly once however many workers and actors there used it; the full copy exists on some node
            names = sorted(p.name for p in Path(tiny_model_dir).iterdir() if p.is_file())
            full = 0
            for node, cache in caches.items():
                for copy in (d for d in cache.iterdir() if d.is_dir()) if cache.is_dir() else []:
                    got = [line.split()[1] for line in (copy / DOWNLOAD_LOG).read_text().splitlines()]
                    assert len(got) == len(set(got)) and (copy / COMPLETE).is_file(), (node, copy.name, got)
                    full += sorted(got) == names
                    assert node != "driver" or "model.safetensors" not in got  # the driver fetches no weights
            assert full >= 1
        finally:
            if worker is not None:
                _stop(worker)
            _stop(head)
