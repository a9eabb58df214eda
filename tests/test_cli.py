"""`gradshield-ray score | threshold | filter` on local Parquet: conservation, untouched columns, and
clear errors on bad input (each fails before any scoring work with a message naming the problem)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_report_html import Page

from gradshield_ray.cli import main
from gradshield_ray.miniature.demo import make_corpus


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """4 files in nested folders, plus one broken row and a zero-row file."""
    d = make_corpus(tmp_path / "in", n_rows=40, n_files=3)
    (d / "sub").mkdir()
    bad = pa.Table.from_pylist([
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Sure."}], "label": "x"},
        {"messages": [{"role": "user", "content": "no answer"}], "label": "broken"},
    ])
    pq.write_table(bad, d / "sub" / "extra.parquet")
    pq.write_table(bad.schema.empty_table(), d / "sub" / "zero.parquet")
    return d


def run(*args: str) -> int:
    return main([*args, "-q"])


def read_dir(d: Path) -> pa.Table | None:
    files = sorted(d.rglob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def test_filter_conserves_rows_and_columns(tmp_path, corpus, tiny_model_dir, capsys):
    out = tmp_path / "out"
    assert run("filter", "--input", str(corpus), "--output", str(out), "--model", tiny_model_dir,
               "--set", "proxy.max_probes=8") == 0
    rep = json.loads((out / "report.json").read_text())
    inp = read_dir(corpus)
    parts = {k: read_dir(out / k) for k in ("kept", "removed", "errors")}
    n = {k: (0 if t is None else t.num_rows) for k, t in parts.items()}
    assert n["kept"] + n["removed"] + n["errors"] == inp.num_rows == rep["counts"]["input"]
    assert n == {k: rep["counts"][k] for k in n}
    assert n["errors"] == 1 and parts["errors"]["gs_error"][0].as_py().startswith("no assistant turn: nothing to score")
    # every input row appears exactly once, with its original columns unchanged
    out_all = pa.concat_tables([t for t in parts.values() if t is not None])
    ids = out_all["gs_row_id"].to_pylist()
    assert len(set(ids)) == len(ids) == inp.num_rows
    by_id = {r["gs_row_id"]: r for r in out_all.to_pylist()}
    for f in sorted(corpus.rglob("*.parquet")):
        rel = f.relative_to(corpus).as_posix()
        for i, row in enumerate(pq.read_table(f).to_pylist()):
            got = by_id[f"{rel}:{i}"]
            assert {k: got[k] for k in row} == row
    # same schema for the original columns
    for t in parts.values():
        if t is not None:
            assert t.schema.field("messages").type == inp.schema.field("messages").type
    tau = rep["tau"]
    if parts["kept"] is not None and parts["kept"].num_rows:
        assert max(parts["kept"]["fihs"].to_pylist()) <= tau
    if parts["removed"] is not None and parts["removed"].num_rows:
        assert min(parts["removed"]["fihs"].to_pylist()) > tau
    assert {"Lambda", "branch"} <= set(rep["evidence"]) or rep["policy"] != "adaptive"
    assert (out / "histogram.png").stat().st_size > 1000
    assert json.loads((out / "threshold.json").read_text())["tau"] == tau
    # report.html beside report.json: the kept rows closest to τ are the kept rows with the highest scores
    page = Page()
    page.feed((out / "report.html").read_text())
    assert page.external == [] and len(page.imgs) == 1
    kept = sorted(parts["kept"].to_pylist(), key=lambda r: (-r["fihs"], r["gs_row_id"]))[:20]
    assert [r[0] for r in page.tables["kept-near-tau"]] == [r["gs_row_id"] for r in kept]
    assert {k: int(v) for k, v in page.tables["counts"]} == rep["counts"]


def test_quiet_prints_only_the_final_json(tmp_path, corpus, tiny_model_dir):
    """`-q`: stdout and stderr together are exactly one JSON document (no logs, no progress bars)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gradshield_ray.cli", "filter", "-q", "--input", str(corpus),
                           "--output", str(tmp_path / "o"), "--model", tiny_model_dir, "--set",
                           "proxy.max_probes=4"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert set(json.loads(proc.stdout)) == {"counts", "tau", "policy", "score_check", "outputs"}


def test_score_then_threshold_commands(tmp_path, corpus, tiny_model_dir, capsys):
    out = tmp_path / "o"
    common = ["--input", str(corpus), "--output", str(out), "--model", tiny_model_dir]
    assert run("score", *common) == 0
    assert read_dir(out / "scored").num_rows == read_dir(corpus).num_rows
    assert run("threshold", *common, "--set", "threshold.policy=top_fraction",
               "--set", "threshold.fraction=0.25") == 0
    th = json.loads((out / "threshold.json").read_text())
    assert th["policy"] == "top_fraction"


def test_yaml_config_with_flag_override(tmp_path, corpus, tiny_model_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tiny_model_dir}\nscore:\n  scope: mlp\nthreshold:\n  policy: keep_all\n")
    out = tmp_path / "o"
    assert run("filter", "--config", str(cfg), "--input", str(corpus), "--output", str(out),
               "--set", "score.normalize=cosine") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["score"]["scope"] == "mlp" and rep["config"]["score"]["normalize"] == "cosine"
    assert rep["counts"]["removed"] == 0


@pytest.mark.parametrize("extra,message", [
    (["--set", "score.scopee=mlp"], "scopee"),
    (["--set", "data.messages_column=conversation"], "missing column(s) ['conversation']"),
    (["--set", "proxy.comply=Absolutely-not-a-token"], "is not a single token"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--set", "score.scope=layers:0-9"], "layers must satisfy"),
])
def test_clear_errors(tmp_path, corpus, tiny_model_dir, capsys, extra, message):
    args = ["filter", "--input", str(corpus), "--output", str(tmp_path / "o"), "--model", tiny_model_dir, *extra]
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "o" / "report.json").exists()


def test_empty_dataset_and_missing_input(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"messages": pa.array([], pa.list_(pa.struct([("role", pa.string()),
                                                                          ("content", pa.string())])))}),
                   empty / "a.parquet")
    assert run("filter", "--input", str(empty), "--output", str(tmp_path / "o"), "--model", tiny_model_dir) == 2
    assert "has no rows" in capsys.readouterr().err
    assert run("filter", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"),
               "--model", tiny_model_dir) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "nofiles").mkdir()
    assert run("filter", "--input", str(tmp_path / "nofiles"), "--output", str(tmp_path / "o"),
               "--model", tiny_model_dir) == 2
    assert "contains no *.parquet or JSON Lines" in capsys.readouterr().err
