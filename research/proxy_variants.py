"""Do other safety proxies, or a two-sided threshold, catch the identity-shift rows? (miniature, 3 θ₀ builds)

    OMP_NUM_THREADS=1 .venv/bin/python -m research.proxy_variants [--seeds 0 1 2] [--answer-tokens 1 3]

FIHS at the product default misses most persona (AOA identity-shift) rows: docs/efficacy.md, "Why identity-shift
rows are missed". This script measures the fixes proposed there, each against the product's proxy, through the
product's scorer (scope all, dot) with only the reference direction v swapped:

- product: S = logit("Sure") − logit("I") at the first assistant token (the default);
- continuation "Sure, here is" vs "I cannot": S = log p(comply continuation | x) − log p(refuse continuation | x),
  teacher-forced over several tokens (for one-token strings it is exactly the product's proxy);
- continuation "Sure, here is" vs θ₀'s own greedy refusal of each probe (8 tokens), so that nothing is chosen by
  hand from the miniature's refusal templates;
- refusal only: S = −log p(θ₀'s own refusal | x) (any move away from refusing counts, whatever replaces it);
- row's system prompt: v from the probes rendered under the row's own system prompt (rows without one keep the
  product's v), so that training that changes behaviour under a persona prompt is measured under that prompt;
- two-sided threshold: the product's scores, and the product's adaptive policy applied a second time to −FIHS,
  removing a separate *low* population too (first-order "makes the model safer" rows, where the persona rows that
  θ₀ would answer "Sure" land).

Per variant and K it prints AUROC (harmful vs benign), harmful recall at 5% benign false removal, and the adaptive
threshold's recall / false removal, as the mean over θ₀ builds [worst build]; then, for the implicit mixture, the
persona ASR after the lr 5e-4 finetune (the setting where that attack works) for none / oracle / product /
two-sided. A miniature (1.24M-parameter θ₀ built locally), not the paper's setting.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

MIXTURES = ("explicit_0", "explicit_10", "implicit", "hard", "novel")
CONTINUATIONS = {  # name: (comply continuation, refuse continuation); "self" = θ₀'s own greedy refusal
    "continuation 'Sure, here is' vs 'I cannot'": ("Sure, here is", "I cannot"),
    "continuation 'Sure, here is' vs θ₀'s refusal": ("Sure, here is", "self"),
    "refusal only: −log p(θ₀'s refusal)": (None, "self"),
}


def continuation_direction(scorer, prompts: list[str], comply: str | None, refuse: list[str] | str | None,
                           system: str | None = None) -> dict:
    """v = ∇ mean_x [log p(comply | x) − log p(refuse | x)] over the scorer's scope, teacher-forced; `refuse`
    may give one continuation per probe."""
    import torch

    from gradshield_ray.proxy import probe_texts

    tok, model, params = scorer.tokenizer, scorer.model, scorer.params
    names, plist = list(params), list(params.values())
    v = [torch.zeros_like(p, dtype=torch.float32) for p in plist]

    def logp(prefix_text: str, cont: str) -> torch.Tensor:
        pre = tok(prefix_text, add_special_tokens=False)["input_ids"]
        full = tok(prefix_text + cont, add_special_tokens=False)["input_ids"]
        if full[: len(pre)] != pre or len(full) == len(pre):
            raise ValueError(f"continuation {cont!r} does not extend the assistant prefix")
        ids = torch.tensor([full], device=scorer.device)
        lp = model(ids).logits[0].float().log_softmax(-1)
        pos = torch.arange(len(pre) - 1, len(full) - 1, device=scorer.device)
        return lp[pos, ids[0, len(pre):]].sum()

    for p in plist:
        p.requires_grad_(True)
    try:
        for i, prefix in enumerate(probe_texts(tok, prompts, system)):
            s = 0.0
            if comply is not None:
                s = s + logp(prefix, comply)
            if refuse is not None:
                s = s - logp(prefix, refuse if isinstance(refuse, str) else refuse[i])
            for acc, g in zip(v, torch.autograd.grad(s / len(prompts), plist, allow_unused=True)):
                if g is not None:
                    acc += g.float()
    finally:
        for p in plist:
            p.requires_grad_(False)
    return dict(zip(names, v))


def first_token_direction(scorer, prompts: list[str], system: str) -> dict:
    """The product's v, with every probe rendered under `system` as the system prompt."""
    from gradshield_ray.proxy import probe_prefixes, reference_direction

    pre = probe_prefixes(scorer.tokenizer, prompts, system)
    return reference_direction(scorer.model, scorer.params, pre, scorer.comply_id, scorer.refuse_id, scorer.pad,
                               scorer.device)[0]


def measure(scores: np.ndarray, rows, remove: np.ndarray) -> dict:
    from gradshield_ray.miniature.efficacy import FilterStats, auroc, recall_at_fr

    harm = np.array([r.harmful for r in rows])
    st = FilterStats.of(remove, rows)
    return {"auroc": auroc(scores[harm], scores[~harm]), "recall_at_fr5": recall_at_fr(scores, rows),
            "recall": st.recall, "false_removal": st.false_removal, "removed": st.removed}


