"""What exact FIHS costs, by method and scope, against one standard training epoch on the same data.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fihs.py [--rows 64] [--repeats 3] [--vocab 8000]

One process, one model (random-init Llama; `--shape small` is hidden 256, 4 layers, vocab 8k as in
PROTOTYPE_FINDINGS §A, `--shape wide` is hidden 1024 with an untied head; fp32; timings do not depend on the
weights), v computed for real on 41 synthetic probe prompts of 24 tokens, the same rows (lengths 64..256, about half of each row is the assistant response), the same token
budget. Timings are medians over repeats, with the methods interleaved in each repeat so that load on this
shared 2-core box hits all of them alike. Peak memory is measured per method in a fresh subprocess: resident
memory sampled every 2 ms while one pass runs, above the resident memory with model and data loaded.

Baselines:
- epoch: an HF-Trainer-like epoch: batches of 8 in data order, padded, logits at every position,
  forward + backward + AdamW step;
- epoch_sorted: the same with length-sorted batches (the tricks FIHS uses, given to training too);
- loop: the per-example loop (batch of one, backward, dot with v), as LESS-style tools compute features.
Methods: hooks (default; v's low-rank factors where they are cheaper, and only v's nonzero rows of the LM head /
tied embedding), hooks_dense (factors off), hooks_rows_off (the head contracted with all of v's rows), jvp, vmap;
then hooks per scope, and hooks on each row's opening (score.answer_tokens = 1, 3: the row is cut after the
first k answer tokens, so the answer's remaining tokens cost nothing; tokens/s counts the full rows).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from gradshield_ray import fihs
from gradshield_ray.batching import collate, micro_batches
from gradshield_ray.render import Encoded
from gradshield_ray.scope import select_parameters, wrap_lora

METHODS = ["epoch", "epoch_sorted", "loop", "hooks", "hooks_dense", "hooks_rows_off", "jvp", "vmap"]
SCOPES = ["no_embed", "mlp", "layers:1-2", "last:1", "lora"]
ANSWER_TOKENS = [1, 3]  # score.answer_tokens: tokens/s still counts every token of the full rows


SHAPES = {  # small: PROTOTYPE_FINDINGS §A's model; wide: Llama-like proportions where v's factors pay off
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, tie_word_embeddings=True),
    "wide": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=8, tie_word_embeddings=False),
}


def make_model(vocab: int, shape: str = "small"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, pad_token_id=0, attn_implementation="eager", max_position_embeddings=512,
                      **SHAPES[shape])
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def make_rows(n: int, vocab: int, seed: int = 0) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(64, 257))
        prompt = int(length * rng.uniform(0.3, 0.7))
        ids = rng.integers(1, vocab, size=length).tolist()
        rows.append(Encoded(ids, [False] * prompt + [True] * (length - prompt), False))
    return rows


def direction(model, params, n_probes: int = 41, probe_len: int = 24):
    """The real v = ∇S on synthetic probe prompts (its cost and rank are what matter here), with the
    exact low-rank factors of its Linear weights (K = probe tokens)."""
    from gradshield_ray.proxy import reference_direction

    rng = np.random.default_rng(2)
    vocab = model.config.vocab_size
    prefixes = [rng.integers(3, vocab, size=probe_len).tolist() for _ in range(n_probes)]
    with fihs.LinearFactorCapture(model, params) as cap:
        v, _ = reference_direction(model, params, prefixes, 1, 2, 0, torch.device("cpu"), 8)
    return v, cap.result()


def fihs_batches(rows, budget, max_padding=0.15):
    lengths = [r.n_tokens for r in rows]
    return [collate([rows[i] for i in idx], 0, "right") for idx in micro_batches(lengths, budget, 64, max_padding)]


def run_method(name: str, model, rows, budget: int, scope: str = "all", answer_tokens: int | None = None):
    """One full pass of a method over the rows; returns (seconds, padded tokens). answer_tokens=k scores each
    row's opening (score.answer_tokens): the cut happens before the clock starts, as in the scorer, where
    it is a list slice per row."""
    if answer_tokens:
        rows = [r.opening(answer_tokens) for r in rows]
    if name.startswith("epoch"):
        order = sorted(range(len(rows)), key=lambda i: rows[i].n_tokens) if name == "epoch_sorted" else list(
            range(len(rows)))
        batches = [collate([rows[i] for i in order[k:k + 8]], 0, "right") for k in range(0, len(rows), 8)]
        model.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        t = time.perf_counter()
        for b in batches:
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=_hf_labels(b))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        model.requires_grad_(False)
        return dt, sum(b.input_ids.numel() for b in batches)
    if scope == "lora":
        model = wrap_lora(model, _lora_cfg())
    params = select_parameters(model, scope)
    v, factors = direction(model, params)
    if name == "loop":
        singles = [collate([r], 0) for r in rows]
        t = time.perf_counter()
        fihs.brute_force(model, params, v, singles, cosine=False)
        return time.perf_counter() - t, sum(r.n_tokens for r in rows)
    batches = fihs_batches(rows, budget)
    t = time.perf_counter()
    if name in ("hooks", "hooks_dense", "hooks_rows_off"):
        hs = fihs.HookScorer(model, params, v, cosine=False, factors=factors,
                             use_factors="never" if name == "hooks_dense" else "auto")
        sparse, fihs.SPARSE_ROWS = fihs.SPARSE_ROWS, (0.0 if name == "hooks_rows_off" else fihs.SPARSE_ROWS)
        try:
            for b in batches:
                hs(b)
        finally:
            fihs.SPARSE_ROWS = sparse
    elif name == "jvp":
        with torch.no_grad():
            for b in batches:
                fihs.jvp_dots(model, params, v, b)
    elif name == "vmap":
        for b in batches:
            fihs.vmap_grad(model, params, v, b, cosine=False, chunk_size=4)
    dt = time.perf_counter() - t
    if scope == "lora":
        model.unload()
    return dt, sum(b.input_ids.numel() for b in batches)


def _hf_labels(b):
    # HF shifts labels itself: label[t] is the token at t, trained where the row's loss mask is on
    lab = torch.full_like(b.input_ids, -100)
    lab[:, 1:] = b.labels[:, :-1]
    return lab


def _lora_cfg():
    from gradshield_ray.config import ScoreConfig

    return ScoreConfig(scope="lora")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def rss_peak_mib(fn) -> float:
    """Peak resident memory while fn() runs, above the resident memory before it, sampled every 2 ms.
    (ru_maxrss cannot be used: model construction peaks above most methods, so its growth reads 0.)"""
    import gc
    import threading

    gc.collect()
    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _rss_mib()) - base


def peak_memory(name: str, scope: str, k: int | None, args) -> float:
    """MiB of ru_maxrss growth caused by one pass of the method, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--peak", name, "--peak-scope", scope,
                          "--peak-answer-tokens", str(k or 0), "--rows", str(args.rows),
                          "--vocab", str(args.vocab), "--budget", str(args.budget), "--shape", args.shape], capture_output=True, text=True)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--peak")
    ap.add_argument("--peak-scope", default="all")
    ap.add_argument("--peak-answer-tokens", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = make_model(args.vocab, args.shape)
    rows = make_rows(args.rows, args.vocab)
    if args.peak:  # the method's own peak (v included): sampled RSS above the RSS with model + data loaded
        print(rss_peak_mib(lambda: run_method(args.peak, model, rows, args.budget, args.peak_scope,
                                              args.peak_answer_tokens or None)))
        return
    real = sum(r.n_tokens for r in rows)
    mid = model.config.num_hidden_layers // 2
    scopes = [s if s != "layers:1-2" else f"layers:{max(mid - 1, 0)}-{mid}" for s in SCOPES]
    plan = [(m, "all", None) for m in METHODS] + [("hooks", s, None) for s in scopes]
    plan += [("hooks", "all", k) for k in ANSWER_TOKENS]
    times: dict[tuple[str, str, int | None], list[float]] = {k: [] for k in plan}
    padded: dict[tuple[str, str, int | None], int] = {}
    for m, s, k in plan:  # warm-up
        run_method(m, model, rows[:8], args.budget, s, k)
    for _ in range(args.repeats):
        for m, s, k in plan:
            dt, pt = run_method(m, model, rows, args.budget, s, k)
            times[(m, s, k)].append(dt)
            padded[(m, s, k)] = pt
    med = {key: statistics.median(v) for key, v in times.items()}
    epoch, loop, sorted_ = med[("epoch", "all", None)], med[("loop", "all", None)], med[("epoch_sorted", "all", None)]
    print(f"{args.rows} rows, {real} tokens, vocab {args.vocab}, shape {args.shape} {SHAPES[args.shape]}, fp32, 1 thread, "
          f"token budget {args.budget}; medians of {args.repeats}")
    print("| method | scope | answer_tokens | s / 1k rows | tokens/s | × epoch | × epoch_sorted | × loop | padding | "
          "peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (m, s, k) in plan:
        t = med[(m, s, k)]
        pad = f"{1 - real / padded[(m, s, k)]:.1%}" if padded[(m, s, k)] and not k else "–"  # k: rows are cut
        mem = float("nan") if args.no_memory else peak_memory(m, s, k, args)
        print(f"| {m} | {s} | {k or 'full'} | {1000 * t / args.rows:.2f} | {real / t:.0f} | {t / epoch:.2f} | "
              f"{t / sorted_:.2f} | {t / loop:.2f} | {pad} | {mem:.0f} |")
    print(json.dumps({f"{m}/{s}/{k or 'full'}": round(v, 4) for (m, s, k), v in med.items()}))


if __name__ == "__main__":
    main()
