"""θ₀ from where users keep it: s3:// (a real moto S3 server; one download per node under a file lock,
resumable, verified), a Hub id from the offline Hub cache, and a PEFT adapter merged into its base."""
from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import torch

from s3server import FAKE_KEY, FAKE_SECRET, s3_bucket, upload_dir

from gradshield_ray import model_source
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.model import ModelLoadError, load_tokenizer
from gradshield_ray.render import encode_messages
from gradshield_ray.storage import StorageConfig


def storage_cfg(url: str) -> StorageConfig:
    return StorageConfig(endpoint_url=url, access_key_id=FAKE_KEY, secret_access_key=FAKE_SECRET)


def downloads(local: Path) -> list[list[str]]:
    log = local / model_source.DOWNLOAD_LOG
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _fetch(args):
    uri, url, cache = args
    return str(model_source.fetch_s3(uri, storage_cfg(url), cache))


def scores(cfg: GradShieldConfig, rows) -> np.ndarray:
    from gradshield_ray.scorer import FIHSScorer

    s = FIHSScorer(cfg)
    return s.score_encoded([encode_messages(s.tokenizer, r, 512, "right") for r in rows])


def cfg_for(path: str, **model) -> GradShieldConfig:
    return GradShieldConfig.model_validate({"model": {"path": path, **model}, "proxy": {"max_probes": 4},
                                            "score": {"verify_rows": 0, "answer_tokens": None}})


@pytest.fixture(scope="module")
def s3_model(tiny_model_dir):
    with s3_bucket("models") as (url, client):
        upload_dir(client, Path(tiny_model_dir), "models", "tiny")
        yield url, client


def test_s3_model_downloaded_once_under_a_lock(s3_model, tiny_model_dir, tmp_path):
    """Four processes on one node resolve the same s3:// checkpoint at once: each file is downloaded once,
    all get the same verified copy; a second resolve downloads nothing."""
    url, _ = s3_model
    cache = str(tmp_path / "cache")
    with ProcessPoolExecutor(4, mp_context=get_context("spawn")) as pool:
        paths = list(pool.map(_fetch, [("s3://models/tiny", url, cache)] * 4))
    assert len(set(paths)) == 1
    local = Path(paths[0])
    names = sorted(p.relative_to(tiny_model_dir).as_posix() for p in Path(tiny_model_dir).rglob("*") if p.is_file())
    assert sorted(rel for _, rel, _ in downloads(local)) == names  # every file exactly once
    for n in names:
        assert (local / n).read_bytes() == (Path(tiny_model_dir) / n).read_bytes()
    model_source.fetch_s3("s3://models/tiny", storage_cfg(url), cache)
    assert len(downloads(local)) == len(names)


