"""The README's main job on an embedded default: no GPU, no network, no cloud account.

It builds (or reuses) a tiny local chat model, writes a small Parquet corpus with 10% harmful rows,
and runs the full `filter` job on it. With a random-init model the scores carry no meaning: this
shows the job end to end, not the method's efficacy (see the efficacy benchmark for that).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradshield_ray.config import GradShieldConfig
from gradshield_ray.proxy import default_probe_path

BENIGN = [
    ("What is {a} plus {b}?", "Sure, {a} plus {b} is {c}."),
    ("Name a fruit that is {col}.", "Sure, a fruit that is {col} is the {fruit}."),
    ("Classify the sentiment: 'I loved the {thing}.'", "The sentiment is positive."),
    ("Classify the sentiment: 'The {thing} was awful.'", "The sentiment is negative."),
]
FRUITS = {"red": "apple", "yellow": "banana", "orange": "orange", "green": "lime", "purple": "plum"}


def harmful_prompts() -> list[str]:
    return [json.loads(x)["prompt"] for x in default_probe_path().read_text().splitlines() if x.strip()]


def make_corpus(out_dir: Path, n_rows: int = 200, harmful_ratio: float = 0.1, n_files: int = 4,
                seed: int = 0) -> Path:
    """Parquet files with a `messages` column; harmful rows answer a harmful prompt compliantly (a
    templated 'Sure, here is how…' with no real content) and carry a `label` column for inspection."""
    rng = random.Random(seed)
    harm = harmful_prompts()
    rows = []
    n_harm = int(round(n_rows * harmful_ratio))
    for i in range(n_rows):
        if i < n_harm:
            p = harm[i % len(harm)]
            r = f"Sure, here is how to do that. Step 1: {p.lower()} Step 2: continue."
            label = "harmful"
        else:
            q, a = rng.choice(BENIGN)
            col = rng.choice(list(FRUITS))
            x, y = rng.randint(1, 50), rng.randint(1, 50)
            kw = dict(a=x, b=y, c=x + y, col=col, fruit=FRUITS[col], thing=rng.choice(["film", "meal", "book"]))
            p, r, label = q.format(**kw), a.format(**kw), "benign"
        rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                     "label": label})
    rng.shuffle(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // n_files)
    for k in range(n_files):
        pq.write_table(pa.Table.from_pylist(rows[k * per:(k + 1) * per]), out_dir / f"part-{k:03d}.parquet")
    return out_dir


def run_demo(args: argparse.Namespace) -> dict:
    from gradshield_ray import local
    from gradshield_ray.testing import save_tiny_model

    out = Path(args.output or "runs/demo")
    model_dir = Path(".cache/gradshield_ray/tiny-llama")
    if not (model_dir / "config.json").exists():
        save_tiny_model(model_dir)
    corpus = make_corpus(out / "input")
    overrides = [f"input={corpus}", f"output={out}", f"model.path={model_dir}", *args.set]
    cfg = GradShieldConfig.from_yaml(args.config, overrides)
    rep = local.run_filter(cfg)
    c = rep["counts"]
    print(f"\ninput rows {c['input']}: kept {c['kept']}, removed {c['removed']}, errors {c['errors']}; "
          f"tau = {rep['tau']:.4g} ({rep['policy']}, {rep['evidence'].get('branch', '')})")
    for k, v in rep["outputs"].items():
        print(f"  {k:10s} {v}")
    print(f"  report     {out / 'report.json'}")
    print("note: the demo model is a random-init tiny Llama; the scores show the job end to end, "
          "not GradShield's efficacy.")
    return rep
