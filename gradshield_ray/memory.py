"""How many rows fit in one scoring micro-batch: a byte estimate from the model config, and a byte budget.

Why: a token budget alone ignores what a token costs. On Gemma-3-270M (hidden 640, 18 layers, a 262k
vocabulary) the default token budget put 16 rows of 1,024 tokens in one micro-batch: before the LM head was
chunked (loss.py) their fp32 logits were up to 16 GiB per copy, and the decoder activations kept for the
backward are 1–2 GiB per such row (benchmarks/memory.py), so the process was OOM-killed. The estimate
counts, per padded position and decoder layer, the tensors a backward through the whole decoder keeps (norm
inputs, attention projections, the MLP's intermediate activations, the hooks' inputs), the eager/math
attention's [heads, T, T] probabilities per row and layer, and the head chunks (a fixed cost per micro-batch
now that the head is chunked). The constants are an upper bound of the peaks measured on Gemma-3-270M (1 and 2
rows of 1,024 tokens; README, Performance), not measured on other architectures. On a GPU the scorer also
backs off on torch.OutOfMemoryError by halving the micro-batch, which a CPU cannot do (the kernel kills the
process instead), so there the estimate is the only guard.
"""
from __future__ import annotations

import math

import torch

from gradshield_ray import loss

# floats kept per padded position per decoder layer, per unit of: hidden size, q width (heads × head_dim),
# MLP intermediate size; and floats per row per layer per unit of heads × T² (the attention probabilities)
PER_HIDDEN, PER_Q, PER_INTERMEDIATE, PER_ATTENTION = 12, 4, 4, 2
HEAD_CHUNK_COPIES = 6  # logits, soft-cap, log-softmax and their gradients of one chunk, at the backward's peak
SLACK = 1.5  # allocator fragmentation, transient buffers and first-pass costs on top of the counted tensors


def _dims(config) -> tuple[int, int, int, int, int, int]:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    H = c.hidden_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or H // heads
    inter = getattr(c, "intermediate_size", None) or 4 * H
    return H, heads, head_dim, inter, c.num_hidden_layers, c.vocab_size


def activation_bytes(config, dtype: torch.dtype, rows: int, tokens: int, method: str = "hooks",
                     scope_params: int = 0, head_norms: bool = False) -> int:
    """Estimated peak bytes of one micro-batch of `rows` rows padded to `tokens` positions, beyond the
    model and v. jvp keeps no activations for a backward (about two layers' worth live at a time);
    vmap materializes every row's full logits and its own per-row gradient over the scope; head_norms
    (cosine with the LM head in scope, hooks method) keeps every head chunk's logit gradient until the
    norm's cross terms between chunks are summed."""
    H, heads, head_dim, inter, layers, vocab = _dims(config)
    el = torch.finfo(dtype).bits // 8
    per_token_layer = (PER_HIDDEN * H + PER_Q * heads * head_dim + PER_INTERMEDIATE * inter) * el
    attention = PER_ATTENTION * heads * tokens * tokens * 4  # softmax runs in fp32
    depth = 2 if method == "jvp" else layers
    per_row = depth * (tokens * per_token_layer + attention)
    if method == "vmap":
        per_row += 4 * tokens * vocab * 4 + 2 * scope_params * 4
    if head_norms:
        per_row += tokens * vocab * 4
    head = HEAD_CHUNK_COPIES * loss.LOGITS_CHUNK_BYTES
    return int(SLACK * (rows * per_row + head))


def rows_that_fit(config, dtype: torch.dtype, budget_bytes: int, tokens: int, method: str = "hooks",
                  scope_params: int = 0, head_norms: bool = False) -> int:
    """The most rows of `tokens` padded positions whose estimate stays within the budget (at least 1: a
    row is never split, so a row over the budget runs alone)."""
    one = activation_bytes(config, dtype, 1, tokens, method, scope_params, head_norms)
    fixed = activation_bytes(config, dtype, 0, tokens, method, scope_params, head_norms)
    return max(1, math.floor((budget_bytes - fixed) / max(one - fixed, 1)))


def default_budget_bytes(device: torch.device) -> int:
    """score.memory_budget_mb when unset: 70% of the GPU's free memory after the model and v are loaded;
    on a CPU, a quarter of the memory available now, at most 4 GiB (CPUs gain little from larger batches
    once a row is hundreds of tokens, and a host is usually shared; an OOM there kills the process)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.7 * free)
    return int(min(4 * 2**30, 0.25 * _available_bytes()))


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * 2**30  # no /proc (macOS): assume a 16 GiB host
