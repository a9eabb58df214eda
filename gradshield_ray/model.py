"""Load the aligned model θ₀ and its tokenizer once, frozen and in eval mode."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from gradshield_ray import model_source
from gradshield_ray.config import ModelConfig
from gradshield_ray.storage import StorageConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or tokenizer cannot be loaded; the message names the cause."""


def pick_device(name: str) -> torch.device:
    """"auto" → the GPU Ray assigned (or any visible one), else CPU; lets num_gpus=1 actors run on CPU boxes."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dirs(cfg: ModelConfig, storage: StorageConfig | None, weights: bool) -> tuple[Path, Path | None]:
    """(checkpoint directory, adapter directory or None), both local: model.path resolved from wherever it
    is kept; when it is a PEFT adapter, the checkpoint is its base."""
    try:
        path = model_source.resolve(cfg.path, storage, cfg.cache_dir, cfg.revision, weights)
        if not model_source.is_adapter(path):
            return path, None
        base = model_source.adapter_base(path, cfg.base_path)
        return model_source.resolve(base, storage, cfg.cache_dir, None, weights), path
    except model_source.ModelSourceError as e:
        raise ModelLoadError(str(e)) from None


def load_tokenizer(cfg: ModelConfig, storage: StorageConfig | None = None):
    """The model's fast tokenizer with a chat template (an adapter's own tokenizer when it ships one, else
    its base's); fails with the cause named."""
    from transformers import AutoTokenizer

    base, adapter = _dirs(cfg, storage, weights=False)
    src = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"cannot load tokenizer from {cfg.path!r}: {type(e).__name__}: {e}") from e
    if cfg.chat_template:
        tokenizer.chat_template = cfg.chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"tokenizer at {cfg.path!r} has no chat_template; set model.chat_template")
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError("a fast tokenizer is required (offsets locate the assistant tokens)")
    return tokenizer


def check_model_config(cfg: ModelConfig, storage: StorageConfig | None = None) -> None:
    """Cheap driver-side check that the checkpoint's config loads (weights load in the workers; an s3://
    checkpoint's small files only are fetched here)."""
    from transformers import AutoConfig

    base, _ = _dirs(cfg, storage, weights=False)
    try:
        AutoConfig.from_pretrained(str(base), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"cannot load model config from {cfg.path!r}: {type(e).__name__}: {e}") from e


def load_model(cfg: ModelConfig, storage: StorageConfig | None = None):
    """(model, tokenizer, device); weights frozen, eval mode. A PEFT adapter is merged into its base here,
    once per process (θ₀ = base + adapter), so scoring sees one plain model."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg, storage)
    base, adapter = _dirs(cfg, storage, weights=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(base),
            dtype=DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    except Exception as e:
        raise ModelLoadError(f"cannot load model from {cfg.path!r}: {type(e).__name__}: {e}") from e
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except Exception as e:
            raise ModelLoadError(f"cannot apply the PEFT adapter {cfg.path!r} to {str(base)!r}: "
                                 f"{type(e).__name__}: {e}") from e
    device = pick_device(cfg.device)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, device


def pad_id(tokenizer, model) -> int:
    """The id used for padding (its value never matters: padded positions are masked everywhere)."""
    for cand in (tokenizer.pad_token_id, getattr(model.config, "pad_token_id", None), tokenizer.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def check_weights(path: str) -> None:
    """Header-only check of the checkpoint's weight files on the driver. A truncated or corrupt
    safetensors file would otherwise fail only inside the scorer actors (an ActorDiedError after the
    workers start, tens of seconds later); its header is read through mmap, so this costs milliseconds
    at any checkpoint size. Limits: *.bin files are only checked to exist, and tensor shapes are not
    compared with config.json (a mismatch still fails in the actors, with the cause in the error)."""
    root = Path(path)
    st, bins = sorted(root.glob("*.safetensors")), sorted(root.glob("*.bin"))
    if not st and not bins:
        raise ModelLoadError(f"model.path {path!r} has no weight files (*.safetensors or *.bin)")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"model.path {path!r}: {index.name} is not a valid index ({e})") from None
        missing = sorted(f for f in shards if not (root / f).is_file())
        if missing:
            raise ModelLoadError(f"model.path {path!r}: shard(s) {missing} named in {index.name} are missing")
    from safetensors import safe_open

    for f in st:
        try:
            with safe_open(str(f), framework="numpy") as h:
                h.keys()
        except Exception as e:  # SafetensorError, OSError
            raise ModelLoadError(f"model.path {path!r}: {f.name} is not a valid safetensors file "
                                 f"({type(e).__name__}: {e})") from None
