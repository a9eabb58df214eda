"""The scoring stage: load θ₀ and compute v once (setup), then score rows (process).

This is the object a Ray Data actor holds; it knows nothing about Ray or files.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from gradshield_ray import fihs, memory
from gradshield_ray.batching import collate, micro_batches
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.model import load_model, pad_id
from gradshield_ray.proxy import load_probes, probe_prefixes, reference_direction, resolve_pair
from gradshield_ray.render import Encoded, encode_messages
from gradshield_ray.scope import select_parameters, wrap_lora


class VerificationError(RuntimeError):
    """The batched method disagrees with the brute-force definition on this model."""


@dataclass
class ScoreStats:
    rows: int = 0
    tokens: int = 0  # of the rows as given (with score.answer_tokens only a prefix of each is computed)
    padded_tokens: int = 0  # positions actually computed, padding included
    seconds: float = 0.0
    oom_splits: int = 0  # micro-batches halved after torch.OutOfMemoryError (GPU)


class FIHSScorer:
    """Scores chat rows with FIHS against a frozen aligned model."""

    def __init__(self, cfg: GradShieldConfig):
        self.cfg = cfg
        sc = cfg.score
        model, self.tokenizer, self.device = load_model(cfg.model, cfg.storage)
        self.model = wrap_lora(model, sc) if sc.scope == "lora" else model
        self.params = select_parameters(self.model, sc.scope)
        self.pad = pad_id(self.tokenizer, self.model)
        prompts = load_probes(cfg.proxy)
        self.comply_id, self.refuse_id = resolve_pair(self.tokenizer, prompts, cfg.proxy)
        with fihs.LinearFactorCapture(self.model, self.params) as capture:
            self.v, self.s0 = reference_direction(
                self.model, self.params, probe_prefixes(self.tokenizer, prompts), self.comply_id,
                self.refuse_id, self.pad, self.device, cfg.proxy.batch_size,
            )
        self.v_norm = fihs.direction_norm(self.v)
        if not np.isfinite(self.v_norm) or self.v_norm == 0.0:
            raise ValueError(f"reference direction has norm {self.v_norm}: the probes' comply−refuse margin "
                             f"does not depend on scope {sc.scope!r}")
        self.n_probes = len(prompts)
        factors = capture.result() if sc.v_factors != "never" else None
        self.hooks = fihs.HookScorer(self.model, self.params, self.v, sc.normalize == "cosine", factors,
                                     sc.v_factors)
        self.budget_bytes = (sc.memory_budget_mb * 2**20 if sc.memory_budget_mb
                             else memory.default_budget_bytes(self.device))
        self.max_rows = functools.lru_cache(maxsize=None)(self._max_rows)  # per instance: frees with the scorer
        self.stats = ScoreStats()
        if sc.verify_rows:
            self.verify(self._verification_rows(prompts[: sc.verify_rows]))

    def _max_rows(self, tokens: int, method: str) -> int:
        """Rows of `tokens` padded positions per micro-batch within the memory budget (memory.rows_that_fit)."""
        head = self.model.get_output_embeddings().weight
        head_norms = (method == "hooks" and self.cfg.score.normalize == "cosine"
                      and any(p is head for p in self.params.values()))
        dtype = next(iter(self.params.values())).dtype
        return memory.rows_that_fit(self.model.config, dtype, self.budget_bytes, tokens, method,
                                    sum(p.numel() for p in self.params.values()), head_norms)

    def set_direction(self, v: dict[str, torch.Tensor]) -> None:
        """Score against another reference direction over the same scope (benchmarks that compare proxies);
        v's exact low-rank factors belong to the default proxy, so they are dropped."""
        if set(v) != set(self.params):
            raise ValueError("set_direction: v must cover exactly the scorer's scope parameters")
        self.v, self.v_norm = v, fihs.direction_norm(v)
        self.hooks = fihs.HookScorer(self.model, self.params, v, self.cfg.score.normalize == "cosine", None,
                                     "never")

    # ---------------------------------------------------------------- methods
    def _dots(self, batch, method: str):
        cos = self.cfg.score.normalize == "cosine"
        if method == "hooks":
            return self.hooks(batch)
        if method == "vmap":
            return fihs.vmap_grad(self.model, self.params, self.v, batch, cos)
        if method == "jvp":
            with torch.no_grad():
                return fihs.jvp_dots(self.model, self.params, self.v, batch), None
        singles = [collate([e], self.pad) .to(self.device) for e in _split(batch, self.pad)]
        return fihs.brute_force(self.model, self.params, self.v, singles, cos)

    def score_encoded(self, encoded: list[Encoded], method: str | None = None) -> np.ndarray:
        """FIHS per encoded example (float64; NaN/inf left as is for the caller to report)."""
        method = method or self.cfg.score.method
        sc = self.cfg.score
        input_tokens = sum(e.n_tokens for e in encoded)  # stats count the rows' tokens, not the scored cut
        if sc.answer_tokens:
            encoded = [e.opening(sc.answer_tokens) for e in encoded]
        out = np.empty(len(encoded), dtype=np.float64)
        t0 = time.perf_counter()
        fit = functools.partial(self.max_rows, method=method)
        for idx in micro_batches([e.n_tokens for e in encoded], sc.token_budget, sc.max_batch_size,
                                 sc.max_padding, fit):
            self._score_group(encoded, idx, method, out)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.rows += len(encoded)
        self.stats.tokens += input_tokens
        return out

    def score_canaries(self):
        """FIHS of the calibration canaries (gradshield_ray/canaries.py) with this scorer's θ₀, v and settings:
        the threshold's evidence of where harm lies for this score. Never written to any output."""
        from gradshield_ray import canaries
        from gradshield_ray.threshold import Canaries

        def scores(rows: list) -> np.ndarray:
            enc = [encode_messages(self.tokenizer, r, self.cfg.data.max_tokens, "right") for r in rows]
            return self.score_encoded(enc)

        stats = replace(self.stats)  # canaries are not corpus rows: the run's counters stay as they were
        try:
            return Canaries(harmful=scores(canaries.harmful_canaries(load_probes(self.cfg.proxy))),
                            benign=scores(canaries.benign_canaries()))
        finally:
            self.stats = stats

    def _score_group(self, encoded: list[Encoded], idx: list[int], method: str, out: np.ndarray) -> None:
        """Score one micro-batch into out[idx]; on a GPU out-of-memory error, free the cache and score the
        two halves instead (exact either way: rows never interact). One row that does not fit re-raises."""
        batch = collate([encoded[i] for i in idx], self.pad, self.cfg.score.padding_side).to(self.device)
        try:
            dots, sq = self._dots(batch, method)
        except torch.OutOfMemoryError:
            if len(idx) == 1:
                raise
            del batch
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.stats.oom_splits += 1
            half = len(idx) // 2
            self._score_group(encoded, idx[:half], method, out)
            self._score_group(encoded, idx[half:], method, out)
            return
        out[idx] = fihs.finalize(dots, sq, self.v_norm)
        self.stats.padded_tokens += batch.input_ids.numel()

    # ---------------------------------------------------------------- verification
    def _verification_rows(self, prompts: list[str]) -> list[Encoded]:
        reply = f"{self.cfg.proxy.comply or 'Well'}, {self.cfg.proxy.refuse} will answer that."
        return [encode_messages(self.tokenizer, [{"role": "user", "content": p},
                                                 {"role": "assistant", "content": reply}],
                                self.cfg.data.max_tokens, "right") for p in prompts]

    def verify(self, rows: list[Encoded]) -> None:
        """Fail fast when the configured method disagrees with the definition on this architecture."""
        from gradshield_ray.loss import per_example_loss, reference_loss

        batch = collate(rows, self.pad, self.cfg.score.padding_side).to(self.device)
        with torch.no_grad():
            ours, ref = per_example_loss(self.model, batch), reference_loss(self.model, batch)
        if not torch.allclose(ours, ref, rtol=1e-3, atol=1e-5):
            raise VerificationError(f"packed loss {ours.tolist()} != model loss {ref.tolist()}: "
                                    "this architecture post-processes logits in a way the scorer does not know")
        method = self.cfg.score.method
        if method == "brute":
            return
        fast = self.score_encoded(rows, method)
        slow = self.score_encoded(rows, "brute")
        err = float(np.max(np.abs(fast - slow)))
        scale = float(np.max(np.abs(slow)))
        rtol = self.cfg.score.verify_rtol or (1e-4 if self.cfg.model.dtype == "float32" else 5e-2)
        if not err <= rtol * max(scale, 1e-30):
            raise VerificationError(f"score.method={method} differs from brute force by {err:.3g} "
                                    f"(scale {scale:.3g}); use score.method=jvp (exact, dot products only, "
                                    "much faster than brute) or score.method=brute for this model")
        self.stats = ScoreStats()


def _split(batch, pad: int) -> list[Encoded]:
    """A padded batch back into its rows (for the brute-force method)."""
    out = []
    for b in range(batch.size):
        m = batch.attention_mask[b].bool()
        ids = batch.input_ids[b][m].tolist()
        lab = batch.labels[b][m].tolist()
        mask = [False] + [x != -100 for x in lab[:-1]]
        out.append(Encoded(ids, mask, False))
    return out
