"""What a run writes about itself: report.json, a histogram picture, and the model's identity."""
from __future__ import annotations

import io
import json
import math
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from gradshield_ray.threshold import separation_verdict
from gradshield_ray.summary import ScoreSummary

if TYPE_CHECKING:
    from gradshield_ray.config import GradShieldConfig
    from gradshield_ray.threshold import ThresholdDecision


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
        "score_check": separation_verdict(decision.evidence),
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


def finalize(cfg: GradShieldConfig, fs, out_root: str, counts: dict[str, int], decision: ThresholdDecision,
             summary: ScoreSummary, scoring: dict[str, Any], inputs: dict[str, Any],
             extra: dict[str, Any] | None = None, samples: dict[str, list] | None = None) -> dict[str, Any]:
    """The last step of both runners: conservation checks, then histogram.png, report.html (the review page,
    with `samples`: the top removed and kept rows), report.json and (with `extra`, the Ray runner)
    manifest.json, last: the commit marker of the run."""
    from gradshield_ray import report_html, storage
    from gradshield_ray.errors import RunError

    if counts["kept"] + counts["removed"] + counts["errors"] != counts["input"]:
        raise RunError(f"conservation violated: {counts}")
    if counts["kept"] + counts["removed"] != summary.count:
        raise RunError(f"τ was decided from {summary.count} scores, but {counts['kept'] + counts['removed']} "
                       "rows have one")
    outputs = {k: storage.join(cfg.output, k) for k in ("scored", "kept", "removed", "errors")}
    outputs["histogram"] = storage.join(cfg.output, "histogram.png")
    outputs["report_html"] = storage.join(cfg.output, "report.html")
    rep = run_report(cfg, counts, decision, summary, scoring, outputs)
    rep["inputs"] = inputs
    rep.update({k: v for k, v in (extra or {}).items() if k not in ("files", "kept_parts")})  # O(1) in outputs
    png = io.BytesIO()
    histogram_png(summary, decision.tau, png)
    storage.write_bytes(fs, storage.join(out_root, "histogram.png"), png.getvalue())
    samples = samples or {"kept": [], "removed": []}
    storage.write_bytes(fs, storage.join(out_root, "report.html"), report_html.render(
        _jsonable(rep), decision, png.getvalue(), samples["removed"], samples["kept"]).encode())
    storage.write_json(fs, storage.join(out_root, "report.json"), _jsonable(rep))
    if extra is None:
        return rep
    manifest = _jsonable({**rep, **extra})
    storage.write_json(fs, storage.join(out_root, "manifest.json"), manifest)  # last: the commit marker
    return manifest
