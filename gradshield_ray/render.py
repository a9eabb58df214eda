"""Rows → chat messages → token ids with a loss mask over exactly the assistant tokens.

The mask comes from the chat template itself: for assistant turn k, the span between
render(messages[:k], add_generation_prompt=True) and render(messages[:k+1]) is what the model
must generate (the content plus the template's end-of-turn marker), which is what a finetuning
trainer with an assistant-only loss trains on. Rows are OpenAI chat format: tool results and
assistant tool calls are context, content may be a list of text parts. Any row that cannot be rendered
becomes an error whose reason says what is wrong with it; nothing is dropped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keeps the math importable with torch + transformers alone (the GPU benchmark box)
    from gradshield_ray.config import DataConfig

ROLES = ("system", "user", "assistant", "tool")


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


def row_messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, Any]]:
    """The chat turns of one row, validated (see validate_messages)."""
    if cfg.messages_column:
        msgs = row.get(cfg.messages_column)
        if isinstance(msgs, str):  # messages stored as a JSON string: accepted, documented
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as e:
                raise RenderError(f"column {cfg.messages_column!r}: string is not valid JSON ({e.msg} at "
                                  f"char {e.pos}); store the turns as a list or as a JSON array string") from None
        return validate_messages(msgs, cfg.messages_column)
    msgs = []
    if cfg.system_column and row.get(cfg.system_column) is not None:
        msgs.append({"role": "system", "content": row.get(cfg.system_column)})
    for col, role in ((cfg.prompt_column, "user"), (cfg.response_column, "assistant")):
        if row.get(col) is None:
            raise RenderError(f"column {col!r} is null: the row has no {role} turn; fill it or drop the row")
        msgs.append({"role": role, "content": row.get(col)})
    return validate_messages(msgs)


def _text(content: Any, where: str) -> str:
    """A turn's content as one string: a string as is; OpenAI content parts (a list of {"type": "text",
    "text": ...}) joined with newlines, as vLLM and OpenAI-compatible servers do. Non-text parts (images,
    audio, files) are an error that names them: this model scores text only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise RenderError(f"{where} content must be a string or a list of text parts, got "
                          f"{type(content).__name__}")
    texts, other = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "text":
            raise RenderError(f"{where} content part {j} has type 'text' but no string 'text' field")
        else:
            other.append(repr(kind) if kind is not None else f"{type(part).__name__} without a 'type'")
    if other:
        raise RenderError(f"{where} has non-text content part(s) {', '.join(other)}: only text is scored; "
                          "remove those parts or drop the row")
    return "\n".join(texts)


def validate_messages(msgs: Any, column: str = "messages") -> list[dict[str, Any]]:
    """Check the chat-turn structure (OpenAI chat format) and return it as plain dicts.

    Roles are system, user, assistant and tool. `tool` turns (tool results) and assistant turns that call
    tools (`tool_calls`) or carry OpenAI's `"weight": 0` are context: they are rendered but not trained
    on, so the loss covers only the replies a trainer would train on (see trained_turns). Fields beyond
    role/content (tool_calls, tool_call_id, name) are passed to the chat template; null ones are dropped
    (a Parquet struct column holds every field for every turn)."""
    if msgs is None:
        raise RenderError(f"column {column!r} is null: the row has no conversation")
    if not isinstance(msgs, (list, tuple)):
        raise RenderError(f"column {column!r} must be a list of turns ({{role, content}}), got "
                          f"{type(msgs).__name__}")
    if len(msgs) == 0:
        raise RenderError(f"column {column!r} is empty: the row has no turns")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RenderError(f"turn {i} is not a mapping with role/content (got {type(m).__name__})")
        role = m.get("role")
        if role is None and {"from", "value"} <= set(m):
            raise RenderError(f"turn {i} has 'from'/'value' keys (ShareGPT style); convert turns to "
                              "{role, content} with roles system/user/assistant/tool")
        if role not in ROLES:
            raise RenderError(f"turn {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        where = f"turn {i} ({role})"
        extra = {k: v for k, v in m.items() if k not in ("role", "content") and v is not None}
        content = m.get("content")
        if content is None and not (role == "assistant" and extra.get("tool_calls")):
            raise RenderError(f"{where} content is null; only an assistant turn with tool_calls may omit it")
        out.append({"role": role, "content": "" if content is None else _text(content, where), **extra})
    first = next((i for i, m in enumerate(out) if m["role"] != "system"), None)
    if first is not None and out[first]["role"] != "user":
        raise RenderError(f"turn {first} is a{'n' if out[first]['role'] == 'assistant' else ''} "
                          f"{out[first]['role']} turn but no user turn precedes it: a conversation must open "
                          "with a user turn (after optional system turns); add the prompt it answers")
    if not any(m["role"] == "assistant" for m in out):
        raise RenderError("no assistant turn: nothing to score (FIHS scores the replies a model is trained on)")
    if not trained_turns(out):
        raise RenderError("no assistant reply to train on: every assistant turn calls a tool or has weight 0, "
                          "and those are context, not loss")
    return out


def trained_turns(msgs: list[dict[str, Any]]) -> list[int]:
    """Indices of the turns in the loss: assistant replies, not tool calls, not weight 0 (OpenAI's flag
    for an assistant turn not to train on). What the assistant generates as a reply is what a finetuning
    trainer with an assistant-only loss trains on; tool results and earlier tool calls are its context."""
    return [k for k, m in enumerate(msgs) if m["role"] == "assistant" and not m.get("tool_calls")
            and m.get("weight", 1) != 0]


def _render(tokenizer, msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises arbitrary exception types (e.g. "roles must alternate")
        raise RenderError(f"the model's chat template rejects this conversation ({type(e).__name__}: {e}); "
                          "fix the row's turn structure, or set model.chat_template") from None


def assistant_spans(tokenizer, msgs: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans that the assistant generates."""
    full = _render(tokenizer, msgs, False)
    spans = []
    for k in trained_turns(msgs):
        prefix = _render(tokenizer, msgs[:k], True)
        upto = _render(tokenizer, msgs[: k + 1], False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise RenderError("the chat template renders an earlier turn differently once later turns follow it "
                              "(e.g. it drops reasoning from past replies), so the trained tokens cannot be "
                              "located; set model.chat_template to a prefix-consistent template")
        spans.append((len(prefix), len(upto)))
    return full, spans


def encode_messages(tokenizer, msgs: list[dict[str, Any]], max_tokens: int, truncation: str) -> Encoded:
    """Tokenize a conversation and mark the assistant tokens; apply the truncation policy."""
    text, spans = assistant_spans(tokenizer, msgs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [any(a <= s < b for a, b in spans) for s, _ in offsets]
    truncated = len(ids) > max_tokens
    if truncated:
        if truncation == "error":
            raise RenderError(f"row has {len(ids)} tokens, over data.max_tokens={max_tokens} (data.truncation="
                              "error); raise data.max_tokens or set data.truncation=right to cut it")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    e = Encoded(list(ids), mask, truncated)
    if e.n_loss_tokens == 0:
        where = f" within the first {max_tokens} tokens" if truncated else ""
        raise RenderError(f"no assistant tokens to train on{where}" + (
            ": the prompt fills the budget; raise data.max_tokens" if truncated else ""))
    return e


def encode_row(tokenizer, row: dict[str, Any], cfg: DataConfig) -> Encoded:
    """Row → Encoded, or RenderError with the reason."""
    return encode_messages(tokenizer, row_messages(row, cfg), cfg.max_tokens, cfg.truncation)
