"""The per-example training loss L(z; θ): mean cross-entropy over the assistant tokens of each row.

The decoder runs once on the padded batch; the LM head runs only at the positions that carry loss
(packed per row), which is where most of a causal LM's FLOPs and memory go for long prompts.

The head's logits ([rows, positions, vocab], fp32) are never materialised whole: the packed positions are
cut into chunks of at most LOGITS_CHUNK_BYTES of logits, and each chunk's head + soft-cap + cross-entropy
runs under activation checkpointing, so its logits are freed after the forward and recomputed, one chunk
at a time, in the backward (the chunked linear cross-entropy of Liger Kernel / Cut Cross-Entropy, in plain
torch: both need triton, which has no CPU backend). The head is still called as a module on [rows, chunk,
hidden], so the hooks method's per-row contraction with v sees every chunk, and the result is the same
loss to rounding (chunks only regroup the rows of the GEMM).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gradshield_ray.batching import IGNORE, Batch


def lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder, lm_head) of a HF causal LM, also through a peft wrapper."""
    return model.get_decoder(), model.get_output_embeddings()


def _head_logits(model, lm_head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    logits = lm_head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return at_least_fp32(logits)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits go to fp32 for the softmax; fp64 stays fp64 (the exactness tests run there)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def hidden_states(model, batch: Batch) -> torch.Tensor:
    decoder, _ = lm_parts(model)
    out = decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


LOGITS_CHUNK_BYTES = 64 * 2**20  # fp32 logits per head chunk (Gemma's 262k vocabulary: 64 positions)


def logits_chunk_positions(rows: int, vocab: int) -> int:
    """Positions per row in one head chunk: rows × positions × vocab fp32 logits ≤ LOGITS_CHUNK_BYTES."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab * max(rows, 1)))


def _chunk_ce(model, lm_head: torch.nn.Module, h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    logits = _head_logits(model, lm_head, h)
    return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE,
                           reduction="none").view(tgt.shape)


def per_example_loss(model, batch: Batch) -> torch.Tensor:
    """[B] mean CE over each row's trained tokens. Rows never interact, so ∂(Σ_b L_b)/∂out_b = ∂L_b/∂out_b."""
    hidden = hidden_states(model, batch)
    _, lm_head = lm_parts(model)
    sel = batch.labels != IGNORE
    counts = sel.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("a row in the batch has no trained tokens")
    R = int(counts.max())
    order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :R]
    valid = torch.arange(R, device=sel.device)[None, :] < counts[:, None]
    h = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    tgt = batch.labels.gather(1, order).masked_fill(~valid, IGNORE)
    step = logits_chunk_positions(h.shape[0], model.config.vocab_size)
    # checkpoint only where a backward will follow; forward-mode (jvp) frees each chunk as it goes
    recompute = torch.is_grad_enabled() and R > step
    parts = []
    for s in range(0, R, step):
        args = (model, lm_head, h[:, s:s + step], tgt[:, s:s + step])
        parts.append(checkpoint(_chunk_ce, *args, use_reentrant=False) if recompute else _chunk_ce(*args))
    return torch.cat(parts, 1).sum(1) / counts


def reference_loss(model, batch: Batch) -> torch.Tensor:
    """[B] the same loss from the model's own full forward (all logits); used to verify per_example_loss."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    ce = F.cross_entropy(at_least_fp32(logits).transpose(1, 2), batch.labels, ignore_index=IGNORE, reduction="none")
    return ce.sum(1) / (batch.labels != IGNORE).sum(1)


def last_token_logits(model, batch: Batch) -> torch.Tensor:
    """[B, V] logits at each row's last real token (the first assistant token's prediction)."""
    hidden = hidden_states(model, batch)
    _, lm_head = lm_parts(model)
    T = batch.attention_mask.shape[1]
    last = T - 1 - torch.argmax(batch.attention_mask.flip(1), dim=1)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return _head_logits(model, lm_head, h)
