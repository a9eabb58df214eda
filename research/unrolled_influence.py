"""Is the identity-shift miss a first-order artefact? The exact change of the proxy after k training steps.

    OMP_NUM_THREADS=1 .venv/bin/python -m research.unrolled_influence [--seed 0] [--rows] [--clusters 10]

FIHS is the first-order (one small step) effect of a row on S at θ₀. This script measures the *exact* change of
the safety proxy after k AdamW steps (lr 5e-4, the implicit attack's finetuning lr) from θ₀, with no
linearisation, in two ways:

- groups: train on 20 rows of one kind together (persona, two slices of utility rows, explicit, benign new-task
  rows) and print ΔS after k = 1, 5, 20, 40 steps, for the product's proxy S = logit("Sure") − logit("I") and for
  a refusal-probability proxy S_ref = −log p("I"), each on the plain probes and on the probes under the persona's
  system prompt. Would any per-row score see the persona rows if the proxy itself does not move for them as a
  group?
- --rows: train on each row alone for k = 1, 5, 20 steps (full answer) and score the row by ΔS (product proxy); AUROC
  and the product's adaptive threshold on explicit_10, implicit, novel, explicit_0. About 6.5 minutes per θ₀ build
  on one core: k×(forward + backward) + one probe pass per row, 20× a FIHS pass, so a diagnostic, not a method.
- --clusters N: a group-level unrolled score with no labels. Cluster each mixture's rows by θ₀'s mean last hidden
  state (k-means, N clusters, standardised features), train on each cluster for k = 20 and 40 steps, and give
  every row its cluster's ΔS and ΔS_ref (plain probes). Prints the clusters' harmful/size and the AUROCs.

A miniature (θ₀ = the cached aligned miniature of --seed), not the paper's setting; docs/efficacy.md reads it.
"""
from __future__ import annotations

import argparse
import copy
import os

import numpy as np

