"""Global mistakes fail on the driver within seconds, before Ray starts, with a message naming the cause:
a path that matches nothing, a missing bucket, bad credentials (never echoed), an unreachable endpoint, a
probe set with no usable prompts, a model that cannot load. None of them can hang with zero tasks: each test
replaces the Ray start with an assertion, so reaching it fails the test."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3server import FAKE_KEY, FAKE_SECRET, free_port, moto_server, s3_client

from gradshield_ray.config import GradShieldConfig

LIMIT_S = 10.0


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server() as url:
        c = s3_client(url)
        c.create_bucket(Bucket="ffast")
        d = tmp_path_factory.mktemp("ffast")
        pq.write_table(pa.table({"messages": [[{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]]}), d / "a.parquet")
        c.upload_file(str(d / "a.parquet"), "ffast", "in/a.parquet")
        yield url


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """A second moto server that checks credentials (after 4 unauthenticated set-up calls): one IAM user
    with an access key and an allow-all policy, and a bucket with a one-row corpus."""
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "4")
        server = moto_server()
        url = server.__enter__()
    try:
        iam = boto3.client("iam", endpoint_url=url, aws_access_key_id="setup", aws_secret_access_key="setup",
                           region_name="us-east-1")
        iam.create_user(UserName="gs")
        key = iam.create_access_key(UserName="gs")["AccessKey"]
        iam.put_user_policy(UserName="gs", PolicyName="all", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        good = boto3.client("s3", endpoint_url=url, aws_access_key_id=key["AccessKeyId"],
                            aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1")
        good.create_bucket(Bucket="locked")
        d = tmp_path_factory.mktemp("auth")
        pq.write_table(pa.table({"messages": [[{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]]}), d / "a.parquet")
        good.upload_file(str(d / "a.parquet"), "locked", "in/a.parquet")
        yield url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Reaching the Ray start means the mistake was not caught on the driver."""
    from gradshield_ray import ray_pipeline

    def refuse() -> None:
        raise AssertionError("Ray was started: the mistake was not caught by the driver's preflight")

    monkeypatch.setattr(ray_pipeline, "_ray_init", refuse)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def cfg_for(model: str, url: str, **over) -> GradShieldConfig:
    d = {"input": "s3://ffast/in", "output": "s3://ffast/out", "model": {"path": model}, "proxy": {"max_probes": 2},
         "storage": {"endpoint_url": url, "access_key_id": FAKE_KEY, "secret_access_key": FAKE_SECRET}}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return GradShieldConfig.model_validate(d)


def fails_fast(cfg: GradShieldConfig, match: str) -> str:
    from gradshield_ray.ray_pipeline import run_pipeline

    t = time.perf_counter()
    with pytest.raises(Exception, match=match) as e:
        run_pipeline(cfg)
    assert time.perf_counter() - t < LIMIT_S
    msg = f"{e.value!s} {e.value!r}"
    assert FAKE_SECRET not in msg
    return msg


@pytest.mark.parametrize("where", ["s3", "local"])
def test_path_that_matches_nothing(s3, tiny_model_dir, tmp_path, where):
    inp = "s3://ffast/no/such/prefix" if where == "s3" else str(tmp_path / "nothing")
    fails_fast(cfg_for(tiny_model_dir, s3, input=inp, output=str(tmp_path / "o")),
               "does not exist: no file or prefix matches it")


def test_prefix_without_parquet(s3, tiny_model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "_SUCCESS").write_text("")
    fails_fast(cfg_for(tiny_model_dir, s3, input=str(tmp_path / "in"), output=str(tmp_path / "o")),
               r"contains no \*\.parquet or JSON Lines \(\*\.jsonl, \*\.json, \*\.gz\) files \(1 other files\)")


@pytest.mark.parametrize("bad,message", [
    (b"not parquet at all", r"bad\.parquet: not a readable Parquet file"),
    (None, r"bad\.parquet.*messages"),  # readable Parquet without the messages column
])
def test_unusable_input_file(s3, tiny_model_dir, tmp_path, bad, message):
    """Footers are read and schema-checked on the driver: one unusable file among good ones fails the run,
    naming the file, before Ray starts (its rows are unknown, so skipping it could lose rows)."""
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]}),
                   tmp_path / "in" / "good.parquet")
    if bad is None:
        pq.write_table(pa.table({"text": ["no messages column"]}), tmp_path / "in" / "bad.parquet")
    else:
        (tmp_path / "in" / "bad.parquet").write_bytes(bad)
    msg = fails_fast(cfg_for(tiny_model_dir, s3, input=str(tmp_path / "in"), output=str(tmp_path / "o")),
                     "1 input file\\(s\\) cannot be used")
    assert re.search(message, msg), msg


