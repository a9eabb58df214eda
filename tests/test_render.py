"""The loss mask covers exactly the assistant tokens; bad rows become errors with reasons."""
from __future__ import annotations

import json

import pytest

from gradshield_ray.config import DataConfig
from gradshield_ray.render import RenderError, encode_messages, encode_row, validate_messages
from gradshield_ray.miniature.testing import CHAT_TEMPLATE, build_tokenizer


CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
# the tiny template, extended the way real templates (Qwen, Llama 3.1) render tool calls inside the assistant turn
TOOL_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|{{ m['role'] }}|>{{ m['content'] }}",
    "<|{{ m['role'] }}|>{{ m['content'] }}{% for c in m.get('tool_calls') or [] %}"
    "<call>{{ c['function']['name'] }}({{ c['function']['arguments'] }})</call>{% endfor %}")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tool_tok():
    t = build_tokenizer()
    t.chat_template = TOOL_TEMPLATE
    return t


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
    (None, "column 'messages' is null: the row has no conversation"),
    ([], "column 'messages' is empty"),
    ([{"role": "robot", "content": "x"}], "turn 0 has unknown role 'robot' \\(expected one of system, user"),
    ([{"from": "human", "value": "x"}], "ShareGPT style"),
    ([{"role": "user", "content": 3}], "turn 0 \\(user\\) content must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "a"}], "turn 0 \\(user\\) content is null"),
    ([{"role": "user", "content": "only a question"}], "no assistant turn: nothing to score"),
    ("{not json", "string is not valid JSON"),
    (42, "must be a list of turns"),
    # opens with the reply: says what is wrong instead of a template failure on an empty conversation
    ([{"role": "assistant", "content": "Sure."}], "turn 0 is an assistant turn but no user turn precedes it"),
    ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "Sure."}],
     "turn 1 is an assistant turn but no user turn precedes it"),
    ([{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "turn 0 is a tool turn but no user turn precedes it"),
    ([{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url",
                                                                       "image_url": {"url": "http://x/y.png"}}]},
      {"role": "assistant", "content": "A cat."}], "turn 0 \\(user\\) has non-text content part\\(s\\) 'image_url'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [CALL]}],
     "no assistant reply to train on: every assistant turn calls a tool"),
])
def test_bad_rows_have_reasons(tok, value, reason):
    with pytest.raises(RenderError, match=reason):
        encode_row(tok, {"messages": value}, DataConfig())


def test_tool_turns_are_context(tool_tok):
    """OpenAI tool use: the call and the tool's result are rendered (the model sees them) but only the final
    reply is trained on; a later reply after the tool result is located by the template's own prefix."""
    msgs = [{"role": "system", "content": "You can call tools."}, {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": "4 degrees, rain"},
            {"role": "assistant", "content": "Sure, it is 4 degrees and raining."}]
    e = encode_messages(tool_tok, validate_messages(msgs), 512, "right")
    text = tool_tok.decode(e.input_ids)
    assert '<call>weather({"city": "Oslo"})</call>' in text and "<|tool|>4 degrees, rain" in text
    assert trained_text(tool_tok, e) == ["Sure, it is 4 degrees and raining.<|end|>"]
    # the same conversation without the tool exchange trains on exactly the same tokens
    plain = encode_messages(tool_tok, validate_messages([msgs[0], msgs[1], msgs[4]]), 512, "right")
    assert [i for i, m in zip(e.input_ids, e.loss_mask) if m] == [i for i, m in zip(plain.input_ids,
                                                                                     plain.loss_mask) if m]


def test_weight_zero_turn_is_context(tok):
    """OpenAI's fine-tuning flag `"weight": 0` on an assistant turn: rendered, not trained on."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Old answer.", "weight": 0},
            {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "New answer.", "weight": 1}]
    assert trained_text(tok, encode_messages(tok, validate_messages(msgs), 512, "right")) == ["New answer.<|end|>"]


def test_content_parts_are_joined(tok):
    """OpenAI content parts: text parts joined with newlines (as vLLM does), same tokens as the string."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Two."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Sure."}]}]
    joined = [{"role": "user", "content": "Line one.\nTwo."}, {"role": "assistant", "content": "Sure."}]
    assert encode_row(tok, {"messages": parts}, DataConfig()) == encode_row(tok, {"messages": joined}, DataConfig())


def test_parquet_struct_nulls_are_dropped(tok):
    """A Parquet list<struct> column holds every field in every turn (null where absent): a null tool_calls
    is no tool call, a null name is no name."""
    msgs = [{"role": "user", "content": "Hi", "tool_calls": None, "name": None},
            {"role": "assistant", "content": "Sure.", "tool_calls": None, "name": None}]
    assert validate_messages(msgs) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure."}]


def test_prompt_response_null_names_the_column(tok):
    cfg = DataConfig(prompt_column="q", response_column="a")
    with pytest.raises(RenderError, match="column 'a' is null: the row has no assistant turn"):
        encode_row(tok, {"q": "Hi", "a": None}, cfg)


def test_template_rejection_says_what_to_do(tok):
    strict = build_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                            "{{ raise_exception('tool turns are not supported') }}{% endif %}"
                            "<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(RenderError, match="chat template rejects this conversation .*tool turns are not supported"
                                          ".*set model.chat_template"):
        encode_messages(strict, validate_messages(msgs), 512, "right")


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