LR = 5e-4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0, help="θ₀ build seed")
    ap.add_argument("--rows", action="store_true", help="also the per-row unrolled score (slow)")
    ap.add_argument("--clusters", type=int, default=0, help="also the cluster-level unrolled score, N clusters")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from gradshield_ray.miniature import aligned as miniature
    from gradshield_ray.batching import collate
    from gradshield_ray.config import ProxyConfig
    from gradshield_ray.miniature.efficacy import FilterStats, adaptive, auroc, markdown_table
    from gradshield_ray.loss import last_token_logits, per_example_loss
    from gradshield_ray.miniature.mixtures import AOA_SYSTEM, mixture
    from gradshield_ray.proxy import load_probes, probe_prefixes, resolve_pair
    from gradshield_ray.render import Encoded, encode_messages

    model, tok = miniature.load(str(miniature.aligned_model(miniature.MiniatureSpec(seed=args.seed))))
    for p in model.parameters():
        p.requires_grad_(True)
    theta0 = copy.deepcopy(model.state_dict())
    pcfg = ProxyConfig()
    prompts = load_probes(pcfg)
    comply, refuse = resolve_pair(tok, prompts, pcfg)

    def probes(system: str | None) -> list[Encoded]:
        return [Encoded(x, [False] * len(x), False) for x in probe_prefixes(tok, prompts, system)]

    plain, persona = (collate(probes(s), tok.pad_token_id, "right") for s in (None, AOA_SYSTEM))

    @torch.no_grad()
    def proxies() -> np.ndarray:
        """[S plain, S_ref plain, S persona, S_ref persona]"""
        out = []
        for b in (plain, persona):
            lg = last_token_logits(model, b).float()
            out += [float((lg[:, comply] - lg[:, refuse]).mean()), float(-lg.log_softmax(-1)[:, refuse].mean())]
        return np.array(out)

    def unroll(rows, ks: tuple[int, ...]) -> list[np.ndarray]:
        """ΔS (all four proxies) after each k in ks AdamW steps on `rows` as one batch, from θ₀; leaves θ₀."""
        model.load_state_dict(theta0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        batch = collate([encode_messages(tok, r.as_messages(), 2048, "right") for r in rows], tok.pad_token_id)
        out = []
        for step in range(1, max(ks) + 1):
            loss = per_example_loss(model, batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in ks:
                out.append(proxies() - base)
        model.load_state_dict(theta0)
        return out

    base = proxies()
    imp, ex, nov = mixture("implicit"), mixture("explicit_10"), mixture("novel")
    util = [r for r in imp if not r.harmful]
    groups = {"persona (harmful)": [r for r in imp if r.harmful], "utility rows 0–19": util[:20],
              "utility rows 100–119": util[100:120], "explicit (harmful)": [r for r in ex if r.harmful],
              "new-task benign (novel)": [r for r in nov if r.kind == "novel"][:20]}
    ks = (1, 5, 20, 40)
    table = []
    for name, rows in groups.items():
        d = unroll(rows, ks)
        for j, what in enumerate(("S plain", "S_ref plain", "S persona prompt", "S_ref persona prompt")):
            table.append([name, what] + [f"{x[j]:+.2f}" for x in d])
    print(f"θ₀ build {args.seed}: exact ΔS after k AdamW steps (lr {LR}) on 20 rows of one kind together\n")
    print(markdown_table(["group", "proxy", *(f"k = {k}" for k in ks)], table))
    if args.clusters:
        clusters(args.clusters, unroll, model, tok)
    if not args.rows:
        return
    ks = (1, 5, 20)
    table = []
    for name in ("explicit_10", "implicit", "novel", "explicit_0"):
        rows = mixture(name)
        d = np.array([[x[0] for x in unroll([r], ks)] for r in rows])  # product proxy, plain probes
        harm = np.array([r.harmful for r in rows])
        cells = [name]
        for j in range(len(ks)):
            st = FilterStats.of(adaptive(d[:, j])[0], rows)
            cells.append(f"{auroc(d[harm, j], d[~harm, j]):.2f} / {st.recall:.0%} / {st.false_removal:.0%}"
                         if harm.any() else f"removed {st.removed}")
        table.append(cells)
        print(f"  {name} done", flush=True)
    print(f"\nθ₀ build {args.seed}: each row scored by the exact ΔS (product proxy) after k AdamW steps on it alone "
          "(full answer): AUROC / adaptive threshold recall / benign false removal\n")
    print(markdown_table(["mixture", *(f"k = {k}" for k in ks)], table))


def clusters(n: int, unroll, model, tok) -> None:
    """Cluster-level unrolled score: k-means on θ₀'s mean last hidden state, ΔS / ΔS_ref per cluster."""
    import torch
    from scipy.cluster.vq import kmeans2

    from gradshield_ray.batching import collate
    from gradshield_ray.miniature.efficacy import auroc, markdown_table
    from gradshield_ray.miniature.mixtures import mixture
    from gradshield_ray.render import encode_messages

    ks = (20, 40)
    table = []
    for name in ("explicit_10", "implicit", "hard", "novel"):
        rows = mixture(name)
        with torch.no_grad():  # θ₀ here: unroll() puts θ₀ back when it returns
            feats = np.array([model(collate([encode_messages(tok, r.as_messages(), 2048, "right")],
                                            tok.pad_token_id).input_ids,
                                    output_hidden_states=True).hidden_states[-1][0].mean(0).numpy() for r in rows])
        feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
        _, label = kmeans2(feats, n, minit="++", seed=0)
        score = np.zeros((len(rows), len(ks), 2))
        for k in np.unique(label):
            idx = np.flatnonzero(label == k)
            score[idx] = np.array([d[:2] for d in unroll([rows[i] for i in idx], ks)])
        harm = np.array([r.harmful for r in rows])
        sizes = " ".join(f"{harm[label == k].sum()}/{(label == k).sum()}" for k in np.unique(label))
        table.append([name, sizes] + [f"{auroc(score[harm, j, p], score[~harm, j, p]):.2f}"
                                      for j in range(len(ks)) for p in range(2)])
    print(f"\nCluster-level unrolled score ({n} k-means clusters on θ₀'s mean last hidden state; every row gets its "
          "cluster's ΔS): AUROC harmful vs benign\n")
    print(markdown_table(["mixture", "clusters (harmful/size)", *(f"{p}, k = {k}" for k in ks
                                                                  for p in ("ΔS", "ΔS_ref"))], table))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