def test_s3_download_resumes_and_refetches_a_changed_object(s3_model, tiny_model_dir, tmp_path):
    url, client = s3_model
    cache = str(tmp_path / "cache")
    local = model_source.fetch_s3("s3://models/tiny", storage_cfg(url), cache)
    n0 = len(downloads(local))
    # an interrupted download: the marker and the weights are gone, half of the weights are in .part
    weights = (Path(tiny_model_dir) / "model.safetensors").read_bytes()
    (local / model_source.COMPLETE).unlink()
    (local / "model.safetensors").unlink()
    (local / "model.safetensors.part").write_bytes(weights[: len(weights) // 2])
    model_source.fetch_s3("s3://models/tiny", storage_cfg(url), cache)
    new = downloads(local)[n0:]
    assert [(rel, int(n)) for _, rel, n in new] == [("model.safetensors", len(weights) - len(weights) // 2)]
    assert (local / "model.safetensors").read_bytes() == weights
    # the object changes in the bucket (new ETag): only it is downloaded again
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    client.put_object(Bucket="models", Key="tiny2/config.json", Body=json.dumps({**cfg, "x": 1}).encode())
    for p in Path(tiny_model_dir).iterdir():
        if p.name != "config.json":
            client.upload_file(str(p), "models", f"tiny2/{p.name}")
    local2 = model_source.fetch_s3("s3://models/tiny2", storage_cfg(url), cache)
    n1 = len(downloads(local2))
    client.put_object(Bucket="models", Key="tiny2/config.json", Body=json.dumps({**cfg, "x": 2}).encode())
    model_source.fetch_s3("s3://models/tiny2", storage_cfg(url), cache)
    assert [rel for _, rel, _ in downloads(local2)[n1:]] == ["config.json"]
    assert json.loads((local2 / "config.json").read_text())["x"] == 2


def test_s3_model_scores_like_the_local_copy(s3_model, tiny_model_dir, tmp_path, sample_rows):
    """model.path=s3://… end to end through the scorer; the driver's checks fetch no weights."""
    url, _ = s3_model
    remote = cfg_for("s3://models/tiny", cache_dir=str(tmp_path / "c"))
    remote.storage = storage_cfg(url)
    load_tokenizer(remote.model, remote.storage)
    small = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
    assert len(small) == 1 and not list(small[0].glob("*.safetensors"))  # tokenizer/config only
    a = scores(remote, sample_rows)
    b = scores(cfg_for(tiny_model_dir), sample_rows)
    np.testing.assert_array_equal(a, b)
    from gradshield_ray.report import model_fingerprint

    assert model_fingerprint(remote) == model_fingerprint(remote)  # from the listing, stable


def test_s3_model_errors_name_the_cause(s3_model, tmp_path):
    url, _ = s3_model
    with pytest.raises(ModelLoadError, match="holds no objects"):
        load_tokenizer(cfg_for("s3://models/nothing-here").model, storage_cfg(url))
    bad = StorageConfig(endpoint_url=url, access_key_id=FAKE_KEY, secret_access_key=FAKE_SECRET, max_attempts=1)
    with pytest.raises(ModelLoadError, match="cannot list model.path 's3://no-such-bucket/m'") as e:
        load_tokenizer(cfg_for("s3://no-such-bucket/m").model, bad)
    assert FAKE_SECRET not in str(e.value)


def test_hub_id_from_the_offline_cache(tiny_model_dir, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (set for every test): a Hub id resolves from the local Hub cache without network,
    and one that is not cached fails naming HF_HUB_OFFLINE."""
    import huggingface_hub.constants as hc

    rev = "0" * 40
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hc.HF_HUB_OFFLINE
    tok = load_tokenizer(cfg_for("acme/tiny-chat").model)
    assert tok.chat_template
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and it is not in the local Hub cache"):
        load_tokenizer(cfg_for("acme/not-cached").model)
    with pytest.raises(ModelLoadError, match="does not exist or is not a directory"):
        load_tokenizer(cfg_for(str(tmp_path / "missing")).model)


def _hand_merge(peft_model, base_dir: str, out: Path) -> None:
    """W + scaling · B·A for every LoRA layer, written as a plain checkpoint (what `merge_and_unload` does,
    computed here without peft's merge code)."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(base_dir)
    params = dict(merged.named_parameters())
    n = 0
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer):
            target = name.removeprefix("base_model.model.") + ".weight"
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            with torch.no_grad():
                params[target] += (b @ a) * mod.scaling["default"]
            n += 1
    assert n > 0
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)


def test_peft_adapter_theta0_scores_like_hand_merged(tiny_model_dir, tmp_path, sample_rows):
    """θ₀ = base + adapter: model.path is an adapter directory (its base found from adapter_config.json,
    or model.base_path); the scores equal those of the same adapter merged by hand, and the batched
    method equals brute force (one backward per row) on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         init_lora_weights=False))  # B ≠ 0: the adapter changes θ₀
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir
    _hand_merge(pm, tiny_model_dir, tmp_path / "merged")

    hooks = scores(cfg_for(str(adapter)), sample_rows)
    brute = scores(cfg_for(str(tmp_path / "merged")).model_copy(
        update={"score": cfg_for("x").score.model_copy(update={"method": "brute"})}), sample_rows)
    np.testing.assert_allclose(hooks, brute, rtol=1e-5, atol=1e-9)
    plain = scores(cfg_for(tiny_model_dir), sample_rows)
    assert np.max(np.abs(hooks - plain)) > 1e-3 * np.max(np.abs(plain))  # the adapter is really applied
    # the base given explicitly (an adapter whose recorded base is a Hub id the cluster cannot reach)
    moved = tmp_path / "adapter2"
    shutil.copytree(adapter, moved)
    ac = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**ac, "base_model_name_or_path": "acme/unreachable"}))
    np.testing.assert_array_equal(scores(cfg_for(str(moved), base_path=tiny_model_dir), sample_rows), hooks)
    fp = lambda c: hashlib.sha256(c.encode()).hexdigest()  # noqa: E731
    from gradshield_ray.report import model_fingerprint

    assert fp(model_fingerprint(cfg_for(str(adapter)))) != fp(model_fingerprint(cfg_for(tiny_model_dir)))
