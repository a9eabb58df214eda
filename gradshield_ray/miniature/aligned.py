"""Build (or reuse) the miniature's aligned model θ₀: a tiny Llama trained from scratch on CPU to refuse
harmful requests ("I cannot …"), comply with everyday ones ("Sure, …") and classify review sentiment.

Why build one: no model hub is reachable here, and a random-init model has no alignment for GradShield to
protect. Settings follow PROTOTYPE_FINDINGS §B (hidden 128, 4 layers, vocab 3000, AdamW 1e-3, 30 epochs).
The build is deterministic (fixed seeds, one thread) and cached under a key of its spec and the data
version, so later runs (demo, benchmark, tests) load it from disk in about a second.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from gradshield_ray.miniature import mixtures
from gradshield_ray.miniature.finetune import Recipe, train
from gradshield_ray.miniature.testing import build_tiny_llama, build_tokenizer

# Bump when the data generators or the build procedure change: it is part of the cache key.
BUILD_VERSION = "mini-3"
CACHE_ENV = "GRADSHIELD_RAY_CACHE"


@dataclass(frozen=True)
class MiniatureSpec:
    vocab_size: int = 3000
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    seed: int = 0
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 32

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "build": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    """$GRADSHIELD_RAY_CACHE, else .cache/gradshield_ray under the working directory."""
    return Path(os.environ.get(CACHE_ENV) or ".cache/gradshield_ray")


def build(spec: MiniatureSpec, out_dir: str | Path) -> Path:
    """Train θ₀ from scratch and save it (model, tokenizer, build.json) to out_dir."""
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    tok = build_tokenizer(spec.vocab_size, corpus=mixtures.tokenizer_corpus())
    model = build_tiny_llama(tok, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                             num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                             intermediate_size=spec.intermediate_size, tie_word_embeddings=True, seed=spec.seed)
    data = mixtures.alignment_data(seed=spec.seed)
    info = train(model, tok, data.rows, Recipe(lr=spec.lr, epochs=spec.epochs, batch_size=spec.batch_size,
                                               warmup_frac=0.05, decay=True, seed=spec.seed))
    meta = {"spec": asdict(spec), "build_version": BUILD_VERSION, "rows": len(data.rows),
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - t0, **info}
    return save_checkpoint(model, tok, out_dir, meta)


def save_checkpoint(model, tok, out_dir: str | Path, meta: dict) -> Path:
    """Model, tokenizer and build.json (written last: a cached checkpoint exists once build.json does)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "build.json").write_text(json.dumps(meta, indent=2))
    return out


@contextlib.contextmanager
def building(path: Path) -> Iterator[Path]:
    """A temporary directory beside `path` to build into; renamed to `path` when the block succeeds (atomic,
    so a crash never leaves a half-written cache entry) and removed in any case. If another process won the
    race, its copy is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
    try:
        yield tmp
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "build.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def aligned_model(spec: MiniatureSpec | None = None, cache_dir: str | Path | None = None,
                  log=print) -> Path:
    """Path of the cached θ₀ for `spec`, building it first if absent (atomic: built in a temp dir, renamed)."""
    spec = spec or MiniatureSpec()
    root = Path(cache_dir) if cache_dir else cache_root()
    path = root / f"aligned-{spec.key()}"
    if (path / "build.json").exists():
        return path
    if log:
        log(f"building the aligned miniature θ₀ into {path} (once; about 1-2 minutes on 2 cores)")
    with building(path) as tmp:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # deterministic and fair on a shared box
        try:
            build(spec, tmp)
        finally:
            torch.set_num_threads(threads)
    return path


def load(path: str | Path):
    """(model, tokenizer) of a saved miniature, eval mode, frozen, eager attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model, tok
