"""benchmarks/gpu_fihs.py is prepared for a lent GPU and has never run on one; a session that gets a GPU has
minutes, so the script must not fail there for a reason a CPU could have shown. This runs it end to end on the
CPU with a tiny shape (a smoke test of the code path, not of its numbers)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_script_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_fihs.py"), "--device", "cpu", "--shape", "tiny",
         "--seqs", "32,64", "--tokens", "256", "--steps", "1", "--loop-rows", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| seq | batch | train tok/s" in proc.stdout
    res = json.loads(out.read_text())
    assert [r["seq"] for r in res["runs"]] == [32, 64]
    for r in res["runs"]:
        for key in ("train_s", "hooks_s", "hooks_dense_s", "hooks_k1_s", "loop_s_per_row"):
            assert r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert 0 < r["hooks_mfu"] < 1 and 0 < r["train_mfu"] < 1
