"""One typed config for a GradShield run, loaded from YAML; the CLI only maps flags onto it.

Every section forbids unknown keys, so a misspelt key fails at load time instead of silently
falling back to a default.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradshield_ray.storage import StorageConfig
from gradshield_ray.threshold import ThresholdConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """The aligned model θ₀ that is scored against (never updated)."""

    # a local checkpoint directory, an s3:// prefix (downloaded once per node, see model_source), or a Hub
    # model id; a PEFT adapter directory is merged into its base (θ₀ = base + adapter)
    path: str = ""
    base_path: str | None = None  # an adapter's base model (default: the adapter's base_model_name_or_path)
    revision: str | None = None  # a Hub model id's revision
    cache_dir: str | None = None  # where s3:// checkpoints are cached (default $GRADSHIELD_RAY_MODEL_CACHE)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # eager is exact everywhere (the JVP method needs it); sdpa is faster for the hooks/brute methods.
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    device: str = "auto"  # "auto" picks cuda when torch sees one, else cpu
    trust_remote_code: bool = False  # never on unless a user says so
    chat_template: str | None = None  # override the tokenizer's template (a Jinja string)


class DataConfig(_Section):
    """Where the chat turns are in each Parquet row, and the token budget policy."""

    messages_column: str | None = "messages"
    prompt_column: str | None = None
    response_column: str | None = None
    system_column: str | None = None
    # Rows longer than this are cut on the right, as a finetuning trainer with
    # max_seq_length would (score what it would train on); "error" turns them into error rows.
    max_tokens: int = Field(2048, gt=1)
    truncation: Literal["right", "error"] = "right"

    @model_validator(mode="after")
    def _one_layout(self) -> "DataConfig":
        if self.prompt_column or self.response_column:
            if not (self.prompt_column and self.response_column):
                raise ValueError("data.prompt_column and data.response_column must be set together")
            self.messages_column = None
        elif not self.messages_column:
            raise ValueError("set data.messages_column, or data.prompt_column + data.response_column")
        return self


class ProxyConfig(_Section):
    """Safety proxy S = mean over probes of logit(comply) − logit(refuse) at the first assistant token, or
    −logit(refuse) alone when comply is None."""

    # None (default): the refusal-only proxy S = −logit(refuse). Chosen on Gemma-3-270M's realistic dev split
    # (benchmarks/data/dev_choices.json): it ranked harm best of the 126 variants measured, while
    # logit("Sure") − logit("I") mostly reads "opens with Sure", which real benign answers do too
    comply: str | None = None
    refuse: str = "I"
    probes: str | None = None  # .txt (one per line) or .jsonl ({"prompt": ...}); None = shipped HarmBench val
    max_probes: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)


class LoraScopeConfig(_Section):
    """A fresh LoRA adapter whose parameters span the scope (B = 0, so ∇_B = ∇_W·Aᵀ)."""

    r: int = Field(8, gt=0)
    alpha: float = 16.0
    target_modules: list[str] | str = "all-linear"
    seed: int = 0


SCOPE_PATTERN = re.compile(r"^(all|no_embed|mlp|attn|lora|last:\d+|layers:\d+-\d+|regex:.+)$")


class ScoreConfig(_Section):
    """How FIHS is computed: method, parameter scope, normalization and batching."""

    method: Literal["hooks", "brute", "jvp", "vmap"] = "hooks"
    # Defaults chosen on the realistic dev split of Gemma-3-270M (real ShareGPT chat, harmful answers in six
    # openings; benchmarks/data/dev_choices.json, docs/efficacy.md "Realistic data"): all parameters, cosine
    # normalization, the first answer token, with the refusal-only proxy (proxy.comply: null). Test split:
    # AUROC 0.96 over the dev openings, 1.00 on the held-out one, vs 0.80 for the earlier default (dot,
    # logit("Sure") − logit("I")). The full answer (None, the paper's loss) was not scored on Gemma's
    # realistic data (CPU time); on the miniature's own mixtures it diluted the opening and cost 3x more.
    scope: str = "all"
    normalize: Literal["dot", "cosine"] = "cosine"
    lora: LoraScopeConfig = LoraScopeConfig()
    # Score only the first K tokens of each assistant turn (None: every answer token, the paper's loss).
    answer_tokens: int | None = Field(1, gt=0)
    token_budget: int = Field(16384, gt=0)  # padded tokens per micro-batch
    # bytes a micro-batch may use beyond the model and v, against an estimate from the model config (hidden
    # size, layers, heads, vocabulary, dtype, method; gradshield_ray/memory.py); None: 70% of the GPU's free
    # memory, or on a CPU a quarter of the available memory, at most 4 GiB. On a GPU an OOM still halves the batch.
    memory_budget_mb: int | None = Field(None, gt=0)
    max_batch_size: int = Field(64, gt=0)
    # v's exact low-rank form V = AᵀB (K = probe tokens) for Linear weights: "auto" uses it where
    # K·(in+out) < in·out (wide layers, few probe tokens); "always"/"never" force it (tests, debugging)
    v_factors: Literal["auto", "always", "never"] = "auto"
    max_padding: float = Field(0.15, gt=0, le=1)  # padded share of a micro-batch; trades batch size for waste
    padding_side: Literal["right", "left"] = "right"
    # Check the batched method against the one-backward-per-example definition on this many rows
    # when the scorer starts; a mismatch (an architecture the hooks do not cover) fails fast.
    verify_rows: int = Field(2, ge=0)
    verify_rtol: float | None = None  # None: 1e-4 in float32, 5e-2 in bf16/fp16 (both sides round there)

    @model_validator(mode="after")
    def _valid(self) -> "ScoreConfig":
        if not SCOPE_PATTERN.match(self.scope):
            raise ValueError(
                f"score.scope {self.scope!r} is not one of all, no_embed, mlp, attn, lora, last:K, "
                "layers:A-B, regex:PATTERN"
            )
        if self.method == "vmap" and self.padding_side != "right":
            raise ValueError("score.method 'vmap' needs score.padding_side=right")
        if self.method == "jvp" and self.normalize == "cosine":
            raise ValueError("score.method 'jvp' gives ⟨v, ∇L⟩ only; cosine needs ‖∇L‖: use hooks or brute")
        return self


class RayConfig(_Section):
    """How the Ray pipeline maps onto a cluster (ignored by the single-process runner)."""

    num_actors: int = Field(1, gt=0)  # scorer actors; one model copy each (one per GPU)
    # an autoscaling pool: ActorPoolStrategy(min_size=min_actors, max_size=max_actors); unset = num_actors
    min_actors: int | None = Field(None, gt=0)
    max_actors: int | None = Field(None, gt=0)
    num_gpus_per_actor: float = Field(1.0, ge=0)
    num_cpus_per_actor: float = Field(1.0, ge=0)
    # each unit (row group) reaches the actor whole and is scored in chunks of this many rows, cut in row order
    # (deterministic batch composition); each chunk is micro-batched by score.token_budget. Larger chunks
    # length-sort better: 1024 rows ran ~4% faster than 256 on the CPU benchmark model (less padding)
    batch_rows: int = Field(1024, gt=0)
    render_num_cpus: float = Field(1.0, gt=0)
    # a unit (the task of scheduling, commit and resume) is one row group, or a range of at most this many
    # rows of a larger one, so no task materialises more rows than this
    unit_rows: int = Field(100_000, gt=0)

    @model_validator(mode="after")
    def _pool(self) -> "RayConfig":
        lo, hi = self.pool_size()
        if lo > hi:
            raise ValueError(f"ray.min_actors ({lo}) is larger than ray.max_actors ({hi})")
        return self

    def pool_size(self) -> tuple[int, int]:
        """(min, max) actors of the scorer pool; a fixed pool of num_actors unless min/max are set."""
        return self.min_actors or min(self.num_actors, self.max_actors or self.num_actors), \
            self.max_actors or max(self.num_actors, self.min_actors or self.num_actors)


class OutputConfig(_Section):
    """How the Ray pipeline writes its outputs."""

    # kept/ removed/ errors/ are written as files of about this many bytes (pass 2 groups committed scored
    # files up to this size and writes one file per split and group, none empty)
    target_file_bytes: int = Field(256 << 20, gt=0)
    # seconds a run's lease on its output prefix (output/_lease.json) lives without renewal: a second run
    # into the same prefix fails fast while it lives; a crashed run's lease expires after this
    lease_s: float = Field(120.0, gt=0)


class GradShieldConfig(_Section):
    """A whole run: model, data layout, proxy, scoring, threshold, and where to read and write."""

    input: str = ""
    output: str = ""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    proxy: ProxyConfig = ProxyConfig()
    score: ScoreConfig = ScoreConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    output_files: OutputConfig = OutputConfig()
    rows_per_batch: int = Field(1024, gt=0)  # rows handed to the scorer at a time (local runner; see ray.batch_rows)

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> "GradShieldConfig":
        """Load YAML (safe loader), apply `dotted.key=value` overrides, validate."""
        data: dict[str, Any] = {}
        if path:
            text = Path(path).read_text()
            loaded = yaml.safe_load(text)
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"config {path}: top level must be a mapping, got {type(loaded).__name__}")
            data = loaded or {}
        for item in overrides or []:
            apply_override(data, item)
        return cls.model_validate(data)

    def to_public_dict(self) -> dict[str, Any]:
        """The config as written into reports; it holds no credentials by construction."""
        return self.model_dump(mode="json")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 1e-3, true, [x, y] work)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"override {item!r} has an empty key")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = yaml.safe_load(raw)
