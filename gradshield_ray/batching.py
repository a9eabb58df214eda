"""Pad encoded examples into batches, and cut token-budget micro-batches from length-sorted rows."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradshield_ray.render import Encoded

IGNORE = -100


@dataclass
class Batch:
    """A padded batch. labels[b, t] is the target predicted from position t (IGNORE where untrained)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.labels)))

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


def collate(examples: list[Encoded], pad_id: int, padding_side: str = "right") -> Batch:
    """Pad to the longest example. Position ids count real tokens only, so left and right padding give
    the same positions (and the same scores) for every example."""
    T = max(e.n_tokens for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = e.n_tokens
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[b, sl] = torch.tensor(e.input_ids)
        attn[b, sl] = 1
        tgt = torch.tensor(e.input_ids[1:])
        keep = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
        lab = torch.where(keep, tgt, torch.full_like(tgt, IGNORE))
        start = sl.start
        labels[b, start : start + n - 1] = lab
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    return Batch(ids, attn, position_ids, labels)


def micro_batches(lengths: list[int], token_budget: int, max_batch_size: int,
                  max_padding: float = 1.0, max_rows: Callable[[int], int] | None = None) -> list[list[int]]:
    """Group row indices into micro-batches: sorted by length, each with batch_size × longest ≤
    token_budget (a row longer than the budget goes alone), batch_size ≤ max_rows(longest) (the rows of
    that padded length that fit the memory budget; memory.rows_that_fit) and padded positions ≤ max_padding
    of the batch (a new batch starts when the next, longer row would pad the shorter ones past it)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        longest = lengths[i]  # ascending order: the newcomer is the longest
        n = len(cur) + 1
        if cur and (n * longest > token_budget or len(cur) >= max_batch_size
                    or (max_rows is not None and n > max_rows(longest))
                    or 1 - (real + longest) / (n * longest) > max_padding):
            out.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += longest
    if cur:
        out.append(cur)
    return out
