"""GradShield as a component of your own Ray Data pipeline.

    import ray, gradshield_ray as gs
    shield = gs.GradShield(gs.GradShieldConfig.from_yaml("gradshield.yaml"))
    scored = shield.score(ds).materialize()         # every column + fihs and the gs_* columns
    decision = shield.threshold(scored)             # τ and its evidence (one mergeable-summary reduce)
    kept, removed, errors = shield.split(scored, decision)
    kept.write_parquet("s3://bucket/clean/")        # or hand `kept` to a Ray Train trainer

The stages are the ones the resumable runner (`gradshield-ray run`) uses: stages.render_batch (CPU) and
stages.ScoreActor (an actor pool; the model and v load once per actor), SummaryAgg for the reduce, and
tables.split_table for the split. `score` is lazy like any Dataset: threshold and split each execute it,
so materialize it (or write it and read it back) once before both, or the rows are scored twice.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from gradshield_ray.config import GradShieldConfig
from gradshield_ray.render import required_columns
from gradshield_ray.storage import StorageConfig, resolved_json
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.tables import split_table
from gradshield_ray.threshold import ThresholdDecision, decide

if TYPE_CHECKING:
    import ray.data


def _split(batch: pa.Table, tau: float, name: str) -> pa.Table:
    return split_table(batch, tau)[name]


class GradShield:
    """FIHS scoring and the adaptive threshold over any ray.data.Dataset whose rows hold a chat
    (data.messages_column, or data.prompt_column + data.response_column): read_parquet, read_json,
    from_huggingface, gs.read_jsonl, or the output of earlier stages. Input columns pass through unchanged.

    config: a GradShieldConfig, a dict of its fields, or the path of a YAML file. Its input/output fields
    are not used here (you read and write the Datasets); model, data, proxy, score, threshold, storage (for
    an s3:// model) and ray (actor pool size, GPUs per actor, rows per scorer call) are."""

    def __init__(self, config: GradShieldConfig | dict[str, Any] | str | Path):
        if isinstance(config, (str, Path)):
            config = GradShieldConfig.from_yaml(config)
        elif isinstance(config, dict):
            config = GradShieldConfig.model_validate(config)
        self.config = config
        # what workers get: the config with storage credentials resolved on the driver (as the runner does)
        self._worker_cfg = config.model_copy(
            update={"storage": StorageConfig.model_validate_json(resolved_json(config.storage))})

    def check(self) -> None:
        """Fail in seconds, here, for a model, template or probe set the actors could not use."""
        from gradshield_ray.ray_pipeline import preflight

        preflight(self.config)

    def score(self, ds: "ray.data.Dataset") -> "ray.data.Dataset":
        """Lazy: ds's rows plus fihs (null for error rows), gs_n_tokens, gs_n_loss_tokens, gs_truncated and
        gs_error (why a row could not be scored, with how to fix it). Rendering runs as CPU tasks, scoring
        in an actor pool of ray.num_actors actors (ray.num_gpus_per_actor each), ray.batch_rows rows per
        scorer call."""
        import ray

        from gradshield_ray.stages import ScoreActor, render_batch

        self.check()
        missing = [c for c in required_columns(self.config.data) if c not in ds.columns()]
        if missing:
            raise ValueError(f"dataset has no column(s) {missing} (columns: {ds.columns()}); set data.messages_column "
                             "or data.prompt_column/response_column")
        rc = self.config.ray
        rendered = ds.map_batches(render_batch, batch_format="pyarrow", fn_kwargs=dict(cfg=self._worker_cfg),
                                  num_cpus=rc.render_num_cpus)
        return rendered.map_batches(ScoreActor, batch_size=rc.batch_rows, batch_format="pyarrow",
                                    fn_constructor_kwargs=dict(cfg=self._worker_cfg),
                                    compute=ray.data.ActorPoolStrategy(size=rc.num_actors),
                                    num_gpus=rc.num_gpus_per_actor, num_cpus=rc.num_cpus_per_actor)

    def summarize(self, scored: "ray.data.Dataset") -> ScoreSummary:
        """The mergeable score summary of a scored Dataset (one Ray Data aggregate; O(bins) memory)."""
        from gradshield_ray.stages import SummaryAgg, collect

        agg = collect(lambda: scored.select_columns(["fihs"]).aggregate(SummaryAgg.build()))
        return ScoreSummary.from_dict(agg["summary"]) if agg and agg.get("summary") else ScoreSummary.empty()

    def threshold(self, scored: "ray.data.Dataset") -> ThresholdDecision:
        """τ for the whole Dataset by the configured policy, with its evidence (decision.tau,
        decision.evidence; with threshold.canaries on, the calibration canaries are scored in one Ray task
        and `separation_verdict(decision.evidence)` says whether the score separates harm on this model);
        rows with fihs > τ are removed."""
        from gradshield_ray.stages import cluster_canaries

        return decide(self.summarize(scored), self.config.threshold, cluster_canaries(self.config))

    def split(self, scored: "ray.data.Dataset", decision: ThresholdDecision | float
              ) -> tuple["ray.data.Dataset", "ray.data.Dataset", "ray.data.Dataset"]:
        """Lazy (kept, removed, errors): fihs ≤ τ, fihs > τ, and rows without a score (gs_error says why).
        Every scored row is in exactly one of them."""
        tau = decision.tau if isinstance(decision, ThresholdDecision) else float(decision)
        return tuple(scored.map_batches(_split, batch_format="pyarrow", fn_kwargs=dict(tau=tau, name=name))
                     for name in ("kept", "removed", "errors"))  # type: ignore[return-value]


def _read_jsonl_files(batch: pa.Table, storage_json: str, required: list[str]) -> pa.Table:
    from gradshield_ray import jsonl, storage

    out = []
    for path, rel in zip(batch["path"].to_pylist(), batch["rel"].to_pylist()):
        fs, inner = storage.filesystem(path, StorageConfig.model_validate_json(storage_json))
        out.append(jsonl.read_file(fs, inner, rel, required, nested_as_json=True))
    return pa.concat_tables(out, promote_options="permissive")


def read_jsonl(paths: str | list[str], config: GradShieldConfig | None = None) -> "ray.data.Dataset":
    """A Dataset of JSONL files (*.jsonl, *.json lines, *.gz; local or s3://, a file or a prefix): one row per
    line, gs_row_id = file:line, and a malformed line is a row whose gs_json_error says why (score() turns
    it into an error row; nothing is dropped, unlike ray.data.read_json, which fails the whole read). Nested
    values (messages) are kept as JSON text so that files with different shapes share one schema."""
    import ray

    from gradshield_ray import jsonl, storage

    cfg = config or GradShieldConfig()
    files: list[dict[str, str]] = []
    for p in [paths] if isinstance(paths, str) else paths:
        fs, root = storage.filesystem(p, cfg.storage)
        found = storage.list_files(fs, root)
        if not found:
            raise FileNotFoundError(f"{p!r} does not exist or holds no files")
        base = root if len(found) > 1 or found[0] != root else os.path.dirname(root)
        scheme = "s3://" if p.startswith("s3://") else ""
        files += [{"path": scheme + f, "rel": os.path.relpath(f, base)} for f in found if jsonl.is_jsonl(f)]
    if not files:
        raise FileNotFoundError(f"no *.jsonl / *.json / *.gz JSON Lines files under {paths!r}")
    return ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        _read_jsonl_files, batch_size=1, batch_format="pyarrow",
        fn_kwargs=dict(storage_json=resolved_json(cfg.storage), required=required_columns(cfg.data)))
