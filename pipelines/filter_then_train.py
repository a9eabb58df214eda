"""Filter-then-train entrypoint (the training RayJob runs this): a committed filter run → Ray Train +
DeepSpeed on exactly its kept rows → a checkpoint, metrics.json, train_manifest.json (written last).

    python pipelines/filter_then_train.py --config train.yaml    # e.g. train.yaml in k8s/configmap.yaml
    python pipelines/filter_then_train.py --run runs/r1 --output runs/r1-train --set scaling.num_workers=2
    python pipelines/filter_then_train.py --config train.yaml --check    # only check that the run is committed

The filter run's manifest.json is its commit marker: without it the run is not committed (still running,
failed, or a wrong prefix) and this script refuses to start (exit code 3). Training reads the manifest's
`kept_parts`, renders every row with the same chat template, data config and truncation the filter scored
(`gradshield_ray.render.encode_row`, assistant-only loss) and trains with `TorchTrainer` (one worker per GPU,
or gloo workers on CPU) wrapping a DeepSpeed engine (ZeRO-2 by default; 0-3 work; LoRA via peft optional).

Each global step averages the per-row loss over exactly the rows of that step on all workers; a worker whose
shard has run out in the last step contributes a zero-weighted row so the collectives stay in step.

Output (local path or s3://):
  train/checkpoint_*/model/     the trained model (or LoRA adapter) + tokenizer, HF format
  train/checkpoint_*/metrics.json, metrics.json   loss per step, rows seen (and a digest of their row ids)
  train_manifest.json           the commit marker, last: filter run, counts, checkpoint path, train config

Connects to RAY_ADDRESS when set (a RayJob sets it), else starts a local Ray. A rerun after a crash starts
training again from step 0 (no mid-run resume yet); a rerun after success is a no-op.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gradshield_ray import storage
from gradshield_ray.config import DataConfig, ModelConfig, apply_override
from gradshield_ray.render import required_columns
from gradshield_ray.storage import StorageConfig

log = logging.getLogger("gradshield_ray.train")
EXIT_NOT_COMMITTED = 3
ROW_ID = "gs_row_id"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraParams(_Section):
    """Train a peft LoRA adapter instead of all weights."""

    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainParams(_Section):
    """Optimisation. micro_batch_size is per worker; a global step is num_workers × micro_batch_size rows."""

    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # stop early (after this many global steps)
    micro_batch_size: int = Field(4, gt=0)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear"] = "linear"  # after warm-up: constant or linear decay to 0
    gradient_clipping: float = Field(1.0, ge=0)  # 0 = off
    zero_stage: Literal[0, 1, 2, 3] = 2
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # bf16 on GPUs that have it
    gradient_checkpointing: bool = False
    seed: int = 0
    lora: LoraParams = LoraParams()


class ScalingParams(_Section):
    """How Ray Train places the workers: one per GPU with use_gpu, else CPU workers with gloo."""

    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with GPUs, gloo without


class TrainJobConfig(_Section):
    """A training run on a committed filter run."""

    run: str = ""  # the filter run's output prefix (holds manifest.json)
    output: str = ""  # where the checkpoint, metrics.json and train_manifest.json go
    model_path: str | None = None  # default: the model the filter scored (manifest config.model.path)
    storage: StorageConfig = StorageConfig()
    train: TrainParams = TrainParams()
    scaling: ScalingParams = ScalingParams()

    @classmethod
    def from_yaml(cls, path: str | None, overrides: list[str] | None = None) -> "TrainJobConfig":
        import yaml

        data: dict[str, Any] = {}
        if path:
            loaded = yaml.safe_load(Path(path).read_text())
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"config {path}: top level must be a mapping")
            data = loaded or {}
        for item in overrides or []:
            apply_override(data, item)
        return cls.model_validate(data)

    def public(self) -> dict[str, Any]:
        """The config as written into outputs (no credentials: SecretStr dumps masked)."""
        return self.model_dump(mode="json", exclude={"storage": {"access_key_id", "secret_access_key",
                                                                 "session_token"}})


class NotCommitted(RuntimeError):
    """The filter run has no manifest.json: it is not committed."""


class TrainError(RuntimeError):
    """Training cannot start or its result is inconsistent."""


# ---------------------------------------------------------------- the filter run


def read_manifest(cfg: TrainJobConfig) -> dict[str, Any]:
    """The filter run's manifest, or NotCommitted; checked for the fields training needs."""
    if not cfg.run:
        raise TrainError("run (the filter run's output prefix) is not set")
    fs, root = storage.filesystem(cfg.run, cfg.storage)
    path = storage.join(root, "manifest.json")
    if not storage.exists(fs, path):
        raise NotCommitted(
            f"{storage.join(cfg.run, 'manifest.json')} does not exist: the filter run is not committed "
            "(still running, failed, or a wrong prefix). Refusing to train; rerun the filter step with the same "
            "command to finish it.")
    man = storage.read_json(fs, path)
    missing = [k for k in ("kept_parts", "counts", "config") if k not in man]
    if missing or not man.get("complete", False):
        raise TrainError(f"{path}: not a complete filter manifest (missing {missing or ['complete']})")
    return man


