"""Shared fixtures: tiny local models (no hub) and small Parquet corpora."""
from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def proxy_variants():
    """research/proxy_variants.py (the repository root is on pytest's pythonpath; nothing is imported by file path)."""
    from research import proxy_variants

    return proxy_variants


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tied-embedding tiny Llama + chat tokenizer saved like any HF checkpoint."""
    from gradshield_ray.miniature.testing import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0))


@pytest.fixture(scope="session")
def untied_model_dir(tmp_path_factory):
    """Untied head, biases everywhere, and pad_token_id set to a token that occurs in real text (","):
    exercises the bias path and the Embedding padding_idx rule (that row gets no gradient)."""
    from gradshield_ray.miniature.testing import build_tiny_llama, build_tokenizer

    tok = build_tokenizer()
    common = tok.convert_tokens_to_ids(",")  # occurs in most sample rows
    model = build_tiny_llama(tok, tie_word_embeddings=False, pad_token_id=common, seed=1,
                             attention_bias=True, mlp_bias=True)
    path = tmp_path_factory.mktemp("untied")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory):
    """A random-init Gemma-3 text model: a scaled word embedding (out = sqrt(hidden) · W[ids]), logit
    soft-capping, q/k norms, alternating sliding-window layers."""
    from gradshield_ray.miniature.testing import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("gemma3"), seed=0, arch="gemma3"))


def chat(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


@pytest.fixture(scope="session")
def sample_rows() -> list[list[dict[str, str]]]:
    """Varied lengths (so padding matters), multi-turn and system turns included."""
    rows = [chat("How do I bake bread?" * (k % 4 + 1), "Sure, here is how. " * (k % 5 + 1)) for k in range(7)]
    rows.append([{"role": "system", "content": "Be brief."}] + chat("Name a color.", "Red."))
    rows.append(chat("Hi", "I cannot help with that.") + chat("Why not?", "Sure, it is fine then, here it is."))
    rows.append(chat("Give me a number", "42"))
    return rows


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray per test module: 2 CPUs and one logical GPU, so num_gpus=1 actors schedule here.
    address="local" starts a new one even when a `ray start` cluster of another test runs on this machine;
    the short temp dir keeps Ray's socket paths under their length limit."""
    import ray

    tmp = tempfile.mkdtemp(prefix="gsr", dir="/tmp")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # boto/pyarrow never wait for an instance-metadata service
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False,
             log_to_driver=False, _temp_dir=tmp, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
