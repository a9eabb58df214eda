"""Filter then train, end to end on a CPU against a real S3 server: a Ray filter run (manifest.json last) →
pipelines/filter_then_train.py (Ray Train TorchTrainer, 2 gloo workers, DeepSpeed ZeRO-2, the tiny model) on
exactly its kept rows."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from s3server import FAKE_KEY, FAKE_SECRET, s3_bucket, upload_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "filter_then_train.py"

pytestmark = pytest.mark.slow


def _load_script():
    from pipelines import filter_then_train

    return filter_then_train


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "RAY_ADDRESS": "local"}
    return env


@pytest.fixture(scope="module")
def s3():
    with s3_bucket("corpus") as s:
        yield s


def storage_cfg(url: str) -> dict:
    return {"endpoint_url": url, "access_key_id": FAKE_KEY, "secret_access_key": FAKE_SECRET}


@pytest.fixture(scope="module")
def filter_run(tmp_path_factory, ray_local, s3, tiny_model_dir):
    """A committed filter run on S3 (as a RayJob leaves it); top_fraction removes a quarter, so kept ≠ input."""
    from gradshield_ray.config import GradShieldConfig
    from gradshield_ray.miniature.demo import make_corpus
    from gradshield_ray.ray_pipeline import run_pipeline

    url, client = s3
    corpus = make_corpus(tmp_path_factory.mktemp("ftt") / "corpus", n_rows=48, n_files=2, seed=11)
    upload_dir(client, corpus, "corpus", "in")
    cfg = GradShieldConfig.model_validate({
        "input": "s3://corpus/in", "output": "s3://corpus/run", "model": {"path": tiny_model_dir},
        "proxy": {"max_probes": 4}, "threshold": {"policy": "top_fraction", "fraction": 0.25},
        "storage": storage_cfg(url),
        "ray": {"num_actors": 1, "num_gpus_per_actor": 0.5, "num_cpus_per_actor": 0.5, "render_num_cpus": 0.5,
                "batch_rows": 16}})
    man = run_pipeline(cfg)
    assert 0 < man["counts"]["kept"] < man["counts"]["input"]
    return "s3://corpus/run", man


def _kept_ids(man, url) -> list[str]:
    from gradshield_ray.storage import StorageConfig, filesystem

    ids = []
    for part in man["kept_parts"]:
        fs, path = filesystem(part, StorageConfig.model_validate(storage_cfg(url)))
        with fs.open_input_file(path) as f:
            ids += pq.read_table(f, columns=["gs_row_id"])["gs_row_id"].to_pylist()
    return ids


def _s3_json(client, uri: str) -> dict:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def _storage_args(url: str) -> list[str]:
    return [a for k, v in storage_cfg(url).items() for a in ("--set", f"storage.{k}={v}")]


def test_refuses_a_run_without_manifest(tmp_path):
    """No manifest.json = not committed: exit 3 with a clear message, for training and for --check."""
    run = tmp_path / "run"
    (run / "scored" / "_units").mkdir(parents=True)  # an interrupted filter run: state, but no manifest
    (run / "run.json").write_text("{}")
    for extra in ([], ["--check"]):
        out = subprocess.run([sys.executable, str(SCRIPT), "--run", str(run), "--output", str(tmp_path / "out"),
                              *extra], capture_output=True, text=True, env=_env(), timeout=120)
        assert out.returncode == 3, out.stderr[-2000:]
        assert "not committed" in out.stderr and "manifest.json" in out.stderr and "Refusing" in out.stderr
    assert not (tmp_path / "out").exists()


def test_filter_then_train_end_to_end(tmp_path, s3, filter_run):
    """S3 in, S3 out, as the two RayJobs run it; credentials reach the workers from the driver's config."""
    import pyarrow.fs as pafs
    import torch
    from transformers import AutoModelForCausalLM

    from gradshield_ray.storage import StorageConfig, filesystem

    mod = _load_script()
    url, client = s3
    run, man = filter_run
    kept = man["counts"]["kept"]
    # the check the Argo workflow runs before the training RayJob
    assert mod.main(["--run", run, "--check", *_storage_args(url)]) == 0
    argv = ["--run", run, "--output", "s3://corpus/train", *_storage_args(url), "--set", "scaling.num_workers=2",
            "--set", "train.micro_batch_size=2", "--set", "train.lr=3e-3", "--set", "train.epochs=1"]
    assert mod.main(argv) == 0
    done = _s3_json(client, "s3://corpus/train/train_manifest.json")
    metrics = _s3_json(client, "s3://corpus/train/metrics.json")
    # exactly the kept rows: as many, each once, and the same ids (removed rows never reach the trainer)
    assert metrics["rows_seen"] == metrics["unique_rows_seen"] == kept == done["rows_seen"]
    ids = _kept_ids(man, url)
    assert len(ids) == kept
    assert metrics["row_ids_sha256"] == hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
    assert metrics["world_size"] == 2 and metrics["zero_stage"] == 2
    assert sum(metrics["rows_per_step"]) == kept and metrics["steps"] == math.ceil(math.ceil(kept / 2) / 2)
    # the loss is finite and falls
    loss = metrics["loss"]
    assert len(loss) == metrics["steps"] >= 6 and all(math.isfinite(x) for x in loss)
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 and loss[-1] < loss[0]
    # a checkpoint on S3: the trained model in HF format, which loads, and differs from the start
    assert done["checkpoint"].startswith("s3://corpus/train/")
    assert _s3_json(client, done["checkpoint"] + "/metrics.json") == metrics
    fs, path = filesystem(done["model_dir"], StorageConfig.model_validate(storage_cfg(url)))
    local = tmp_path / "model"
    local.mkdir()
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    assert (local / "config.json").exists() and (local / "tokenizer.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(local)
    start = AutoModelForCausalLM.from_pretrained(man["config"]["model"]["path"])
    with torch.no_grad():
        diffs = [float((a - b).abs().max()) for a, b in zip(trained.parameters(), start.parameters())]
    assert max(diffs) > 0 and all(math.isfinite(d) for d in diffs)
    # no credential in what was written
    for key in ("train/train_manifest.json", "train/metrics.json"):
        body = client.get_object(Bucket="corpus", Key=key)["Body"].read().decode()
        assert FAKE_SECRET not in body and FAKE_KEY not in body
    # a rerun of a committed training run is a no-op
    assert mod.main(argv) == 0
    assert _s3_json(client, "s3://corpus/train/train_manifest.json") == done


def test_lora_with_zero3(tmp_path, s3, filter_run):
    """LoRA via peft under ZeRO-3 (parameters partitioned, gathered for the save): an adapter checkpoint
    (written to a local output this time)."""
    mod = _load_script()
    run, man = filter_run
    out = tmp_path / "lora"
    assert mod.main(["--run", run, "--output", str(out), *_storage_args(s3[0]), "--set", "train.lora.enabled=true",
                     "--set", "train.lora.r=4", "--set", "train.zero_stage=3", "--set", "train.lr=1e-2",
                     "--set", "train.micro_batch_size=4", "--set", "train.max_steps=3"]) == 0
    done = json.loads((out / "train_manifest.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lora"] is True and metrics["zero_stage"] == 3 and metrics["steps"] == 3
    assert all(math.isfinite(x) for x in metrics["loss"])
    model_dir = Path(done["model_dir"])
    assert (model_dir / "adapter_config.json").exists() and (model_dir / "adapter_model.safetensors").exists()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(man["config"]["model"]["path"])
    lora = PeftModel.from_pretrained(base, model_dir)
    b = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert b and max(float(p.abs().max()) for p in b) > 0  # B starts at 0: it was trained and saved whole
