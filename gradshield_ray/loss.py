"""The per-example training loss L(z; θ): mean cross-entropy over the assistant tokens of each row.

The decoder runs once on the padded batch; the LM head runs only at the positions that carry loss
(packed per row), which is where most of a causal LM's FLOPs and memory go for long prompts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gradshield_ray.batching import IGNORE, Batch


def lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder, lm_head) of a HF causal LM, also through a peft wrapper."""
    return model.get_decoder(), model.get_output_embeddings()


def _head_logits(model, lm_head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    logits = lm_head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def hidden_states(model, batch: Batch) -> torch.Tensor:
    decoder, _ = lm_parts(model)
    out = decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


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
    logits = _head_logits(model, lm_head, h)
    ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE, reduction="none")
    return ce.view(tgt.shape).sum(1) / counts


def reference_loss(model, batch: Batch) -> torch.Tensor:
    """[B] the same loss from the model's own full forward (all logits); used to verify per_example_loss."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
        use_cache=False,
    ).logits.float()
    ce = F.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=IGNORE, reduction="none")
    return ce.sum(1) / (batch.labels != IGNORE).sum(1)


def last_token_logits(model, batch: Batch) -> torch.Tensor:
    """[B, V] logits at each row's last real token (the first assistant token's prediction)."""
    hidden = hidden_states(model, batch)
    _, lm_head = lm_parts(model)
    T = batch.attention_mask.shape[1]
    last = T - 1 - torch.argmax(batch.attention_mask.flip(1), dim=1)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return _head_logits(model, lm_head, h)
