"""The safety proxy S(θ) and the reference direction v = ∇_scope S(θ₀).

S(θ) = mean over probe prompts x of [logit_θ(comply | x) − logit_θ(refuse | x)] at the first assistant
token, or of −logit_θ(refuse | x) alone (proxy.comply: null, the refusal-only proxy). Higher S = more
willing to comply with harmful requests. v is computed once per run.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from gradshield_ray.batching import collate
from gradshield_ray.config import ProxyConfig
from gradshield_ray.loss import last_token_logits
from gradshield_ray.render import Encoded, RenderError, _render


class ProxyError(ValueError):
    """The probe set or the comply/refuse strings cannot define the proxy."""


def default_probe_path() -> Path:
    return Path(str(resources.files("gradshield_ray") / "data" / "probes" / "harmbench_val_standard.jsonl"))


def load_probes(cfg: ProxyConfig) -> list[str]:
    """Probe prompts from .txt (one per line) or .jsonl ({"prompt": ...}); default: HarmBench val standard."""
    path = Path(cfg.probes) if cfg.probes else default_probe_path()
    if not path.is_file():
        raise ProxyError(f"probe file {str(path)!r} does not exist")
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if path.suffix == ".jsonl":
        try:
            prompts = [json.loads(x).get("prompt") for x in lines]
        except (json.JSONDecodeError, AttributeError) as e:
            raise ProxyError(f"probe file {path}: each line must be a JSON object with a 'prompt'") from e
    else:
        prompts = lines
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise ProxyError(f"probe file {path} has no usable prompts")
    return prompts[: cfg.max_probes] if cfg.max_probes else prompts


def probe_texts(tokenizer, prompts: list[str], system: str | None = None) -> list[str]:
    """Each probe rendered with the chat template up to the start of the assistant turn, optionally under a
    system prompt (benchmarks measure the proxy under a persona's system prompt)."""
    head = [{"role": "system", "content": system}] if system else []
    return [_render(tokenizer, head + [{"role": "user", "content": p}], True) for p in prompts]


def probe_prefixes(tokenizer, prompts: list[str], system: str | None = None) -> list[list[int]]:
    """Token ids of each probe rendered up to the start of the assistant turn (see probe_texts)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in probe_texts(tokenizer, prompts, system)]


def resolve_token(tokenizer, prompts: list[str], s: str, what: str) -> int:
    """The id of `s` as the first assistant token, resolved in context (leading-space variants differ
    between tokenizers); fails unless `s` is exactly one token right after the assistant prefix."""
    try:
        prefixes = probe_texts(tokenizer, prompts)
    except RenderError as e:
        raise ProxyError(f"cannot render probe: {e}") from None
    ids = set()
    for prefix in prefixes:
        base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full = tokenizer(prefix + s, add_special_tokens=False)["input_ids"]
        extra = full[len(base):]
        if full[: len(base)] != base or len(extra) != 1:
            pieces = tokenizer.convert_ids_to_tokens(extra if full[: len(base)] == base else full[-4:])
            raise ProxyError(
                f"proxy.{what} {s!r} is not a single token at the start of the assistant turn "
                f"(it encodes to {pieces}); choose a string the tokenizer keeps whole"
            )
        ids.add(extra[0])
    if len(ids) != 1:
        raise ProxyError(f"proxy.{what} {s!r} resolves to different tokens across probes: {sorted(ids)}")
    return ids.pop()


def resolve_pair(tokenizer, prompts: list[str], cfg: ProxyConfig) -> tuple[int | None, int]:
    """(comply id or None for the refusal-only proxy, refuse id), distinct, single tokens at the start of
    the assistant turn."""
    c = resolve_token(tokenizer, prompts, cfg.comply, "comply") if cfg.comply is not None else None
    r = resolve_token(tokenizer, prompts, cfg.refuse, "refuse")
    if c == r:
        raise ProxyError(f"proxy.comply {cfg.comply!r} and proxy.refuse {cfg.refuse!r} resolve to the same token")
    return c, r


def first_token_gradient(model, params: dict[str, torch.nn.Parameter], prefixes: list[list[int]], fn, pad: int,
                         device: torch.device, batch_size: int = 8) -> tuple[dict[str, torch.Tensor], float]:
    """(∇ mean_x fn(logits at x's first assistant token), that mean) over `params`, in float32, accumulated
    over prefix chunks. `fn` maps [B, V] logits to [B] values; the proxy S is one such function."""
    names, plist = list(params), list(params.values())
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in plist]
    total = 0.0
    for p in plist:
        p.requires_grad_(True)
    try:
        for i in range(0, len(prefixes), batch_size):
            enc = [Encoded(ids, [False] * len(ids), False) for ids in prefixes[i : i + batch_size]]
            s = fn(last_token_logits(model, collate(enc, pad, "right").to(device))).sum() / len(prefixes)
            for a, g in zip(acc, torch.autograd.grad(s, plist, allow_unused=True)):
                if g is not None:
                    a += g.float()
            total += float(s.detach())
    finally:
        for p in plist:
            p.requires_grad_(False)
    return dict(zip(names, acc)), total


def reference_direction(model, params: dict[str, torch.nn.Parameter], prefixes: list[list[int]],
                        comply_id: int | None, refuse_id: int, pad: int, device: torch.device,
                        batch_size: int = 8) -> tuple[dict[str, torch.Tensor], float]:
    """(v, S(θ₀)): v = ∇S over `params`, S = mean logit(comply) − logit(refuse) at the first assistant token
    (−logit(refuse) when comply_id is None)."""
    def s(lg: torch.Tensor) -> torch.Tensor:
        return -lg[:, refuse_id] if comply_id is None else lg[:, comply_id] - lg[:, refuse_id]

    return first_token_gradient(model, params, prefixes, s, pad, device, batch_size)
