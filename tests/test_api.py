"""The public API (gs.GradShield over ray.data.Dataset) against the resumable runner on the same rows:
bit-identical scores, the same τ and the same kept set, from read_parquet, read_json and JSONL input to
`run`; JSONL with bad lines, tool turns and content parts comes out conserved with clear reasons; the
composed example (pipelines/compose_example.py) end to end on a real S3 server, `kept` into a TorchTrainer."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from s3server import FAKE_KEY, FAKE_SECRET, s3_bucket, upload_dir

import gradshield_ray as gs
from gradshield_ray.miniature.demo import make_corpus

pytestmark = pytest.mark.slow
BATCH = 8  # rows per scorer call; every file holds a multiple of it, so API batches and runner chunks match


def base_cfg(model_dir: str, **extra) -> dict:
    return {"model": {"path": model_dir}, "proxy": {"max_probes": 6},
            "ray": {"num_actors": 1, "num_gpus_per_actor": 0.5, "num_cpus_per_actor": 0.5, "batch_rows": BATCH,
                    "render_num_cpus": 0.5}, **extra}


def key(messages) -> str:
    """A row's identity across formats: its turns as canonical JSON (role and content only)."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The same 48 rows as Parquet (3 files × 2 row groups of 8) and as JSONL (3 files of 16 lines)."""
    root = tmp_path_factory.mktemp("api")
    src = make_corpus(root / "src", n_rows=48, n_files=3, seed=5)
    pq_dir, js_dir = root / "parquet", root / "jsonl"
    pq_dir.mkdir()
    js_dir.mkdir()
    for k, f in enumerate(sorted(src.glob("*.parquet"))):
        t = pq.read_table(f)
        assert t.num_rows % BATCH == 0
        pq.write_table(t, pq_dir / f.name, row_group_size=BATCH)
        lines = "".join(json.dumps(r) + "\n" for r in t.to_pylist()).encode()
        path = js_dir / f"part-{k}.jsonl"
        if k == 2:
            path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(lines))  # a gzip file among them
        else:
            path.write_bytes(lines)
    return {"parquet": pq_dir, "jsonl": js_dir}


def rows_of(d: Path) -> list[dict]:
    return [r for f in sorted(d.rglob("*.parquet")) if f.is_file() for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def run_results(corpus, tiny_model_dir, tmp_path_factory, ray_local):
    """`run` (the resumable runner) on the Parquet and on the JSONL copy."""
    out = {}
    for fmt in ("parquet", "jsonl"):
        o = tmp_path_factory.mktemp(f"run-{fmt}")
        man = gs.run(gs.GradShieldConfig.model_validate(
            base_cfg(tiny_model_dir, input=str(corpus[fmt]), output=str(o))))
        out[fmt] = (man, {k: rows_of(o / k) for k in ("kept", "removed", "errors")}, o)
    return out


def api_result(shield, ds):
    scored = shield.score(ds).materialize()
    decision = shield.threshold(scored)
    parts = shield.split(scored, decision)
    return decision, dict(zip(("kept", "removed", "errors"), (p.take_all() for p in parts)))


@pytest.mark.parametrize("reader", ["read_parquet", "read_json"])
def test_api_matches_run_bit_for_bit(reader, corpus, run_results, tiny_model_dir):
    import ray

    man, run_parts, _ = run_results["parquet"]
    shield = gs.GradShield(base_cfg(tiny_model_dir))
    ds = ray.data.read_parquet(str(corpus["parquet"])) if reader == "read_parquet" else ray.data.read_json(
        str(corpus["jsonl"]))
    decision, parts = api_result(shield, ds)
    assert decision.tau == pytest.approx(man["tau"], rel=1e-12)  # summaries merge in another order (README: τ to ~1e-15)
    assert {k: len(v) for k, v in parts.items()} == {k: man["counts"][k] for k in ("kept", "removed", "errors")}
    for name in ("kept", "removed"):  # the same rows, each with the same score bit for bit
        got = sorted((key(r["messages"]), r["fihs"], r["label"]) for r in parts[name])
        want = sorted((key(r["messages"]), r["fihs"], r["label"]) for r in run_parts[name])
        assert got == want, name
    assert set(parts["kept"][0]) >= {"messages", "label", "fihs", "gs_n_tokens", "gs_error"}


def test_jsonl_input_to_run_matches_parquet(run_results):
    """`run` on JSONL (plain and gzip): row ids file:line, the same scores as the Parquet copy."""
    (pman, pparts, _), (jman, jparts, _) = run_results["parquet"], run_results["jsonl"]
    assert jman["tau"] == pytest.approx(pman["tau"], rel=1e-12) and jman["counts"] == pman["counts"]
    for name in ("kept", "removed"):
        assert sorted((key(r["messages"]), r["fihs"]) for r in jparts[name]) == sorted(
            (key(r["messages"]), r["fihs"]) for r in pparts[name])
    ids = sorted(r["gs_row_id"] for v in jparts.values() for r in v)
    assert ids == sorted(f"part-{k}.jsonl{'.gz' if k == 2 else ''}:{i}" for k in range(3) for i in range(1, 17))


def test_run_writes_report_html(run_results):
    """report.html beside report.json in the Ray runner: per-part samples merged into the 20 top rows."""
    from test_report_html import Page

    man, parts, out = run_results["parquet"]
    page = Page()
    page.feed((out / "report.html").read_text())
    assert page.external == [] and len(page.imgs) == 1
    assert {k: int(v) for k, v in page.tables["counts"]} == man["counts"]
    for name, table_id in (("kept", "kept-near-tau"), ("removed", "removed")):
        want = sorted(parts[name], key=lambda r: (-r["fihs"], r["gs_row_id"]))[:20]
        assert [r[0] for r in page.tables[table_id]] == [r["gs_row_id"] for r in want] or not want


MESSY = [  # (line, expected: None = scored, or a substring of its gs_error)
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure."}]}), None),
    ('{"messages": [{"role": "user", "content": "cut off', "line 2: not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {
        "type": "image_url", "image_url": {"url": "https://x/y.png"}}]}, {"role": "assistant", "content": "A cat."}]}),
     "non-text content part(s) 'image_url'"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                              {"role": "assistant", "content": None, "tool_calls": [
                                  {"id": "1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                              {"role": "tool", "tool_call_id": "1", "content": "rain"},
                              {"role": "assistant", "content": "It rains."}]}), None),
    (json.dumps({"messages": [{"role": "assistant", "content": "Sure, here it is."}]}),
     "turn 0 is an assistant turn but no user turn precedes it"),
    ("[1, 2]", "a JSON list, not an object"),
    (json.dumps({"text": "no messages key"}), "column 'messages' is null"),
]


