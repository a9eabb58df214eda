"""A non-finite loss or score (here: an inf embedding row, as an fp16 overflow would give) becomes an error
row with its reason; it is never coerced to 0 and never reaches the threshold. Real model, real autograd."""
from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradshield_ray import local
from gradshield_ray.config import GradShieldConfig


def test_nonfinite_rows_become_errors(tmp_path, untied_model_dir):
    tok = AutoTokenizer.from_pretrained(untied_model_dir)
    model = AutoModelForCausalLM.from_pretrained(untied_model_dir)
    poison = tok.convert_tokens_to_ids("~")
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("inf")
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    rows = []
    for i in range(12):
        text = f"Tell me about item {i}" + (" ~ now" if i % 4 == 0 else "")
        rows.append({"messages": [{"role": "user", "content": text},
                                  {"role": "assistant", "content": f"Sure, item {i} is fine."}]})
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "a.parquet")
    cfg = GradShieldConfig.model_validate({"input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                                           "model": {"path": str(mdir)}, "proxy": {"max_probes": 4},
                                           "score": {"max_batch_size": 16}})
    rep = local.run_filter(cfg)
    errors = pq.read_table(tmp_path / "out" / "errors" / "a.parquet").to_pylist()
    assert sorted(int(r["gs_row_id"].split(":")[1]) for r in errors) == [0, 4, 8]
    assert all(r["gs_error"].startswith("non-finite score") and r["fihs"] is None for r in errors)
    assert rep["counts"] == {"input": 12, "kept": rep["counts"]["kept"], "removed": rep["counts"]["removed"],
                             "errors": 3}
    assert rep["scores"]["count"] == 9  # only finite scores reach the summary and the threshold
    scored = pq.read_table(tmp_path / "out" / "scored" / "a.parquet")
    assert all(v is None or math.isfinite(v) for v in scored["fihs"].to_pylist())
