"""JSONL input: one row per line, row id = file:line, malformed lines kept as error rows with their reason."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from gradshield_ray.config import DataConfig
from gradshield_ray.jsonl import JsonlFileError, count_rows, is_jsonl, read_file
from gradshield_ray.miniature.testing import build_tokenizer
from gradshield_ray.tables import JSON_ERROR, RAW_LINE, ROW_ID, render_table

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure."}]
PARTS = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Sure."}]}]
TOOLS = [{"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "rain"},
         {"role": "assistant", "content": "It rains."}]

LINES = [
    json.dumps({"messages": CHAT, "source": "a"}),           # line 1: scored
    "",                                                         # line 2: blank, not a row
    '{"messages": [{"role": "user", "content": "unterminated',  # line 3: not JSON
    json.dumps({"messages": PARTS, "source": "b"}),          # line 4: content parts (another type of content)
    json.dumps([1, 2]),                                         # line 5: JSON, not an object
    json.dumps({"messages": TOOLS}),                            # line 6: tool turns
    json.dumps({"source": "no messages"}),                      # line 7: no messages key
    "[",                                                        # line 8: a JSON array file, not JSON lines
]
EXPECT = {  # row id → None (scored) or a substring of its reason
    "d/x.jsonl:1": None,
    "d/x.jsonl:3": "d/x.jsonl line 3: not valid JSON (Unterminated string",
    "d/x.jsonl:4": None,
    "d/x.jsonl:5": "d/x.jsonl line 5: a JSON list, not an object",
    "d/x.jsonl:6": None,
    "d/x.jsonl:7": "column 'messages' is null",
    "d/x.jsonl:8": "looks like one JSON array",
}


def write(path, lines, gz=False):
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


@pytest.mark.parametrize("name,gz", [("x.jsonl", False), ("x.json", False), ("x.jsonl.gz", True),
                                     ("x.json.gz", True)])
def test_every_line_is_one_row(tmp_path, name, gz):
    path = write(tmp_path / name, LINES, gz)
    assert is_jsonl(path)
    t = read_file(pafs.LocalFileSystem(), path, "d/x.jsonl", required=["messages"])
    assert t[ROW_ID].to_pylist() == list(EXPECT)
    assert count_rows(pafs.LocalFileSystem(), path, "d/x.jsonl") == t.num_rows  # the runner's unit size
    errs = dict(zip(t[ROW_ID].to_pylist(), t[JSON_ERROR].to_pylist()))
    raws = dict(zip(t[ROW_ID].to_pylist(), t[RAW_LINE].to_pylist()))
    for rid, line in (("d/x.jsonl:3", LINES[2]), ("d/x.jsonl:5", LINES[4]), ("d/x.jsonl:8", LINES[7])):
        assert errs[rid] and raws[rid] == line.encode()  # the exact bytes are kept
    assert all(errs[r] is None and raws[r] is None for r in ("d/x.jsonl:1", "d/x.jsonl:4", "d/x.jsonl:6"))
    # content is a string in some lines and a list of parts in others: no common Arrow type → JSON text
    assert t.schema.field("messages").type == pa.string()
    assert t["source"].to_pylist() == ["a", None, "b", None, None, "no messages", None]


def test_rendered_rows_conserved_with_reasons(tmp_path):
    """Through the renderer: every line is rendered or an error row whose reason says what is wrong."""
    t = read_file(pafs.LocalFileSystem(), write(tmp_path / "x.jsonl", LINES), "d/x.jsonl", required=["messages"])
    out = render_table(build_tokenizer(), t, DataConfig())
    assert out.num_rows == len(EXPECT)
    got = dict(zip(out[ROW_ID].to_pylist(), out["gs_error"].to_pylist()))
    for rid, reason in EXPECT.items():
        if reason is None:
            assert got[rid] is None, (rid, got[rid])
        else:
            assert got[rid] and reason in got[rid], (rid, got[rid])
    ids = dict(zip(out[ROW_ID].to_pylist(), out["gs_input_ids"].to_pylist()))
    assert ids["d/x.jsonl:1"] == ids["d/x.jsonl:4"]  # parts joined: same tokens as the plain string


def test_uniform_file_keeps_arrow_types(tmp_path):
    t = read_file(pafs.LocalFileSystem(), write(tmp_path / "u.jsonl", [json.dumps({"messages": CHAT, "n": i})
                                                                      for i in range(3)]), "u.jsonl")
    assert t.schema.field("n").type == pa.int64() and pa.types.is_list(t.schema.field("messages").type)
    assert t[ROW_ID].to_pylist() == ["u.jsonl:1", "u.jsonl:2", "u.jsonl:3"]


def test_invalid_utf8_line_is_an_error_row(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(json.dumps({"messages": CHAT}).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    t = read_file(pafs.LocalFileSystem(), str(p), "b.jsonl")
    assert t[JSON_ERROR].to_pylist()[0] is None
    assert "b.jsonl line 2: not valid UTF-8" in t[JSON_ERROR].to_pylist()[1]
    assert t[RAW_LINE].to_pylist()[1] == b'{"messages": "caf\xe9"}'


def test_corrupt_gzip_fails_the_file(tmp_path):
    p = tmp_path / "c.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"messages": []}\n' * 100)[:40])
    with pytest.raises(JsonlFileError, match="c.jsonl.gz"):
        read_file(pafs.LocalFileSystem(), str(p), "c.jsonl.gz")


def test_key_clashing_with_our_columns_fails(tmp_path):
    p = write(tmp_path / "k.jsonl", [json.dumps({"messages": CHAT, "gs_row_id": "x"})])
    with pytest.raises(JsonlFileError, match="clash"):
        read_file(pafs.LocalFileSystem(), p, "k.jsonl")


def test_local_runner_reads_jsonl(tmp_path, tiny_model_dir):
    """`gradshield-ray filter` on JSONL (plain and gzip, beside Parquet): every line kept, removed or an error
    row with its reason; outputs named <file>.parquet; ids file:line."""
    import pyarrow.parquet as pq

    from gradshield_ray import local
    from gradshield_ray.config import GradShieldConfig

    d = tmp_path / "in"
    d.mkdir()
    write(d / "x.jsonl", LINES)
    write(d / "y.jsonl.gz", LINES[:1], gz=True)
    rep = local.run_filter(GradShieldConfig.model_validate(
        {"input": str(d), "output": str(tmp_path / "o"), "model": {"path": tiny_model_dir},
         "proxy": {"max_probes": 2}, "score": {"verify_rows": 0}, "threshold": {"policy": "keep_all"}}))
    assert rep["counts"] == {"input": 8, "kept": 4, "removed": 0, "errors": 4}
    rows = {r[ROW_ID]: r for k in ("kept", "errors") for f in sorted((tmp_path / "o" / k).rglob("*.parquet"))
            for r in pq.read_table(f).to_pylist()}
    assert sorted((tmp_path / "o" / "kept").rglob("*.parquet")) == [tmp_path / "o" / "kept" / "x.jsonl.parquet",
                                                                  tmp_path / "o" / "kept" / "y.jsonl.gz.parquet"]
    expect = {k.replace("d/x.jsonl", "x.jsonl"): v for k, v in EXPECT.items()} | {"y.jsonl.gz:1": None}
    assert set(rows) == set(expect)
    for rid, reason in expect.items():
        assert (rows[rid]["gs_error"] is None) if reason is None else (reason.replace("d/x", "x") in rows[rid]["gs_error"])
