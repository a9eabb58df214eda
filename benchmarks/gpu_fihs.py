"""FIHS on a GPU at the 8B shape: tokens/s and MFU of a training step vs each exact FIHS method.

Prepared for a lent GPU machine (torch, transformers and peft there; no ray, nothing downloadable):

    python benchmarks/gpu_fihs.py                      # Llama-3.1-8B shape, bf16, seq 512 and 2048, < 5 min
    python benchmarks/gpu_fihs.py --shape tiny --device cpu --seqs 64 --steps 1   # smoke test anywhere

The model is built from a config with random weights (timings do not depend on the weights). It imports only
gradshield_ray.fihs/batching/loss/proxy (torch + transformers). FLOPs per token, N = non-embedding parameters
plus the LM head at the positions where it runs:
- train step: 6N (forward 2N, backward 4N) + AdamW, full logits at every position;
- hooks: forward 2N + backward to activations 2N + the ⟨δ, V·x⟩ contraction (2N dense, 2·K·(in+out) per layer
  with v's low-rank factors) — MFU counts these FLOPs;
- loop: the same per row, batch of one (the LESS-style per-example loop).
MFU = counted FLOP/s / peak bf16 dense FLOP/s (H100 SXM 989e12, H200 989e12; --peak overrides).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from gradshield_ray import fihs
from gradshield_ray.batching import collate
from gradshield_ray.proxy import reference_direction
from gradshield_ray.render import Encoded

SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}


def build(shape: str, layers: int | None, device: str, dtype: torch.dtype, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw, max_position_embeddings=8192, pad_token_id=0, attn_implementation=attn)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def rows(n: int, seq: int, vocab: int, response: float = 0.5) -> list[Encoded]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        p = int(seq * (1 - response))
        out.append(Encoded(ids, [False] * p + [True] * (seq - p), False))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, steps: int) -> float:
    fn()  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def flops(model, seq: int, factors: dict | None, head_rows: int | None = None) -> dict[str, float]:
    """Per-token FLOPs of a train step and of the hooks method (attention score FLOPs included).
    head_rows: v's nonzero rows of the LM head, over which the hooks contract it (fihs.HookScorer)."""
    c = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    head = c.vocab_size * c.hidden_size
    attn = 2 * 2 * c.num_hidden_layers * seq * c.hidden_size / 2  # QKᵀ and AV, causal half, per token
    contraction = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight is not model.lm_head.weight:
            f = (factors or {}).get(id(m.weight))
            k = f[0].shape[0] if f is not None else None
            dense = m.in_features * m.out_features
            contraction += 2 * (min(dense, k * (m.in_features + m.out_features)) if k else dense)
    resp = 0.5  # the LM head runs at response positions only in FIHS
    f_lm = getattr(model.lm_head, "weight")
    k_lm = (factors or {}).get(id(f_lm))
    options = [head] + ([k_lm[0].shape[0] * (c.vocab_size + c.hidden_size)] if k_lm is not None else [])
    head_contr = 2 * min(options + ([head_rows * c.hidden_size] if head_rows is not None else []))
    return {
        "train": 6 * (body + head) + 3 * attn,
        "hooks": 4 * body + 2 * attn + contraction + resp * (4 * head + head_contr),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers if memory is short (MFU barely moves)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seqs", default="512,2048")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--loop-rows", type=int, default=2)
    ap.add_argument("--peak", type=float, default=989e12)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    model = build(args.shape, args.layers, args.device, dtype, args.attn)
    dev = torch.device(args.device)
    seqs = [int(x) for x in args.seqs.split(",")]
    results = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "shape": args.shape,
               "layers": model.config.num_hidden_layers, "dtype": str(dtype), "runs": []}
    batches = {}
    for seq in seqs:
        bsz = max(1, args.tokens // seq)
        data = rows(bsz, seq, model.config.vocab_size)
        batches[seq] = (data, collate(data, 0).to(dev))

    # phase 1: training steps (optimizer state and gradients are freed before v exists: 8B fits in 80 GB)
    train_s: dict[int, float | None] = {}
    opt = torch.optim.AdamW(list(model.parameters()), lr=0.0, foreach=True)
    for seq in seqs:
        batch = batches[seq][1]

        def train_step():
            model.requires_grad_(True)
            out = model(input_ids=batch.input_ids, labels=batch.input_ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.requires_grad_(False)

        try:
            train_s[seq] = timed(train_step, args.device, args.steps)
        except torch.OutOfMemoryError:
            train_s[seq] = None
            model.requires_grad_(False)
        print(json.dumps({"seq": seq, "train_s": train_s[seq]}), flush=True)
    opt = None  # frees the optimizer state before v exists
    for p in model.parameters():
        p.grad = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # phase 2: v once (with its low-rank factors), then each FIHS method
    params = dict(model.named_parameters())
    probes = [torch.randint(3, model.config.vocab_size, (24,)).tolist() for _ in range(41)]
    with fihs.LinearFactorCapture(model, params) as cap:
        v, _ = reference_direction(model, params, probes, 1, 2, 0, dev, 8)
    v = {n: t.to(dtype) for n, t in v.items()}  # v in the model's dtype on the GPU (memory)
    factors = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in cap.result().items()}
    hooks = fihs.HookScorer(model, params, v, cosine=False, factors=factors)
    hooks_dense = fihs.HookScorer(model, params, v, cosine=False, factors=None, use_factors="never")
    nz = hooks._sparse_rows(model.lm_head.weight)
    head_rows = None if nz is None else nz.numel()
    for seq in seqs:
        data, batch = batches[seq]
        bsz, ntok = len(data), len(data) * seq
        res = {"seq": seq, "batch": bsz, "train_s": train_s[seq]}
        res["hooks_s"] = timed(lambda: hooks(batch), args.device, args.steps)
        res["hooks_dense_s"] = timed(lambda: hooks_dense(batch), args.device, args.steps)
        # the product default, score.answer_tokens = 1: each row cut after its first answer token
        cut = collate([d.opening(1) for d in data], 0).to(dev)
        res["hooks_k1_s"] = timed(lambda: hooks(cut), args.device, args.steps)
        res["hooks_k1_rows_s"] = bsz / res["hooks_k1_s"]
        singles = [collate([d], 0).to(dev) for d in data[: args.loop_rows]]
        res["loop_s_per_row"] = timed(lambda: fihs.brute_force(model, params, v, singles, False), args.device,
                                      1) / len(singles)
        fl = {"train": flops(model, seq, factors)["train"], "hooks": flops(model, seq, factors, head_rows)["hooks"],
              "hooks_dense": flops(model, seq, None, head_rows)["hooks"]}
        for k in ("train", "hooks", "hooks_dense"):
            sec = res.get(f"{k}_s")
            if sec:
                res[f"{k}_tok_s"] = ntok / sec
                res[f"{k}_mfu"] = fl[k] * ntok / sec / args.peak
        res["hooks_vs_train"] = res["hooks_s"] / res["train_s"] if res.get("train_s") else None
        res["loop_vs_hooks"] = res["loop_s_per_row"] * bsz / res["hooks_s"]
        if dev.type == "cuda":
            res["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        results["runs"].append(res)
        print(json.dumps(res), flush=True)
    results["seconds"] = time.perf_counter() - t0
    print("| seq | batch | train tok/s | train MFU | hooks tok/s | hooks MFU | hooks/train time | loop/hooks time | "
          "hooks K=1 / train time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        tr = f"{r['train_tok_s']:.0f} | {r['train_mfu']:.1%}" if r.get("train_s") else "OOM | -"
        ratio = f"{r['hooks_vs_train']:.2f}" if r.get("hooks_vs_train") else "-"
        k1 = f"{r['hooks_k1_s'] / r['train_s']:.2f}" if r.get("train_s") else "-"
        print(f"| {r['seq']} | {r['batch']} | {tr} | {r['hooks_tok_s']:.0f} | {r['hooks_mfu']:.1%} | {ratio} | "
              f"{r['loop_vs_hooks']:.1f}× | {k1} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