def test_messy_jsonl_conserved_with_reasons(tmp_path, tiny_model_dir, ray_local):
    """Bad lines, tool turns, content parts: every line is kept, removed or an error row that says why,
    through `run` and through gs.read_jsonl + the API."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "upload.jsonl").write_text("\n".join(line for line, _ in MESSY) + "\n")
    want = {f"upload.jsonl:{i + 1}": exp for i, (_, exp) in enumerate(MESSY)}

    def check(rows: dict[str, list[dict]]):
        got = {r["gs_row_id"]: r for v in rows.values() for r in v}
        assert sum(len(v) for v in rows.values()) == len(got) == len(MESSY)
        assert set(got) == set(want)
        for rid, exp in want.items():
            if exp is None:
                assert got[rid]["gs_error"] is None and got[rid]["fihs"] is not None, (rid, got[rid]["gs_error"])
            else:
                assert got[rid]["fihs"] is None and exp in got[rid]["gs_error"], (rid, got[rid]["gs_error"])
        assert got["upload.jsonl:2"]["gs_raw_line"] == MESSY[1][0].encode()  # the bad line's bytes, kept

    man = gs.run(gs.GradShieldConfig.model_validate(base_cfg(tiny_model_dir, input=str(d), output=str(tmp_path / "o"),
                                                             threshold={"policy": "keep_all"})))
    assert man["counts"] == {"input": 7, "kept": 2, "removed": 0, "errors": 5}
    check({k: rows_of(tmp_path / "o" / k) for k in ("kept", "removed", "errors")})
    shield = gs.GradShield(base_cfg(tiny_model_dir, threshold={"policy": "keep_all"}))
    _, parts = api_result(shield, gs.read_jsonl(str(d)))
    check(parts)


def test_compose_example_on_s3(tmp_path, corpus, tiny_model_dir, ray_local, monkeypatch):
    """pipelines/compose_example.py: read_json (s3) → length filter → GradShield → write_parquet (s3), and
    `kept` into a TorchTrainer that sees exactly the kept rows."""
    from pipelines import compose_example

    with s3_bucket("lake") as (url, client):
        upload_dir(client, corpus["jsonl"], "lake", "uploads")
        client.delete_object(Bucket="lake", Key="uploads/part-2.jsonl.gz")  # read_json here: plain JSONL
        cfg = gs.GradShieldConfig.model_validate(base_cfg(tiny_model_dir, storage={
            "endpoint_url": url, "access_key_id": FAKE_KEY, "secret_access_key": FAKE_SECRET}))
        long_row = max(rows_of(corpus["parquet"])[:32], key=compose_example.conversation_chars)
        limit = compose_example.conversation_chars(long_row) - 1  # the filter drops at least that row
        kept, summary = compose_example.filter_and_write("s3://lake/uploads", "s3://lake/clean", cfg, limit)
        c = summary["counts"]
        assert c["input"] == 32 and 0 < c["after_length_filter"] < 32
        assert c["kept"] + c["removed"] + c["errors"] == c["after_length_filter"]
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="lake", Prefix="clean/")["Contents"]}
        assert "clean/summary.json" in keys and any(k.startswith("clean/kept/") for k in keys)
        metrics = compose_example.train_on_kept(kept, cfg, str(tmp_path / "train"))
        assert metrics["rows"] == c["kept"] and metrics["mean_loss"] > 0
