"""A corpus with every kind of bad input the issue lists, through both runners (local and Ray on S3).

Every case has one documented behaviour (README "Guarantees"), and for every corpus the conservation
invariant kept + removed + errors = input holds, with each input row id exactly once and its input
columns byte-identical:

  null / empty messages, unknown role, a conversation opening with a tool turn, no assistant turn,
  non-string content, bad JSON string                      → error row, gs_error names the reason
  messages stored as a JSON string                         → parsed and scored
  far over data.max_tokens                                 → cut on the right, gs_truncated = true
                                                             (error row when no assistant token is left,
                                                             or always with data.truncation = error)
  invalid UTF-8 in a column the renderer reads             → error row "invalid UTF-8 in column …";
                                                             the bytes are kept unchanged in the output
  invalid UTF-8 in any other column                        → passed through byte for byte, row scored
  zero-row Parquet file                                    → contributes no rows
  empty (0-byte) *.parquet file                            → no rows: skipped, listed in report["inputs"]
  file neither *.parquet nor JSONL (_SUCCESS, notes.txt)   → not input: ignored, counted in report["inputs"]
  two files with different schemas                         → each file's parts keep their own schema
  nested folders                                           → row ids and output names keep the sub-path
  a *.parquet file that is not Parquet, or a missing
  required column                                          → fail fast, naming the file (rows unknown)
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3server import FAKE_KEY, FAKE_SECRET, s3_bucket, upload_dir

from gradshield_ray.config import GradShieldConfig

MAX_TOKENS = 64
TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
RAW_TURN = pa.struct([("role", pa.binary()), ("content", pa.binary())])


def chat(p, r):
    return [{"role": "user", "content": p}, {"role": "assistant", "content": r}]


def _raw_type(t: pa.DataType) -> pa.DataType:
    """The same type with every string replaced by binary (same layout, no UTF-8 decoding)."""
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_list(t):
        return pa.list_(_raw_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _raw_type(f.type)) for f in t])
    return t


def raw_rows(table: pa.Table) -> list[dict]:
    """Rows with strings as bytes, so invalid UTF-8 can be compared exactly."""
    cols = {name: pa.chunked_array([c.view(_raw_type(c.type)) for c in table[name].chunks], _raw_type(
        table[name].type)) for name in table.column_names}
    return pa.table(cols).to_pylist()


def write_bad_corpus(root: Path) -> dict[str, tuple]:
    """Write the corpus under root; return {row id: ("error", reason substring) | ("scored", truncated)}."""
    exp: dict[str, tuple] = {}
    d = root / "chat"
    (d / "nested" / "deeper").mkdir(parents=True)
    # a.parquet: messages as list<struct>, 3 row groups
    a = [
        (chat("How do I bake bread?", "Sure, mix flour and water."), ("scored", False)),
        (None, ("error", "column 'messages' is null: the row has no conversation")),
        ([], ("error", "column 'messages' is empty")),
        ([{"role": "tool", "content": "x"}] + chat("q", "a"), ("error", "turn 0 is a tool turn but no user turn precedes")),
        ([{"role": "user", "content": "hello?"}], ("error", "no assistant turn: nothing to score")),
        ([{"role": "user", "content": None}, {"role": "assistant", "content": "a"}],
         ("error", "turn 0 (user) content is null")),
        (chat("Hi", "Sure, here it is. " * 400), ("scored", True)),  # far over budget: cut, still trains
        (chat("bread " * 600, "ok"), ("error", f"no assistant tokens to train on within the first {MAX_TOKENS}")),
        ([{"role": "system", "content": "Be brief."}] + chat("Name a color.", "Red.") + chat("More?", "Blue."),
         ("scored", False)),
        ([{"role": "robot", "content": "x"}] + chat("q", "a"), ("error", "turn 0 has unknown role 'robot'")),
    ]
    pq.write_table(pa.table({"messages": pa.array([m for m, _ in a], pa.list_(TURN)),
                             "label": [f"a{i}" for i in range(len(a))]}), d / "a.parquet", row_group_size=3)
    exp.update({f"chat/a.parquet:{i}": e for i, (_, e) in enumerate(a)})
    # nested/deeper/b.parquet: another schema (messages as a JSON string, an int column, no label)
    b = [
        (json.dumps(chat("What is 2+2?", "Sure, 4.")), ("scored", False)),
        ('[{"role": "user", "content": "unterminated', ("error", "string is not valid JSON")),
        (json.dumps([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]),
         ("error", "turn 0 (user) content must be a string or a list of text parts, got int")),
        ("null", ("error", "column 'messages' is null")),
        (json.dumps({"role": "user"}), ("error", "column 'messages' must be a list of turns ({role, content}), got dict")),
        (b'[{"role": "user", "content": "caf\xe9"}]', ("error", "invalid UTF-8 in column 'messages'")),
    ]
    msgs = pa.array([m.encode() if isinstance(m, str) else m for m, _ in b], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"messages": msgs, "source": pa.array(range(len(b)), pa.int64())}),
                   d / "nested" / "deeper" / "b.parquet")
    exp.update({f"chat/nested/deeper/b.parquet:{i}": e for i, (_, e) in enumerate(b)})
    # utf8.parquet: invalid UTF-8 in a passenger column (row 1) and inside a turn's content (row 2)
    turns = [[{"role": b"user", "content": b"q"}, {"role": b"assistant", "content": b"Sure."}],
             [{"role": b"user", "content": b"r"}, {"role": b"assistant", "content": b"Fine."}],
             [{"role": b"user", "content": b"s"}, {"role": b"assistant", "content": b"bad \xff\xfe bytes"}]]
    msgs = pa.array(turns, pa.list_(RAW_TURN)).view(pa.list_(TURN))
    label = pa.array([b"ok", b"latin-1 \xe9t\xe9", b"ok"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"messages": msgs, "label": label}), d / "utf8.parquet")
    exp.update({"chat/utf8.parquet:0": ("scored", False), "chat/utf8.parquet:1": ("scored", False),
                "chat/utf8.parquet:2": ("error", "invalid UTF-8 in column 'messages'")})
    # a zero-row file, an empty file, and files that are not Parquet input
    pq.write_table(pa.table({"messages": pa.array([], pa.list_(TURN)), "label": pa.array([], pa.string())}),
                   d / "zero_rows.parquet")
    (d / "nested" / "empty.parquet").write_bytes(b"")
    (d / "_SUCCESS").write_bytes(b"")
    (d / "nested" / "notes.txt").write_text("not data\n")
    return exp


def input_rows(root: Path) -> dict[str, dict]:
    """Row id → raw input row, for every row of every non-empty *.parquet file."""
    out = {}
    for f in sorted(root.rglob("*.parquet")):
        if f.stat().st_size:
            for i, r in enumerate(raw_rows(pq.read_table(f))):
                out[f"{f.relative_to(root).as_posix()}:{i}"] = r
    return out


def check_outcome(parts: dict[str, list[dict]], counts: dict, expected: dict, inputs: dict) -> dict[str, dict]:
    """Conservation, one place per row, the documented behaviour per row, input columns unchanged."""
    n = {k: len(v) for k, v in parts.items()}
    assert n["kept"] + n["removed"] + n["errors"] == len(expected) == counts["input"]
    assert n == {k: counts[k] for k in n}
    rows = [r for v in parts.values() for r in v]
    ids = [r["gs_row_id"].decode() for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) == set(expected)
    by_id = dict(zip(ids, rows))
    err_ids = {r["gs_row_id"].decode() for r in parts["errors"]}
    for rid, (kind, what) in expected.items():
        r = by_id[rid]
        if kind == "error":
            assert rid in err_ids and r["fihs"] is None, rid
            assert what in r["gs_error"].decode(), (rid, r["gs_error"])
        else:
            assert rid not in err_ids and r["gs_error"] is None, (rid, r["gs_error"])
            assert r["gs_truncated"] is what, rid
            if what:
                assert r["gs_n_tokens"] == MAX_TOKENS
        assert {k: r[k] for k in inputs[rid]} == inputs[rid], rid  # byte-identical input columns
    return by_id


def read_local(d: Path) -> list[dict]:
    return [r for f in sorted(d.rglob("*.parquet")) for r in raw_rows(pq.read_table(f))] if d.is_dir() else []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bad") / "in"
    root.mkdir()
    return root, write_bad_corpus(root)


def local_cfg(corpus_root: Path, out: Path, model: str, **extra) -> GradShieldConfig:
    d = {"input": str(corpus_root), "output": str(out), "model": {"path": model},
         "proxy": {"max_probes": 2}, "score": {"verify_rows": 0},
         "data": {"max_tokens": MAX_TOKENS, **extra.pop("data", {})}}
    return GradShieldConfig.model_validate({**d, **extra})


@pytest.fixture(scope="module")
def local_result(corpus, tiny_model_dir, tmp_path_factory):
    from gradshield_ray import local

    root, expected = corpus
    out = tmp_path_factory.mktemp("local-out")
    rep = local.run_filter(local_cfg(root, out, tiny_model_dir))
    parts = {k: read_local(out / k) for k in ("kept", "removed", "errors")}
    return rep, parts, out


def test_local_runner_bad_input(corpus, local_result):
    root, expected = corpus
    rep, parts, out = local_result
    by_id = check_outcome(parts, rep["counts"], expected, input_rows(root))
    assert by_id["chat/utf8.parquet:1"]["label"] == b"latin-1 \xe9t\xe9"  # passenger bytes untouched
    assert rep["inputs"] == {"files": 4, "empty_files_skipped": ["chat/nested/empty.parquet"],
                             "non_parquet_ignored": ["chat/_SUCCESS", "chat/nested/notes.txt"],
                             "n_non_parquet_ignored": 2}
    # outputs mirror the nested layout, each part with its own file's schema
    b = pq.read_schema(out / "scored" / "chat" / "nested" / "deeper" / "b.parquet")
    a = pq.read_schema(out / "scored" / "chat" / "a.parquet")
    assert b.field("messages").type == pa.string() and "source" in b.names and "label" not in b.names
    assert a.field("messages").type == pa.list_(TURN)
    assert (out / "scored" / "chat" / "zero_rows.parquet").is_file()


def truncation_error_expected(expected: dict) -> dict:
    """With data.truncation: error both over-long rows become error rows (the one that would still train too)."""
    exp = dict(expected)
    exp["chat/a.parquet:6"] = exp["chat/a.parquet:7"] = ("error", f"over data.max_tokens={MAX_TOKENS}")
    return exp


def test_local_truncation_error_policy(corpus, tiny_model_dir, tmp_path):
    from gradshield_ray import local

    root, expected = corpus
    rep = local.run_filter(local_cfg(root, tmp_path / "o", tiny_model_dir, data={"truncation": "error"}))
    parts = {k: read_local(tmp_path / "o" / k) for k in ("kept", "removed", "errors")}
    check_outcome(parts, rep["counts"], truncation_error_expected(expected), input_rows(root))


def unusable_corpus(root, case: str) -> None:
    """A good file plus, in a sub-folder, one that is not Parquet ("garbage") or lacks `messages`."""
    (root / "x").mkdir(parents=True)
    pq.write_table(pa.table({"messages": pa.array([chat("q", "a")], pa.list_(TURN))}), root / "ok.parquet")
    if case == "garbage":
        (root / "x" / "garbage.parquet").write_bytes(b"this is not parquet" * 10)
    else:
        pq.write_table(pa.table({"text": ["q"]}), root / "x" / "other.parquet")


@pytest.mark.parametrize("case,message", [
    ("garbage", "garbage.parquet: not a readable Parquet file"),
    ("no_column", "other.parquet: missing column(s) ['messages']"),
])
def test_local_unusable_file_fails_fast(tmp_path, tiny_model_dir, case, message):
    from gradshield_ray import local

    root = tmp_path / "in"
    unusable_corpus(root, case)
    t = time.perf_counter()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        local.run_filter(local_cfg(root, tmp_path / "o", tiny_model_dir))
    assert time.perf_counter() - t < 10
    assert not (tmp_path / "o" / "report.json").exists()


# ---------------------------------------------------------------- the Ray pipeline on S3


@pytest.fixture(scope="module")
def s3():
    with s3_bucket("bad") as s:
        yield s


def ray_cfg(url: str, prefix: str, model: str, out: str | None = None, **extra) -> GradShieldConfig:
    return GradShieldConfig.model_validate({
        "input": f"s3://bad/{prefix}", "output": f"s3://bad/{out or 'out-' + prefix}", "model": {"path": model},
        "proxy": {"max_probes": 2}, "score": {"verify_rows": 0},
        "data": {"max_tokens": MAX_TOKENS, **extra.pop("data", {})},
        "storage": {"endpoint_url": url, "access_key_id": FAKE_KEY, "secret_access_key": FAKE_SECRET},
        "ray": {"num_actors": 1, "num_gpus_per_actor": 0.5, "num_cpus_per_actor": 0.5, "batch_rows": 4,
                "render_num_cpus": 0.5}, **extra})


def read_s3(client, prefix: str) -> list[dict]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="bad", Prefix=prefix)
            for o in page.get("Contents", []) if o["Key"].endswith(".parquet")]
    return [r for k in keys for r in raw_rows(pq.read_table(io.BytesIO(client.get_object(
        Bucket="bad", Key=k)["Body"].read())))]


@pytest.mark.slow
def test_ray_pipeline_bad_input_matches_local(corpus, local_result, s3, ray_local, tiny_model_dir):
    from gradshield_ray.ray_pipeline import run_pipeline

    root, expected = corpus
    url, client = s3
    upload_dir(client, root, "bad", "in")
    man = run_pipeline(ray_cfg(url, "in", tiny_model_dir))
    parts = {k: read_s3(client, f"out-in/{k}/") for k in ("kept", "removed", "errors")}
    by_id = check_outcome(parts, man["counts"], expected, input_rows(root))
    assert man["inputs"] == {"files": 4, "empty_files_skipped": ["chat/nested/empty.parquet"],
                             "non_parquet_ignored": ["chat/_SUCCESS", "chat/nested/notes.txt"],
                             "n_non_parquet_ignored": 2}
    # the same row-level outcome as the single-process runner: errors, truncation, scores
    _, local_parts, _ = local_result
    local_by_id = {r["gs_row_id"].decode(): r for v in local_parts.values() for r in v}
    for rid, r in by_id.items():
        lr = local_by_id[rid]
        assert (r["gs_error"], r["gs_truncated"], r["gs_n_tokens"]) == (
            lr["gs_error"], lr["gs_truncated"], lr["gs_n_tokens"]), rid
        if r["fihs"] is not None:
            assert r["fihs"] == pytest.approx(lr["fihs"], rel=1e-5, abs=1e-9)


@pytest.mark.slow
def test_ray_truncation_error_policy(corpus, s3, ray_local, tiny_model_dir):
    from gradshield_ray.ray_pipeline import run_pipeline

    root, expected = corpus
    url, client = s3
    upload_dir(client, root, "bad", "trunc-in")
    man = run_pipeline(ray_cfg(url, "trunc-in", tiny_model_dir, data={"truncation": "error"}))
    parts = {k: read_s3(client, f"out-trunc-in/{k}/") for k in ("kept", "removed", "errors")}
    check_outcome(parts, man["counts"], truncation_error_expected(expected), input_rows(root))


@pytest.mark.slow
@pytest.mark.parametrize("case,message", [
    ("garbage", "x/garbage.parquet: not a readable Parquet file"),
    ("no_column", "x/other.parquet: missing column(s) ['messages']"),
])
def test_ray_unusable_file_fails_fast(s3, ray_local, tiny_model_dir, tmp_path, case, message):
    from gradshield_ray.ray_pipeline import RunError, run_pipeline

    url, client = s3
    root = tmp_path / case
    unusable_corpus(root, case)
    upload_dir(client, root, "bad", case)
    t = time.perf_counter()
    with pytest.raises(RunError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_pipeline(ray_cfg(url, case, tiny_model_dir))
    # README: under 10 s. Measured (cProfile, this box): 2.7 s in a process that has not imported ray yet
    # (2.3 s of it `import ray`), 0.1 s once it has; the rest is listing, footers and the model config check
    assert time.perf_counter() - t < 10
    listed = [o["Key"] for o in client.list_objects_v2(Bucket="bad", Prefix=f"out-{case}/").get("Contents", [])]
    assert all(k.endswith("/") for k in listed), listed  # no run.json, no parts (a folder marker at most)
