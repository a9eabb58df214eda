"""`gradshield-ray score | threshold | filter | demo`: flags map onto the one typed config."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pydantic import ValidationError

from gradshield_ray.config import GradShieldConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradshield-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("score", "score every row into OUTPUT/scored/"),
                        ("threshold", "reduce OUTPUT/scored/ fihs values to τ (threshold.json)"),
                        ("filter", "score, threshold, and split into kept/ removed/ errors/ + report.json"),
                        ("run", "the distributed filter on Ray (local Ray, RAY_ADDRESS, or a RayJob): "
                                "resumable, object storage in and out, manifest.json last"),
                        ("demo", "the main job on the embedded default (tiny local model, generated corpus)")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", help="YAML config (see configs in pipelines/)")
        s.add_argument("--input", help="Parquet file or directory (config: input)")
        s.add_argument("--output", help="output directory (config: output)")
        s.add_argument("--model", help="local model directory (config: model.path)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. --set score.scope=mlp (repeatable)")
        s.add_argument("-q", "--quiet", action="store_true", help="print only the final JSON (no logs, no progress)")
    return p


def load_config(args: argparse.Namespace) -> GradShieldConfig:
    overrides = list(args.set)
    for flag, key in (("input", "input"), ("output", "output"), ("model", "model.path")):
        if getattr(args, flag):
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    return GradShieldConfig.from_yaml(args.config, overrides)


def quiet() -> None:
    """--quiet: only the final JSON reaches the terminal (errors still go to stderr): no progress bars
    (ours, transformers', Ray Data's), no info or warning logs, no worker logs forwarded by Ray."""
    logging.getLogger().setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from ray.data import DataContext
    except ImportError:  # the local runner needs no Ray
        return
    DataContext.get_current().enable_progress_bars = False


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    if args.quiet:
        quiet()
    try:
        if args.command == "demo":
            from gradshield_ray.miniature.demo import run_demo

            run_demo(args)
            return 0
        cfg = load_config(args)
        from gradshield_ray import local

        if args.command == "run":
            from gradshield_ray.ray_pipeline import run_pipeline

            result = run_pipeline(cfg)
            result = {k: result[k] for k in ("counts", "tau", "policy", "score_check", "outputs")}
        elif args.command == "score":
            result = local.run_score(cfg)
        elif args.command == "threshold":
            decision, _ = local.run_threshold(cfg)
            result = {"tau": decision.tau, "policy": decision.policy, "evidence": decision.evidence}
        else:
            result = local.run_filter(cfg)
            result = {k: result[k] for k in ("counts", "tau", "policy", "score_check", "outputs")}
        print(json.dumps(result, indent=2, default=str))
        return 0
    except ValidationError as e:
        print(f"gradshield-ray: invalid config:\n{e}", file=sys.stderr)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"gradshield-ray: {type(e).__name__}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
