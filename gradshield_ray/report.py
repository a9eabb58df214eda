"""What a run writes about itself: report.json, a histogram picture, and the model's identity."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gradshield_ray.summary import ScoreSummary


def code_version() -> str:
    from gradshield_ray import __version__

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def model_fingerprint(cfg) -> str:
    """The identity of the configured θ₀ (see model_source.fingerprint): wherever it is kept, and an
    adapter together with its base."""
    from gradshield_ray.model_source import fingerprint

    return fingerprint(cfg.model.path, cfg.storage, cfg.model.revision, cfg.model.base_path)


def run_report(cfg, counts: dict[str, int], decision, summary: ScoreSummary, scoring: dict[str, Any],
               outputs: dict[str, str]) -> dict[str, Any]:
    """The report both runners write: counts, τ and its evidence, score statistics, provenance."""
    return {
        "complete": True,
        "counts": counts,
        "tau": decision.tau,
        "policy": decision.policy,
        "evidence": decision.evidence,
        "scores": {"count": summary.count, "mean": summary.mean, "std": summary.std,
                   "min": summary.min, "max": summary.max,
                   "quantiles": {str(q): summary.quantile(q) for q in (0.01, 0.5, 0.9, 0.99)}},
        "scoring": scoring,
        "model": {"path": cfg.model.path, "fingerprint": model_fingerprint(cfg)},
        "code_version": code_version(),
        "config": cfg.to_public_dict(),
        "outputs": outputs,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else str(f)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(obj: dict[str, Any], path: Path) -> None:
    """Atomic JSON write (inf/nan become strings so the file stays strict JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False))
    tmp.replace(path)


def histogram_png(summary: ScoreSummary, tau: float, path: Path | BinaryIO, title: str = "FIHS") -> None:
    """Score histogram (from the mergeable summary) with τ marked, for people who would rather look."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = summary.quantile(0.0005), summary.quantile(0.9995)
    if math.isfinite(tau):
        lo, hi = min(lo, tau), max(hi, tau)
    centers, counts = summary.nonempty()
    inside = (centers >= lo) & (centers <= hi)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 81)
    hist, _ = np.histogram(centers[inside], bins=edges, weights=counts[inside])
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="#4a7bb7")
    ax.set_yscale("symlog")
    if math.isfinite(tau):
        ax.axvline(tau, color="#c0392b", lw=2, label=f"τ = {tau:.4g}")
        ax.legend()
    ax.set_xlabel("FIHS (higher = training on the row makes the model more compliant)")
    ax.set_ylabel("rows")
    ax.set_title(f"{title}: {summary.count} scored rows")
    fig.tight_layout()
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
