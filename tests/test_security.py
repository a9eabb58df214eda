"""Security defaults that need no cluster: remote code stays off, YAML loads safely, credentials never
serialize or echo. (The end-to-end secret grep over a real job is tests/test_faults.py::
test_secret_never_written_or_printed; bad-credential errors are in tests/test_fail_fast.py.)"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from s3server import FAKE_KEY, FAKE_SECRET

from gradshield_ray.config import GradShieldConfig


def test_trust_remote_code_is_off_and_custom_code_never_runs(tiny_model_dir, tmp_path):
    from gradshield_ray.model import ModelLoadError, check_model_config, load_tokenizer

    assert GradShieldConfig().model.trust_remote_code is False
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    marker = tmp_path / "executed"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import LlamaConfig as EvilConfig\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(cfg))
    mc = GradShieldConfig.model_validate({"model": {"path": str(model)}}).model
    for step in (load_tokenizer, check_model_config):
        try:
            step(mc)
        except ModelLoadError:
            pass  # refusing is fine too; executing is not
    assert not marker.exists()


def test_yaml_config_is_loaded_safely(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "c.yaml"
    path.write_text(f"input: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        GradShieldConfig.from_yaml(path)
    with pytest.raises(yaml.constructor.ConstructorError):
        GradShieldConfig.from_yaml(None, [f"input=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_credentials_never_serialize():
    from gradshield_ray.ray_pipeline import run_identity

    cfg = GradShieldConfig.model_validate({"storage": {"access_key_id": FAKE_KEY, "secret_access_key": FAKE_SECRET,
                                                       "session_token": FAKE_SECRET + "tok"}})
    for text in (repr(cfg), str(cfg), cfg.model_dump_json(), json.dumps(cfg.to_public_dict()),
                 repr(cfg.storage), json.dumps(cfg.model_dump(mode="json"))):
        assert FAKE_SECRET not in text and FAKE_KEY not in text
    assert set(run_identity(GradShieldConfig.model_validate({"model": {"path": "."}}))["config"]) == {
        "input", "model", "data", "proxy", "score"}  # no storage (credentials); threshold may change on a rerun


def test_storage_errors_are_redacted(monkeypatch):
    from gradshield_ray.storage import StorageConfig, describe_error

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET + "env")
    cfg = StorageConfig(access_key_id=FAKE_KEY, secret_access_key=FAKE_SECRET)
    e = OSError(f"AWS Error ACCESS_DENIED: key {FAKE_KEY} secret {FAKE_SECRET} signed")
    msg = str(describe_error(e, "s3://b/in", "list input", cfg))
    assert "access denied: check the credentials" in msg
    assert FAKE_SECRET not in msg and FAKE_KEY not in msg
    env_only = StorageConfig()
    msg = str(describe_error(OSError(f"x {FAKE_SECRET}env y"), "s3://b/in", "read", env_only))
    assert FAKE_SECRET not in msg