def _part_location(part: str, cfg: TrainJobConfig) -> str:
    """A kept part as the path within the run's filesystem (s3: bucket/key; local: absolute)."""
    _, p = storage.filesystem(part, cfg.storage)
    return p


def kept_parts(man: dict[str, Any], cfg: TrainJobConfig) -> tuple[list[str], int]:
    """(paths of the kept Parquet files, their total rows); the total must equal counts.kept. A manifest
    that lists its files with rows and bytes (`files.kept`) is checked with one listing of kept/, not one
    request per file; an older manifest (kept_parts only) is checked file by file."""
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(cfg.run, cfg.storage)
    listed = man.get("files", {}).get("kept")
    if listed is not None:
        have = {i.path: i.size for i in storage.list_infos(fs, storage.join(root, "kept"))}
        paths = [_part_location(f["path"], cfg) for f in listed]
        for f, p in zip(listed, paths):
            if have.get(p) != f["bytes"]:
                raise TrainError(f"kept file {p} listed in the manifest " + (
                    "does not exist" if p not in have else f"has {have[p]} bytes, not {f['bytes']}"))
        total = sum(f["rows"] for f in listed)
    else:
        paths = [_part_location(p, cfg) for p in man["kept_parts"]]
        total = 0
        for p in paths:
            if not storage.exists(fs, p):
                raise TrainError(f"kept part {p} listed in the manifest does not exist")
            with fs.open_input_file(p) as f:
                total += pq.ParquetFile(f).metadata.num_rows
    if total != man["counts"]["kept"]:
        raise TrainError(f"kept parts hold {total} rows but the manifest counts {man['counts']['kept']} kept")
    return paths, total


def _run_identity(man: dict[str, Any], cfg: TrainJobConfig) -> dict[str, Any]:
    return {"filter_run": cfg.run.rstrip("/"), "filter_tau": man.get("tau"), "filter_counts": man["counts"],
            "kept_parts_sha256": hashlib.sha256("\n".join(man["kept_parts"]).encode()).hexdigest(),
            "train": cfg.public()["train"], "scaling": cfg.public()["scaling"], "model_path": cfg.model_path}


# ---------------------------------------------------------------- the worker loop


def schedule_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


def shard_sizes(n: int, world: int) -> list[int]:
    """Rows of rank r = rows[r::world] of the kept rows in manifest order."""
    return [len(range(r, n, world)) for r in range(world)]