@pytest.mark.parametrize("side", ["input", "output"])
def test_missing_bucket(s3, tiny_model_dir, side):
    over = {side: f"s3://no-such-bucket/{side}"}
    fails_fast(cfg_for(tiny_model_dir, s3, **over),
               "bucket 'no-such-bucket' of 's3://no-such-bucket/.*' does not exist")


def test_unreachable_endpoint(tiny_model_dir):
    fails_fast(cfg_for(tiny_model_dir, f"http://127.0.0.1:{free_port()}"), "cannot reach the storage endpoint")


@pytest.mark.parametrize("how", ["unknown key", "wrong secret", "env"])
def test_bad_credentials_fail_fast_without_echoing_the_secret(auth_s3, tiny_model_dir, monkeypatch, capsys,
                                                               tmp_path, how):
    from gradshield_ray.cli import main

    url, key_id, _ = auth_s3
    storage = {"endpoint_url": url, "access_key_id": FAKE_KEY if how == "unknown key" else key_id,
               "secret_access_key": FAKE_SECRET}
    if how == "env":  # credentials from the standard AWS environment, not the config
        storage = {"endpoint_url": url}
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    d = {"input": "s3://locked/in", "output": "s3://locked/out", "model": {"path": tiny_model_dir},
         "proxy": {"max_probes": 2}, "storage": storage}
    fails_fast(GradShieldConfig.model_validate(d), "access denied: check the credentials")
    # the CLI: exit code 2, the cause on stderr, the secret nowhere in what it prints
    (tmp_path / "c.yaml").write_text(json.dumps(d))
    capsys.readouterr()
    assert main(["run", "--config", str(tmp_path / "c.yaml")]) == 2
    out = capsys.readouterr()
    assert "access denied: check the credentials" in out.err
    assert FAKE_SECRET not in out.out + out.err


def test_good_credentials_pass_the_preflight(auth_s3, tiny_model_dir):
    """The same check with the right key gets as far as starting Ray (here: the test's refusal)."""
    url, key_id, secret = auth_s3
    cfg = cfg_for(tiny_model_dir, url, input="s3://locked/in", output="s3://locked/out",
                  storage={"endpoint_url": url, "access_key_id": key_id, "secret_access_key": secret})
    fails_fast(cfg, "Ray was started")


@pytest.mark.parametrize("name,text", [
    ("blank.txt", "\n   \n\t\n"),
    ("no_prompt.jsonl", '{"text": "x"}\n{"prompt": "   "}\n'),
])
def test_probe_set_without_usable_prompts(s3, tiny_model_dir, tmp_path, name, text):
    (tmp_path / name).write_text(text)
    fails_fast(cfg_for(tiny_model_dir, s3, proxy={"probes": str(tmp_path / name)}), "has no usable prompts")


def _broken_model(src: str, dst: Path, how: str) -> str:
    shutil.copytree(src, dst)
    w = dst / "model.safetensors"
    if how == "garbage":
        w.write_bytes(b"\x13\x37" * (w.stat().st_size // 2))
    elif how == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "missing":
        w.unlink()
    elif how == "config":
        (dst / "config.json").write_text("{not json")
    return str(dst)


@pytest.mark.parametrize("how,message", [
    ("garbage", "model.safetensors is not a valid safetensors file"),
    ("truncated", "model.safetensors is not a valid safetensors file"),
    ("missing", "has no weight files"),
    ("config", "config.json' is not a valid JSON file"),
])
def test_model_that_cannot_load(s3, tiny_model_dir, tmp_path, how, message):
    model = _broken_model(tiny_model_dir, tmp_path / "m", how)
    fails_fast(cfg_for(model, s3), message)


def test_model_that_cannot_load_local_runner(tiny_model_dir, tmp_path):
    """The single-process runner loads the model in-process: the same mistake fails as fast."""
    from gradshield_ray import local

    model = _broken_model(tiny_model_dir, tmp_path / "m", "truncated")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "a"}]]}), tmp_path / "in" / "a.parquet")
    cfg = GradShieldConfig.model_validate({"input": str(tmp_path / "in"), "output": str(tmp_path / "o"),
                                           "model": {"path": model}, "proxy": {"max_probes": 2}})
    t = time.perf_counter()
    with pytest.raises(Exception, match="cannot load model"):
        local.run_filter(cfg)
    assert time.perf_counter() - t < LIMIT_S
