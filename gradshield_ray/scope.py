"""Parameter scopes: which parameters of θ₀ the FIHS inner product runs over.

Scope is a first-class option because the best one depends on the model (PROTOTYPE_FINDINGS §B vs §C),
and because a scope that stops above layer j lets the backward pass stop there too.
"""
from __future__ import annotations

import re

import torch

from gradshield_ray.config import ScoreConfig
from gradshield_ray.loss import lm_parts


class ScopeError(ValueError):
    """The scope selects nothing, or does not fit this model."""


def decoder_layers(model) -> torch.nn.ModuleList:
    decoder, _ = lm_parts(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ScopeError(f"{type(decoder).__name__} has no `layers` ModuleList; use scope all/mlp/attn/regex")
    return layers


def _ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def wrap_lora(model, cfg: ScoreConfig):
    """Attach a fresh, seeded LoRA adapter (peft) so its parameters can form the scope."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.lora.seed)
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                      lora_dropout=0.0, bias="none")
    wrapped = get_peft_model(model, lcfg)
    wrapped.eval()
    return wrapped


def select_parameters(model, scope: str) -> dict[str, torch.nn.Parameter]:
    """name → parameter for a scope spec (tied weights appear once, under their first name)."""
    named = dict(model.named_parameters())
    if scope == "all":
        chosen = named
    elif scope == "lora":
        chosen = {n: p for n, p in named.items() if "lora_" in n}
    elif scope == "no_embed":
        emb = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        chosen = {n: p for n, p in named.items() if id(p) not in emb}
    elif scope in ("mlp", "attn") or scope.startswith("regex:"):
        pattern = {"mlp": r"(^|\.)mlp\.", "attn": r"(^|\.)(self_attn|attn|attention)\."}.get(scope, scope[6:])
        rx = re.compile(pattern)
        chosen = {n: p for n, p in named.items() if rx.search(n)}
    else:
        layers = decoder_layers(model)
        L = len(layers)
        if scope.startswith("last:"):
            k = int(scope[5:])
            if not 1 <= k <= L:
                raise ScopeError(f"scope {scope!r}: model has {L} layers")
            ids = set().union(*(_ids(m) for m in layers[L - k:]))
            norm = getattr(lm_parts(model)[0], "norm", None)
            if norm is not None:
                ids |= _ids(norm)
        else:  # layers:a-b
            a, b = (int(x) for x in scope[7:].split("-"))
            if not 0 <= a <= b < L:
                raise ScopeError(f"scope {scope!r}: layers must satisfy 0 <= a <= b < {L}")
            ids = set().union(*(_ids(m) for m in layers[a : b + 1]))
        chosen = {n: p for n, p in named.items() if id(p) in ids}
    if not chosen:
        raise ScopeError(f"scope {scope!r} selects no parameters of {type(model).__name__}")
    return chosen


def first_scoped_layer(model, params: dict[str, torch.nn.Parameter]) -> int | None:
    """Index of the lowest decoder layer holding a scoped parameter, when nothing below it is scoped
    (so gradients need not flow below it); None when the embeddings are in scope or layers are unknown."""
    try:
        layers = decoder_layers(model)
    except ScopeError:
        return None
    pids = {id(p) for p in params.values()}
    if id(model.get_input_embeddings().weight) in pids:
        return None
    for i, layer in enumerate(layers):
        if _ids(layer) & pids:
            return i
    return None
