"""gradshield_ray: GradShield's FIHS scoring and adaptive threshold as a data-pipeline step.

The public API (a component of your own Ray Data pipeline; see gradshield_ray.api):

  GradShield(config)            .score(ds) → lazy Dataset with fihs + gs_* columns,
                                .threshold(scored) → ThresholdDecision (τ + evidence),
                                .split(scored, decision) → (kept, removed, errors) lazy Datasets
  GradShieldConfig              the one typed config (GradShieldConfig.from_yaml(path))
  ThresholdDecision             τ, the policy and its evidence
  separation_verdict(evidence)  does the score separate the calibration canaries on this model? (say so before
                                trusting a cut)
  read_jsonl(paths)             JSONL files as a Dataset: one row per line, malformed lines kept as errors
  run(config)                   the resumable object-storage runner (`gradshield-ray run`) on the same stages

Names are imported on first use, so the math modules stay importable with torch + transformers alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["GradShield", "GradShieldConfig", "ThresholdDecision", "read_jsonl", "run", "separation_verdict",
           "__version__"]

_EXPORTS = {
    "GradShield": ("gradshield_ray.api", "GradShield"),
    "read_jsonl": ("gradshield_ray.api", "read_jsonl"),
    "GradShieldConfig": ("gradshield_ray.config", "GradShieldConfig"),
    "ThresholdDecision": ("gradshield_ray.threshold", "ThresholdDecision"),
    "run": ("gradshield_ray.ray_pipeline", "run_pipeline"),
    "separation_verdict": ("gradshield_ray.threshold", "separation_verdict"),
}

if TYPE_CHECKING:
    from gradshield_ray.api import GradShield, read_jsonl  # noqa: F401
    from gradshield_ray.config import GradShieldConfig  # noqa: F401
    from gradshield_ray.ray_pipeline import run_pipeline as run  # noqa: F401
    from gradshield_ray.threshold import ThresholdDecision, separation_verdict  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradshield_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