def train_loop_per_worker(c: dict[str, Any]) -> None:
    """One Ray Train worker: read its shard of the kept rows, render, train under DeepSpeed, report."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if c["use_gpu"] else "cpu")
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    if not c["use_gpu"]:
        torch.set_num_threads(max(1, int(c["cpus_per_worker"])))
    import deepspeed

    if not c["use_gpu"]:
        # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce op (tens of seconds, a C++
        # toolchain in the image); plain gloo collectives are enough for CPU runs.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # (deepspeed.comm.torch is torch)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradshield_ray.batching import collate
    from gradshield_ray.loss import per_example_loss
    from gradshield_ray.render import RenderError, encode_row

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if c["use_gpu"] else torch.device("cpu")
    tp = TrainParams.model_validate(c["train"])
    data_cfg = DataConfig.model_validate(c["data"])
    model_cfg = ModelConfig.model_validate(c["model"])
    torch.manual_seed(tp.seed)

    # every worker reads the (small) kept columns in manifest order and renders only its own rows
    fs, _ = storage.filesystem(c["run"], StorageConfig.model_validate_json(c["storage_json"]))
    cols = required_columns(data_cfg) + [ROW_ID]
    tabs = []
    for p in c["parts"]:
        with fs.open_input_file(p) as f:
            tabs.append(pq.read_table(f, columns=cols))
    table = pa.concat_tables(tabs) if tabs else None
    n = 0 if table is None else table.num_rows
    if n != c["n_kept"]:
        raise TrainError(f"rank {rank}: read {n} kept rows, expected {c['n_kept']}")
    mine = table.take(pa.array(np.arange(rank, n, world, dtype=np.int64))).to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.chat_template:
        tokenizer.chat_template = model_cfg.chat_template
    examples = []
    for row in mine:
        try:
            examples.append(encode_row(tokenizer, row, data_cfg))
        except RenderError as e:  # the filter rendered it with this tokenizer and config: a mismatch
            raise TrainError(f"kept row {row[ROW_ID]} cannot be rendered ({e}); is model_path the scored "
                             "model's tokenizer?") from None
    ids = [row[ROW_ID] for row in mine]

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[tp.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype,
                                                 attn_implementation=model_cfg.attn_implementation,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    model.config.use_cache = False
    if tp.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if tp.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        model = get_peft_model(model, PeftLoraConfig(r=tp.lora.r, lora_alpha=tp.lora.alpha,
                                                     lora_dropout=tp.lora.dropout,
                                                     target_modules=tp.lora.target_modules, task_type="CAUSAL_LM"))
    pad = next((int(x) for x in (tokenizer.pad_token_id, model.config.pad_token_id, tokenizer.eos_token_id)
                if x is not None), 0)

    class RowLoss(torch.nn.Module):
        """What DeepSpeed wraps: batch tensors → [B] per-row mean CE over the assistant tokens."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, labels):
            from gradshield_ray.batching import Batch

            return per_example_loss(self.lm, Batch(input_ids, attention_mask, position_ids, labels))

    wrapped = RowLoss(model)
    sizes = shard_sizes(n, world)
    mbs = tp.micro_batch_size
    steps_per_epoch = math.ceil(max(sizes) / mbs)
    total_steps = steps_per_epoch * tp.epochs
    if tp.max_steps:
        total_steps = min(total_steps, tp.max_steps)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tp.lr, weight_decay=tp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: schedule_lambda(s, tp.warmup_steps, total_steps, tp.schedule))
    ds_config = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": 1,
        "train_batch_size": mbs * world,
        "gradient_clipping": tp.gradient_clipping,
        "zero_optimization": {"stage": tp.zero_stage,
                              **({"stage3_gather_16bit_weights_on_model_save": True} if tp.zero_stage == 3 else {})},
        "bf16": {"enabled": tp.dtype == "bfloat16"},
        "fp16": {"enabled": tp.dtype == "float16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=opt, lr_scheduler=sched, config=ds_config,
                                           dist_init_required=False)

    rng = np.random.default_rng(tp.seed + 1000 * rank)
    losses, lrs, step_rows = [], [], []
    seen_ids: list[str] = []
    step = 0
    t0 = time.perf_counter()
    engine.train()
    for epoch in range(tp.epochs):
        order = rng.permutation(len(examples))
        for k in range(steps_per_epoch):
            if step >= total_steps:
                break
            idx = order[k * mbs:(k + 1) * mbs].tolist()
            global_rows = sum(min(mbs, max(0, s - k * mbs)) for s in sizes)
            real = len(idx)
            if not idx:  # this shard has run out: one zero-weighted row keeps the collectives in step
                idx = [0]
            batch = collate([examples[i] for i in idx], pad, "right").to(device)
            per_row = engine(batch.input_ids, batch.attention_mask, batch.position_ids, batch.labels)
            row_sum = per_row.float().sum() * (1.0 if real else 0.0)
            # DeepSpeed averages gradients over workers: scale so the step's gradient is the mean over its rows
            engine.backward(row_sum * world / global_rows)
            lrs.append(float(sched.get_last_lr()[0]))
            engine.step()
            stat = torch.tensor([row_sum.detach().item(), float(real)], dtype=torch.float64, device=device)
            dist.all_reduce(stat)
            loss = stat[0].item() / stat[1].item()
            if not math.isfinite(loss):
                raise TrainError(f"loss is not finite at step {step}: {loss}")
            losses.append(loss)
            step_rows.append(int(stat[1].item()))
            seen_ids += [ids[i] for i in idx[:real]]
            if rank == 0 and (step % 10 == 0 or step == total_steps - 1):  # RayJob logs show worker stdout
                print(f"step {step + 1}/{total_steps} epoch {epoch} loss {loss:.4f} lr {lrs[-1]:.3g} "
                      f"({step_rows[-1]} rows)", flush=True)
            step += 1

    gathered: list[list[str]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, seen_ids)
    all_ids = [i for part in gathered for i in part]
    metrics = {
        "steps": step, "epochs": tp.epochs, "loss": losses, "lr": lrs, "rows_per_step": step_rows,
        "rows_seen": sum(step_rows), "unique_rows_seen": len(set(all_ids)), "kept_rows": n,
        "row_ids_sha256": hashlib.sha256("\n".join(sorted(set(all_ids))).encode()).hexdigest(),
        "world_size": world, "zero_stage": tp.zero_stage, "lora": tp.lora.enabled,
        "seconds": time.perf_counter() - t0,
    }
    # the weights: ZeRO-3 gathers the partitions (a collective), ZeRO 0-2 hold them whole on every rank
    state = engine._zero3_consolidated_16bit_state_dict() if tp.zero_stage == 3 else None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            lm = engine.module.lm
            if state is not None:
                state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
            lm.save_pretrained(os.path.join(tmp, "model"), state_dict=state)
            tokenizer.save_pretrained(os.path.join(tmp, "model"))
            Path(tmp, "metrics.json").write_text(json.dumps(metrics, indent=2))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"final_loss": losses[-1] if losses else float("nan"), "steps": step,
                          "rows_seen": metrics["rows_seen"]}, checkpoint=ckpt)