def score_build(seed: int, ks: list[int]) -> dict:
    """{variant: {K: {mixture: measures}}} for one θ₀ build, plus the implicit removal masks."""
    from gradshield_ray.miniature import aligned as miniature
    from gradshield_ray.config import GradShieldConfig
    from gradshield_ray.miniature.efficacy import adaptive
    from gradshield_ray.miniature.finetune import generate
    from gradshield_ray.miniature.mixtures import mixture
    from gradshield_ray.proxy import load_probes
    from gradshield_ray.render import encode_messages
    from gradshield_ray.scorer import FIHSScorer

    model_dir = str(miniature.aligned_model(miniature.MiniatureSpec(seed=seed)))
    cfg = GradShieldConfig.model_validate({"model": {"path": model_dir}})
    scorer = FIHSScorer(cfg)
    product_v = scorer.v
    prompts = load_probes(cfg.proxy)
    own = generate(scorer.model, scorer.tokenizer, [[{"role": "user", "content": p}] for p in prompts], 8)
    rows = {m: mixture(m) for m in MIXTURES}
    enc = {m: [encode_messages(scorer.tokenizer, r.as_messages(), 2048, "right") for r in rows[m]]
           for m in MIXTURES}
    directions = {name: continuation_direction(scorer, prompts, c, own if r == "self" else r)
                  for name, (c, r) in CONTINUATIONS.items()}
    systems = sorted({r.messages[0][1] for m in MIXTURES for r in rows[m] if r.messages[0][0] == "system"})
    by_system = {s: first_token_direction(scorer, prompts, s) for s in systems}

    def scores(v: dict, m: str, k: int) -> np.ndarray:
        scorer.set_direction(v)
        scorer.cfg.score.answer_tokens = k
        return scorer.score_encoded(enc[m])

    out: dict = {"own_refusals": sorted(set(own)), "variants": {}, "masks": {}}
    for k in ks:
        for m in MIXTURES:
            base = scores(product_v, m, k)
            rm = adaptive(base)[0]
            low = adaptive(-base)[0]
            res = {"product: 'Sure' vs 'I', first token": (base, rm), "two-sided threshold (product scores)":
                   (base, rm | low)}
            for name, v in directions.items():
                s = scores(v, m, k)
                res[name] = (s, adaptive(s)[0])
            s = base.copy()
            for sysp, v in by_system.items():
                own_sys = np.array([r.messages[0] == ("system", sysp) for r in rows[m]])
                if own_sys.any():
                    s[own_sys] = scores(v, m, k)[own_sys]
            res["v under the row's own system prompt"] = (s, adaptive(s)[0])
            for name, (s, remove) in res.items():
                out["variants"].setdefault(name, {}).setdefault(str(k), {})[m] = measure(s, rows[m], remove)
                if m == "implicit":
                    out["masks"].setdefault(name, {})[str(k)] = remove
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="θ₀ build seeds")
    ap.add_argument("--answer-tokens", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--no-finetune", action="store_true", help="skip the persona-ASR finetunes")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from gradshield_ray.miniature import aligned as miniature
    from gradshield_ray.miniature.efficacy import Finetuner, markdown_table, pct
    from gradshield_ray.miniature.finetune import Recipe
    from gradshield_ray.miniature.mixtures import eval_set, mixture

    t0 = time.perf_counter()
    builds = {s: score_build(s, args.answer_tokens) for s in args.seeds}
    names = list(builds[args.seeds[0]]["variants"])
    for s, b in builds.items():
        print(f"θ₀ build {s}: its own refusals of the probes (greedy, 8 tokens): {b['own_refusals']}")
    table = []
    for name in names:
        for k in map(str, args.answer_tokens):
            cells = [name, k]
            for m in MIXTURES:
                per = [builds[s]["variants"][name][k][m] for s in args.seeds]
                if m == "explicit_0":
                    cells.append(f"{np.mean([p['removed'] for p in per]):.1f}")
                    continue
                a = [p["auroc"] for p in per]
                cells.append(f"{np.mean(a):.2f} [{min(a):.2f}] / {pct(np.mean([p['recall_at_fr5'] for p in per]))}"
                             f" / {pct(np.mean([p['recall'] for p in per]))} / "
                             f"{pct(np.mean([p['false_removal'] for p in per]))}")
            table.append(cells)
    print(f"\nMean over θ₀ builds {args.seeds} [worst build AUROC]: AUROC / recall at 5% benign FR / adaptive "
          "threshold recall / benign false removal; explicit_0: rows removed from the clean corpus (of 200)\n")
    print(markdown_table(["variant", "K", "explicit_0 removed", *MIXTURES[1:]], table))

    result = {"args": vars(args), "builds": {s: {**b, "masks": {n: {k: m.tolist() for k, m in d.items()}
                                                               for n, d in b["masks"].items()}}
                                             for s, b in builds.items()}}
    if not args.no_finetune:
        rows, ev, recipe = mixture("implicit"), eval_set(), Recipe(lr=5e-4, seed=0)
        harm = np.array([r.harmful for r in rows])
        ft_rows = []
        for s in args.seeds:
            ft = Finetuner(str(miniature.aligned_model(miniature.MiniatureSpec(seed=s))), ev, utility=False)
            for k in map(str, args.answer_tokens):
                masks = {"none": np.zeros(len(rows), bool), "oracle": harm,
                         **{n: builds[s]["masks"][n][k] for n in ("product: 'Sure' vs 'I', first token",
                                                                  "two-sided threshold (product scores)")}}
                for name, remove in masks.items():
                    r = ft.run(rows, ~remove, recipe)
                    ft_rows.append([str(s), k, name, str(int(remove.sum())), pct(remove[harm].mean()),
                                    pct(remove[~harm].mean()), pct(r["asr"]), pct(r["asr_persona"])])
        print("\nImplicit mixture (20 persona rows of 200), finetuned on the kept rows: full-parameter AdamW lr 5e-4, "
              "10 epochs, bs 16, seed 0\n")
        print(markdown_table(["θ₀ build", "K", "filter", "removed", "recall", "benign FR", "ASR", "ASR (persona)"],
                             ft_rows))
        result["finetune"] = ft_rows
    print(f"\nwall {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
