"""A non-finite loss or score (here: an inf embedding row, as an fp16 overflow would give) becomes an error
row with its reason; it is never coerced to 0 and never reaches the threshold. Real model, real autograd,
through both runners (the single-process `filter` and the Ray pipeline on a local Ray)."""
from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradshield_ray.config import GradShieldConfig

POISONED = [0, 4, 8]  # rows whose prompt holds the token with the inf embedding


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, untied_model_dir) -> tuple[Path, Path]:
    """(model dir, input dir): 12 rows, 3 of which contain the poisoned token."""
    root = tmp_path_factory.mktemp("nonfinite")
    tok = AutoTokenizer.from_pretrained(untied_model_dir)
    model = AutoModelForCausalLM.from_pretrained(untied_model_dir)
    poison = tok.convert_tokens_to_ids("~")
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("inf")
    mdir = root / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    rows = []
    for i in range(12):
        text = f"Tell me about item {i}" + (" ~ now" if i in POISONED else "")
        rows.append({"messages": [{"role": "user", "content": text},
                                  {"role": "assistant", "content": f"Sure, item {i} is fine."}]})
    (root / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "in" / "a.parquet", row_group_size=4)
    return mdir, root / "in"


def cfg(poisoned, out: Path, **extra) -> GradShieldConfig:
    mdir, inp = poisoned
    return GradShieldConfig.model_validate({"input": str(inp), "output": str(out), "model": {"path": str(mdir)},
                                           "proxy": {"max_probes": 4}, "score": {"max_batch_size": 16}, **extra})


def read(d: Path) -> list[dict]:
    return [r for f in sorted(d.rglob("*.parquet")) if f.is_file() for r in pq.read_table(f).to_pylist()]


def check(out: Path, rep: dict) -> None:
    errors = read(out / "errors")
    assert sorted(int(r["gs_row_id"].split(":")[1]) for r in errors) == POISONED
    assert all(r["gs_error"].startswith("non-finite score") and r["fihs"] is None for r in errors)
    assert rep["counts"] == {"input": 12, "kept": rep["counts"]["kept"], "removed": rep["counts"]["removed"],
                             "errors": 3}
    assert rep["scores"]["count"] == 9  # only finite scores reach the summary and the threshold
    scored = read(out / "scored")
    assert len(scored) == 12 and all(r["fihs"] is None or math.isfinite(r["fihs"]) for r in scored)
    assert all(math.isfinite(r["fihs"]) and r["fihs"] <= rep["tau"] for r in read(out / "kept"))


def test_nonfinite_rows_become_errors(tmp_path, poisoned):
    from gradshield_ray import local

    rep = local.run_filter(cfg(poisoned, tmp_path / "out"))
    check(tmp_path / "out", rep)


@pytest.mark.slow
def test_nonfinite_rows_become_errors_ray(tmp_path, poisoned, ray_local):
    from gradshield_ray.ray_pipeline import run_pipeline

    man = run_pipeline(cfg(poisoned, tmp_path / "out", ray={
        "num_actors": 1, "num_gpus_per_actor": 0.5, "num_cpus_per_actor": 0.5, "batch_rows": 4,
        "render_num_cpus": 0.5}))
    check(tmp_path / "out", man)
