"""Rows → chat messages → token ids with a loss mask over exactly the assistant tokens.

The mask comes from the chat template itself: for assistant turn k, the span between
render(messages[:k], add_generation_prompt=True) and render(messages[:k+1]) is what the model
must generate (the content plus the template's end-of-turn marker), which is what a finetuning
trainer with an assistant-only loss trains on. Any row that cannot be rendered becomes an
error with a reason; nothing is dropped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keeps the math importable with torch + transformers alone (the GPU benchmark box)
    from gradshield_ray.config import DataConfig

ROLES = ("system", "user", "assistant")


class RenderError(ValueError):
    """A row that cannot be turned into a training example; the message is the row's error reason."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: loss_mask[t] is True where token t is a trained assistant token."""

    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        # token 0 is never predicted, so it cannot carry loss
        return sum(self.loss_mask[1:])

    def opening(self, k: int) -> "Encoded":
        """The row as scored with `score.answer_tokens=k`: the loss keeps only the first k tokens of each
        assistant turn, and the tokens after the last one kept are cut (in a causal LM they cannot change
        the loss, so the cut is exact and saves their compute). Why: FIHS measures the pull on the safety
        proxy, which is decided at the opening of an answer ("Sure" vs "I"); averaged over a long answer
        that signal is diluted by the content tokens (docs/efficacy.md)."""
        mask, run, last = list(self.loss_mask), 0, -1
        for t, m in enumerate(mask):
            if not m:
                run = 0
                continue
            run += 1
            if run > k:
                mask[t] = False
            else:
                last = t
        if last < 1:
            return self
        return Encoded(self.input_ids[: last + 1], mask[: last + 1], self.truncated)


def required_columns(cfg: DataConfig) -> list[str]:
    """The input columns a data layout reads (used to fail fast on a missing column)."""
    if cfg.messages_column:
        return [cfg.messages_column]
    cols = [cfg.prompt_column, cfg.response_column]
    return [c for c in cols if c] + ([cfg.system_column] if cfg.system_column else [])


def row_messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    """The chat turns of one row, validated: roles known, contents strings, an assistant turn present."""
    if cfg.messages_column:
        msgs = row.get(cfg.messages_column)
        if isinstance(msgs, str):  # messages stored as a JSON string: accepted, documented
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as e:
                raise RenderError(f"{cfg.messages_column}: string is not valid JSON ({e.msg})") from None
    else:
        prompt, response = row.get(cfg.prompt_column), row.get(cfg.response_column)
        msgs = []
        if cfg.system_column and row.get(cfg.system_column) is not None:
            msgs.append({"role": "system", "content": row.get(cfg.system_column)})
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return validate_messages(msgs)


def validate_messages(msgs: Any) -> list[dict[str, str]]:
    """Check the chat-turn structure and return it as plain dicts."""
    if msgs is None:
        raise RenderError("messages is null")
    if not isinstance(msgs, (list, tuple)) or len(msgs) == 0:
        raise RenderError("messages is empty" if isinstance(msgs, (list, tuple)) else
                          f"messages must be a list of turns, got {type(msgs).__name__}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RenderError(f"turn {i} is not a mapping with role/content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RenderError(f"turn {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise RenderError(f"turn {i} content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RenderError("no assistant turn")
    return out


def _render(tokenizer, msgs: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises arbitrary exception types (e.g. "roles must alternate")
        raise RenderError(f"chat template failed: {type(e).__name__}: {e}") from None


def assistant_spans(tokenizer, msgs: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans that the assistant generates."""
    full = _render(tokenizer, msgs, False)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, msgs[:k], True)
        upto = _render(tokenizer, msgs[: k + 1], False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise RenderError("chat template is not prefix-consistent; cannot locate assistant tokens")
        spans.append((len(prefix), len(upto)))
    return full, spans


def encode_messages(tokenizer, msgs: list[dict[str, str]], max_tokens: int, truncation: str) -> Encoded:
    """Tokenize a conversation and mark the assistant tokens; apply the truncation policy."""
    text, spans = assistant_spans(tokenizer, msgs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [any(a <= s < b for a, b in spans) for s, _ in offsets]
    truncated = len(ids) > max_tokens
    if truncated:
        if truncation == "error":
            raise RenderError(f"row has {len(ids)} tokens, over data.max_tokens={max_tokens}")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    e = Encoded(list(ids), mask, truncated)
    if e.n_loss_tokens == 0:
        where = f" within the first {max_tokens} tokens" if truncated else ""
        raise RenderError(f"no assistant tokens to train on{where}")
    return e


def encode_row(tokenizer, row: dict[str, Any], cfg: DataConfig) -> Encoded:
    """Row → Encoded, or RenderError with the reason."""
    return encode_messages(tokenizer, row_messages(row, cfg), cfg.max_tokens, cfg.truncation)
