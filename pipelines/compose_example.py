"""GradShield composed into your own Ray Data pipeline (the public API, end to end):

    read_json  →  a length filter written with plain Ray Data  →  GradShield (score → threshold → split)
               →  write_parquet (kept/, removed/, errors/)  →  `kept` straight into a Ray Train TorchTrainer

    python -m pipelines.compose_example --input s3://bucket/uploads/ --output s3://bucket/clean/ \
        --config gradshield.yaml [--max-chars 8000] [--train]

Storage endpoint and credentials come from the config's `storage` section or the AWS environment, as for
`gradshield-ray run`. This example holds the scored rows in the object store (materialize) between the
threshold and the split; for corpora larger than the cluster's object store, use `gradshield-ray run`
(resumable, scores committed to storage unit by unit), which is built on the same stages.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import gradshield_ray as gs
from gradshield_ray import storage


def conversation_chars(row: dict[str, Any]) -> int:
    """Characters of a row's turns (a plain-Python length measure, no tokenizer). Content may be a string or
    OpenAI text parts; a row this cannot measure is passed on (GradShield turns it into an error row)."""
    msgs = row.get("messages")
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except ValueError:
            return 0
    total = 0
    for m in msgs if isinstance(msgs, list) else []:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            total += len(c)
        elif isinstance(c, list):
            total += sum(len(p.get("text") or "") for p in c if isinstance(p, dict))
    return total


def filter_and_write(input_uri: str, output_uri: str, config: gs.GradShieldConfig, max_chars: int):
    """The pipeline up to the written splits; returns (kept Dataset, summary dict)."""
    import ray

    in_fs, in_path = storage.filesystem(input_uri, config.storage)
    out_fs, out_path = storage.filesystem(output_uri, config.storage)
    ds = ray.data.read_json(in_path, filesystem=in_fs)  # JSONL: one object per line
    n_input = ds.count()
    short = ds.filter(lambda row: conversation_chars(row) <= max_chars)  # any plain Ray Data stage

    shield = gs.GradShield(config)
    scored = shield.score(short).materialize()  # scored once, used by the threshold and the split
    decision = shield.threshold(scored)
    kept, removed, errors = shield.split(scored, decision)
    counts = {"input": n_input, "after_length_filter": scored.count()}
    for name, part in (("kept", kept), ("removed", removed), ("errors", errors)):
        part = part.materialize()
        counts[name] = part.count()
        part.write_parquet(storage.join(out_path, name), filesystem=out_fs)
    summary = {"counts": counts, "tau": decision.tau, "policy": decision.policy,
               "reason": decision.evidence.get("reason")}
    storage.write_json(out_fs, storage.join(out_path, "summary.json"), summary)
    return kept, summary


def train_loop(c: dict[str, Any]) -> None:
    """One epoch of plain SGD on the kept rows, rendered the way GradShield scored them (assistant-only
    loss); reports the rows seen and the mean loss. A stand-in for your real training loop."""
    import ray.train
    import torch

    from gradshield_ray.batching import collate
    from gradshield_ray.config import GradShieldConfig
    from gradshield_ray.loss import per_example_loss
    from gradshield_ray.model import load_model, pad_id
    from gradshield_ray.render import encode_row

    cfg = GradShieldConfig.model_validate_json(c["config"])
    model, tok, device = load_model(cfg.model, cfg.storage)
    model.requires_grad_(True)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=c["lr"])
    rows, losses = 0, []
    for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=c["batch_size"],
                                                                     batch_format="pyarrow"):
        enc = [encode_row(tok, r, cfg.data) for r in batch.to_pylist()]
        b = collate(enc, pad_id(tok, model)).to(device)
        loss = per_example_loss(model, b).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows += len(enc)
        losses.append(float(loss))
    metrics = {"rows": rows, "mean_loss": sum(losses) / max(len(losses), 1)}
    with tempfile.TemporaryDirectory() as d:  # Ray Train keeps the metrics reported with a checkpoint
        Path(d, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_on_kept(kept, config: gs.GradShieldConfig, storage_path: str, batch_size: int = 8,
                  lr: float = 1e-3) -> dict[str, Any]:
    """Hand the lazy `kept` Dataset to a TorchTrainer (one CPU worker here; set ScalingConfig for GPUs)."""
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    mod = sys.modules[train_loop.__module__]
    if mod.__name__ != "__main__":  # imported (tests): workers cannot import pipelines/ by name
        ray.cloudpickle.register_pickle_by_value(mod)
    worker_cfg = config.model_copy(update={"storage": storage.StorageConfig.model_validate_json(
        storage.resolved_json(config.storage))})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": worker_cfg.model_dump_json(), "batch_size": batch_size, "lr": lr},
        datasets={"train": kept},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="compose_example", storage_path=storage_path),
    )
    return dict(trainer.fit().metrics)


def main(argv: list[str] | None = None) -> int:
    import ray

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file or prefix (local or s3://)")
    p.add_argument("--output", required=True, help="where kept/ removed/ errors/ and summary.json go")
    p.add_argument("--config", help="GradShield YAML config (model, data, threshold, storage, ray)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-chars", type=int, default=8000, help="the length filter: drop longer conversations")
    p.add_argument("--train", action="store_true", help="then train on `kept` with a TorchTrainer")
    p.add_argument("--train-storage", default="/tmp/gradshield_compose_train")
    args = p.parse_args(argv)
    config = gs.GradShieldConfig.from_yaml(args.config, args.set)
    ray.init(ignore_reinit_error=True)
    kept, summary = filter_and_write(args.input, args.output, config, args.max_chars)
    if args.train:
        summary["train"] = train_on_kept(kept, config, args.train_storage)
    print(json.dumps(summary, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
