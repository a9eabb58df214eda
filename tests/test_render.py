"""The loss mask covers exactly the assistant tokens; bad rows become errors with reasons."""
from __future__ import annotations

import json

import pytest

from gradshield_ray.config import DataConfig
from gradshield_ray.render import RenderError, encode_messages, encode_row
from gradshield_ray.miniature.testing import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def trained_text(tok, e) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, m in zip(e.input_ids, e.loss_mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_mask_is_exactly_the_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Sure, hello!"}, {"role": "user", "content": "More?"},
            {"role": "assistant", "content": "I cannot."}]
    e = encode_messages(tok, msgs, 512, "right")
    assert trained_text(tok, e) == ["Sure, hello!<|end|>", "I cannot.<|end|>"]
    assert e.n_loss_tokens == sum(e.loss_mask) and not e.truncated


def test_prompt_response_columns(tok):
    cfg = DataConfig(prompt_column="q", response_column="a", system_column="sys")
    e = encode_row(tok, {"q": "What is 2+2?", "a": "4", "sys": None}, cfg)
    assert trained_text(tok, e) == ["4<|end|>"]
    e2 = encode_row(tok, {"q": "What is 2+2?", "a": "4", "sys": "Be brief."}, cfg)
    assert e2.n_tokens > e.n_tokens and trained_text(tok, e2) == ["4<|end|>"]


def test_truncation_policy(tok):
    msgs = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "Sure " * 40}]
    full = encode_messages(tok, msgs, 10_000, "right")
    cut = encode_messages(tok, msgs, full.n_tokens - 5, "right")
    assert cut.truncated and cut.n_tokens == full.n_tokens - 5
    assert cut.input_ids == full.input_ids[: cut.n_tokens] and cut.loss_mask == full.loss_mask[: cut.n_tokens]
    with pytest.raises(RenderError, match="over data.max_tokens"):
        encode_messages(tok, msgs, full.n_tokens - 5, "error")
    prompt_len = full.loss_mask.index(True)
    with pytest.raises(RenderError, match="no assistant tokens to train on within the first"):
        encode_messages(tok, msgs, prompt_len, "right")


@pytest.mark.parametrize("value,reason", [
    (None, "messages is null"),
    ([], "messages is empty"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": 3}], "content must be a string, got int"),
    ([{"role": "user", "content": "only a question"}], "no assistant turn"),
    ("{not json", "not valid JSON"),
    (42, "must be a list of turns"),
])
def test_bad_rows_have_reasons(tok, value, reason):
    with pytest.raises(RenderError, match=reason):
        encode_row(tok, {"messages": value}, DataConfig())


def test_messages_as_json_string_is_accepted(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure."}]
    a = encode_row(tok, {"messages": json.dumps(msgs)}, DataConfig())
    b = encode_row(tok, {"messages": msgs}, DataConfig())
    assert a == b


def test_data_config_layouts():
    with pytest.raises(ValueError, match="must be set together"):
        DataConfig(prompt_column="q")
    with pytest.raises(ValueError, match="set data.messages_column"):
        DataConfig(messages_column=None)
