"""Filter step entrypoint (the RayJob runs this): config YAML → Ray pipeline → manifest.json.

    python pipelines/filter.py --config pipelines/configs/filter_s3.yaml --set input=s3://bucket/corpus

Connects to RAY_ADDRESS when set (a KubeRay RayJob sets it), else starts a local Ray. Rerunning the same
command after a crash resumes from the scored units already committed in object storage.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from gradshield_ray.config import GradShieldConfig
from gradshield_ray.ray_pipeline import run_pipeline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (see pipelines/configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = GradShieldConfig.from_yaml(args.config, args.set)
    manifest = run_pipeline(cfg)
    print(json.dumps({k: manifest[k] for k in ("counts", "tau", "policy", "outputs")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
