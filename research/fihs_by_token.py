"""Where in the answer does FIHS see harm? Per-answer-token contributions on the miniature.

    OMP_NUM_THREADS=1 .venv/bin/python -m research.fihs_by_token [--mixture implicit] [--tokens 24]

FIHS with `score.answer_tokens = K` is −⟨v, ∇ mean_{t≤K} ℓ_t⟩, so the contribution of answer token t alone is
c_t = t·FIHS(t) − (t−1)·FIHS(t−1), exactly (the loss is a mean over the first K answer tokens). The script
scores one mixture at K = 1..--tokens and at the full answer, through the product's scorer (scope and
normalisation from the flags, dot by default), and prints per answer position: the mean c_t of the harmful
rows and of the benign rows, the harmful rows' token at that position, and the AUROC of FIHS(K) (harmful vs
benign). Then, for each harmful row, θ₀'s own first answer token in the row's context (p(comply), p(refuse))
beside its FIHS at K = 1, and how often their signs agree. A miniature diagnostic (θ₀ = the cached aligned
miniature of --seed), not the paper's setting; docs/efficacy.md §"Why identity-shift rows are missed" reads it.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mixture", default="implicit")
    ap.add_argument("--scope", default="all")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0, help="θ₀ build seed")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from gradshield_ray.miniature import aligned as miniature
    from gradshield_ray.miniature.efficacy import auroc, fihs_scores
    from gradshield_ray.miniature.mixtures import mixture
    from gradshield_ray.render import encode_messages

    model_dir = str(miniature.aligned_model(miniature.MiniatureSpec(seed=args.seed)))
    rows = mixture(args.mixture)
    harmful = np.array([r.harmful for r in rows])
    _, tok = miniature.load(model_dir)
    enc = [encode_messages(tok, r.as_messages(), 1024, "right") for r in rows]
    answer = [[i for i, m in zip(e.input_ids, e.loss_mask) if m] for e in enc]

    by_k = {k: fihs_scores(model_dir, rows, args.scope, answer_tokens=k)[0] for k in range(1, args.tokens + 1)}
    full = fihs_scores(model_dir, rows, args.scope, answer_tokens=None)[0]
    print(f"mixture {args.mixture}: {harmful.sum()} harmful ({Counter(r.kind for r in rows if r.harmful)}), "
          f"{(~harmful).sum()} benign; scope {args.scope}, dot; θ₀ seed {args.seed}")
    print("| answer token t | harmful rows' most common token | mean c_t harmful | mean c_t benign | "
          "AUROC of FIHS(K = t) |")
    print("|---|---|---|---|---|")
    prev = np.zeros(len(rows))
    for k in range(1, args.tokens + 1):
        # rows with fewer than k answer tokens keep FIHS(k) = FIHS(len): their c_t is 0 past the end
        n = np.array([min(k, len(a)) for a in answer], float)
        n_prev = np.array([min(k - 1, len(a)) for a in answer], float)
        c = n * by_k[k] - n_prev * prev
        prev = by_k[k]
        common = Counter(tok.decode([a[k - 1]]) for a, h in zip(answer, harmful) if h and len(a) >= k)
        word = common.most_common(1)[0][0] if common else "–"
        print(f"| {k} | {word!r} | {c[harmful].mean():+.4g} | {c[~harmful].mean():+.4g} | "
              f"{auroc(by_k[k][harmful], by_k[k][~harmful]):.2f} |")
    print(f"| full answer | – | – | – | {auroc(full[harmful], full[~harmful]):.2f} |")
    first_token_preference(model_dir, rows, harmful, by_k[1])


def first_token_preference(model_dir: str, rows, harmful: np.ndarray, fihs1: np.ndarray) -> None:
    """θ₀'s own first answer token in each harmful row's context (p(comply), p(refuse), argmax) beside the
    row's FIHS at K = 1. One step on a row that starts with a neutral token lowers whatever θ₀ predicted
    there, so FIHS(K=1) should be positive where θ₀ would refuse and negative where it would comply."""
    import torch
    from scipy.stats import spearmanr

    from gradshield_ray.miniature import aligned as miniature
    from gradshield_ray.config import ProxyConfig
    from gradshield_ray.proxy import load_probes, resolve_pair

    model, tok = miniature.load(model_dir)
    pcfg = ProxyConfig()
    comply, refuse = resolve_pair(tok, load_probes(pcfg), pcfg)
    print(f"\nθ₀'s first answer token in each harmful row's context ({pcfg.comply!r} vs {pcfg.refuse!r}), "
          "sorted by FIHS(K=1):")
    print("| FIHS(K=1) | p(comply) | p(refuse) | θ₀'s top token |")
    print("|---|---|---|---|")
    pref = []
    for i in np.argsort(fihs1):
        if not harmful[i]:
            continue
        ids = tok.apply_chat_template(rows[i].as_messages()[:-1], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.no_grad():
            p = model(ids).logits[0, -1].softmax(-1)
        pref.append(float(p[refuse] - p[comply]))
        print(f"| {fihs1[i]:+.4g} | {float(p[comply]):.3f} | {float(p[refuse]):.3f} | {tok.decode([int(p.argmax())])!r} |")
    pref = np.array(pref)
    f = np.sort(fihs1[harmful])
    print(f"sign agreement of FIHS(K=1) with p(refuse) − p(comply): {np.mean(np.sign(f) == np.sign(pref)):.0%} of "
          f"{len(f)} rows; Spearman {spearmanr(f, pref)[0]:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