# ---------------------------------------------------------------- driver


def _ray_init() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True, configure_logging=False)


def run_training(cfg: TrainJobConfig) -> dict[str, Any]:
    """Manifest → TorchTrainer(DeepSpeed) on the kept rows → checkpoint, metrics.json, train_manifest.json."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    man = read_manifest(cfg)
    if not cfg.output:
        raise TrainError("output is not set")
    ofs, oroot = storage.filesystem(cfg.output, cfg.storage)
    done_path = storage.join(oroot, "train_manifest.json")
    ident = _run_identity(man, cfg)
    if storage.exists(ofs, done_path):
        prev = storage.read_json(ofs, done_path)
        if prev.get("identity") == ident:
            log.info("training already committed: %s", cfg.output)
            return prev
        raise TrainError(f"output {cfg.output!r} holds a different training run; use a new output prefix")
    parts, n = kept_parts(man, cfg)
    if n == 0:
        raise TrainError("the filter run kept no rows: nothing to train on")
    if n < cfg.scaling.num_workers:
        raise TrainError(f"{n} kept rows for {cfg.scaling.num_workers} workers: use fewer workers")
    model = ModelConfig.model_validate(man["config"]["model"])
    if cfg.model_path:
        model = model.model_copy(update={"path": cfg.model_path})
    storage.delete_dir(ofs, storage.join(oroot, "train"))  # a crashed attempt: start again from step 0
    backend = cfg.scaling.backend if cfg.scaling.backend != "auto" else ("nccl" if cfg.scaling.use_gpu else "gloo")
    loop_cfg = {
        "run": cfg.run, "storage_json": storage.resolved_json(cfg.storage), "parts": parts, "n_kept": n,
        "data": man["config"]["data"], "model": model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"), "use_gpu": cfg.scaling.use_gpu,
        "cpus_per_worker": cfg.scaling.cpus_per_worker,
    }
    _ray_init()
    mod = sys.modules[train_loop_per_worker.__module__]
    if mod.__name__ != "__main__":  # imported from pipelines/ (tests): workers cannot import it by name
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(mod)
    log.info("training on %d kept rows of %s (%d workers, ZeRO-%d, %s)", n, cfg.run, cfg.scaling.num_workers,
             cfg.train.zero_stage, "LoRA" if cfg.train.lora.enabled else "full")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(name="train", storage_path=oroot, storage_filesystem=ofs),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainError("training finished without a checkpoint")
    ckpt_fs, ckpt_path = result.checkpoint.filesystem, result.checkpoint.path
    with ckpt_fs.open_input_stream(storage.join(ckpt_path, "metrics.json")) as f:
        metrics = json.loads(f.read().decode())
    if not cfg.train.max_steps and (metrics["unique_rows_seen"] != n or metrics["rows_seen"] != n * cfg.train.epochs):
        raise TrainError(f"trainer saw {metrics['rows_seen']} rows ({metrics['unique_rows_seen']} distinct) "
                         f"for {n} kept rows × {cfg.train.epochs} epochs")
    storage.write_json(ofs, storage.join(oroot, "metrics.json"), metrics)
    ckpt_uri = ckpt_path if not cfg.output.startswith("s3://") else "s3://" + ckpt_path
    out = {
        "identity": ident,
        "checkpoint": ckpt_uri,
        "model_dir": storage.join(ckpt_uri, "model"),
        "metrics": storage.join(cfg.output, "metrics.json"),
        "rows_seen": metrics["rows_seen"], "kept_rows": n, "steps": metrics["steps"],
        "first_loss": metrics["loss"][0], "final_loss": metrics["loss"][-1],
        "config": cfg.public(),
    }
    storage.write_json(ofs, done_path, out)  # last: the commit marker of the training run
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML training config (see k8s/configmap.yaml, train.yaml)")
    ap.add_argument("--run", help="the filter run's output prefix (config: run)")
    ap.add_argument("--output", help="where the checkpoint and metrics go (config: output)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--check", action="store_true",
                    help="only check that the filter run is committed (manifest.json exists), print its counts")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = list(args.set)
    for flag in ("run", "output"):
        if getattr(args, flag):
            overrides.append(f"{flag}={json.dumps(getattr(args, flag))}")
    try:
        cfg = TrainJobConfig.from_yaml(args.config, overrides)
        if args.check:
            man = read_manifest(cfg)
            print(json.dumps({"run": cfg.run, "committed": True, "counts": man["counts"], "tau": man.get("tau")},
                             indent=2))
            return 0
        out = run_training(cfg)
        print(json.dumps({k: out[k] for k in ("checkpoint", "rows_seen", "kept_rows", "steps", "first_loss",
                                               "final_loss")}, indent=2))
        return 0
    except NotCommitted as e:
        print(f"filter_then_train: refusing to start: {e}", file=sys.stderr)
        return EXIT_NOT_COMMITTED
    except ValidationError as e:
        print(f"filter_then_train: invalid config:\n{e}", file=sys.stderr)
        return 2
    except (TrainError, ValueError, OSError) as e:
        print(f"filter_then_train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
