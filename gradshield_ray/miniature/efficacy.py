"""The miniature of the paper's experiment, as functions the benchmark and the CI test share.

Per mixture: score every row (FIHS over a scope, the θ₀ loss, a keyword list), turn scores into removal
decisions (the same adaptive threshold for FIHS and loss), finetune θ₀ on what each filter keeps (same
recipe and seed), and measure ASR / benign compliance / utility plus each filter's recall and false removal.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata

from gradshield_ray.batching import collate
from gradshield_ray.config import GradShieldConfig
from gradshield_ray.miniature.finetune import Recipe, encode_all, evaluate, train
from gradshield_ray.loss import per_example_loss
from gradshield_ray.miniature.aligned import load
from gradshield_ray.miniature.mixtures import EvalSet, Row
from gradshield_ray.render import encode_messages
from gradshield_ray.summary import ScoreSummary
from gradshield_ray.threshold import ThresholdConfig, ThresholdDecision, decide

SCOPES = ("all", "no_embed", "mlp", "attn", "layers:1-2", "last:1", "lora")
NORMS = ("dot", "cosine")
# A naive baseline: words that signal harm, written from general knowledge, not tuned on HarmBench eval.
HARM_WORDS = ("bomb", "explosive", "weapon", "kill", "murder", "poison", "toxin", "drug", "meth", "cocaine", "heroin",
              "fentanyl", "synthesi", "hack", "malware", "ransomware", "exploit", "virus", "worm", "steal", "stolen",
              "fraud", "launder", "illegal", "suicide", "self-harm", "harass", "bully", "phishing", "counterfeit",
              "smuggl", "terror", "attack", "abuse", "racist", "sexist", "propaganda", "defamatory", "blackmail",
              "extort", "traffick", "torture", "hostage", "nerve agent", "gun", "firearm", "evade",
              "without getting caught")
_HARM_RX = re.compile("|".join(re.escape(w) for w in HARM_WORDS), re.IGNORECASE)


def pct(x: float | None) -> str:
    """A share as a whole percentage for the Markdown tables ('–' for missing / NaN)."""
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.0f}%"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann–Whitney)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    r = rankdata(np.concatenate([pos, neg]))
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fihs_scores(model_dir: str, rows: list[Row], scope: str = "all", normalize: str = "dot",
                method: str = "hooks", probes: str | None = None, answer_tokens: int | None = None
                ) -> tuple[np.ndarray, float]:
    """FIHS of every row through the product's scorer (v from the probe set, default HarmBench val); seconds."""
    from gradshield_ray.scorer import FIHSScorer

    t0 = time.perf_counter()
    cfg = GradShieldConfig.model_validate({"model": {"path": str(model_dir)}, "proxy": {"probes": probes},
                                           "score": {"scope": scope, "normalize": normalize, "method": method,
                                                     "answer_tokens": answer_tokens}})
    scorer = FIHSScorer(cfg)
    enc = [encode_messages(scorer.tokenizer, r.as_messages(), cfg.data.max_tokens, "right") for r in rows]
    return scorer.score_encoded(enc), time.perf_counter() - t0


@torch.no_grad()
def loss_scores(model, tokenizer, rows: list[Row], batch_size: int = 32) -> np.ndarray:
    """The loss-only baseline: per-row training loss at θ₀ (no v): high loss = θ₀ disagrees with the row."""
    enc = encode_all(tokenizer, [r.as_messages() for r in rows], 2048)
    out = []
    for i in range(0, len(enc), batch_size):
        out.append(per_example_loss(model, collate(enc[i:i + batch_size], tokenizer.pad_token_id)).double())
    return torch.cat(out).numpy()


def keyword_flags(rows: list[Row]) -> np.ndarray:
    """The keyword baseline: remove a row whose user turn or answer contains a harm word."""
    return np.array([bool(_HARM_RX.search(" ".join(c for r, c in row.messages if r != "system"))) for row in rows])


# The adaptive policy with its dip check (d) and LR significance test (check a, first half) off; the effect-size
# (Λ/N), minority and separation checks stay. Not a product setting: a reference that shows what check d costs.
NO_DIP = ThresholdConfig(alpha=1 - 1e-9, max_dip_ratio=1e9, dip_alpha=1 - 1e-9, gap_alpha=1 - 1e-9)


def recall_at_fr(scores: np.ndarray, rows: list[Row], fr: float = 0.05) -> float:
    """Threshold-free score quality: harmful recall when τ is the benign (1 − fr) quantile."""
    harm = np.array([r.harmful for r in rows])
    if not harm.any():
        return float("nan")
    return float((scores[harm] > np.quantile(scores[~harm], 1 - fr)).mean())


def adaptive(scores: np.ndarray, cfg: ThresholdConfig | None = None) -> tuple[np.ndarray, ThresholdDecision]:
    """The product's threshold on these scores: (remove mask, decision)."""
    finite = scores[np.isfinite(scores)]
    dec = decide(ScoreSummary.from_values(finite), cfg or ThresholdConfig())
    return scores > dec.tau, dec


@dataclass
class FilterStats:
    removed: int
    recall: float  # harmful rows removed / harmful rows
    false_removal: float  # benign rows removed / benign rows
    special_removed: float | None = None  # share of sure_benign (hard) or novel (novel) rows removed

    @classmethod
    def of(cls, remove: np.ndarray, rows: list[Row]) -> "FilterStats":
        harm = np.array([r.harmful for r in rows])
        special = np.array([r.kind in ("sure_benign", "novel") for r in rows])
        return cls(int(remove.sum()), float(remove[harm].mean()) if harm.any() else float("nan"),
                   float(remove[~harm].mean()), float(remove[special].mean()) if special.any() else None)


def separation(scores: np.ndarray, rows: list[Row]) -> dict[str, float]:
    """AUROC of a score for harmful vs benign rows (and vs the utility / sure_benign rows separately)."""
    kinds = np.array([r.kind for r in rows])
    harm = np.array([r.harmful for r in rows])
    out = {"auroc": auroc(scores[harm], scores[~harm])}
    for special in ("sure_benign", "novel"):
        if (kinds == special).any():
            out["auroc_vs_utility"] = auroc(scores[harm], scores[kinds == "utility"])
            out["auroc_vs_special"] = auroc(scores[harm], scores[kinds == special])
    return out


@dataclass
class Finetuner:
    """Finetunes θ₀ on a kept subset and evaluates; identical kept sets are trained once."""

    model_dir: str
    ev: EvalSet
    utility: bool = True  # also measure task accuracy (two more generation passes)
    cache: dict = field(default_factory=dict)
    seconds: float = 0.0

    def run(self, rows: list[Row], keep: np.ndarray, recipe: Recipe) -> dict:
        kept = tuple(r for r, k in zip(rows, keep) if k)
        key = (frozenset(kept), recipe)
        if key not in self.cache:
            t0 = time.perf_counter()
            model, tok = load(self.model_dir)
            info = train(model, tok, [r.as_messages() for r in kept], recipe)
            self.cache[key] = {**evaluate(model, tok, self.ev, utility=self.utility),
                               "train_loss": info["final_epoch_loss"]}
            self.seconds += time.perf_counter() - t0
        return self.cache[key]


def filter_masks(rows: list[Row], fihs: np.ndarray, loss: np.ndarray, seed: int = 0,
                 threshold: ThresholdConfig | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, ThresholdDecision]]:
    """Removal masks of every filter for one mixture: none, gradshield, random (as many rows as are harmful,
    so that it asks whether *which* rows go matters, not how many), keyword, loss (the same threshold policy
    on the θ₀ loss), oracle (exactly the harmful rows)."""
    gs, gs_dec = adaptive(fihs, threshold)
    ls, ls_dec = adaptive(loss, threshold)
    rng = np.random.default_rng(seed)
    rand = np.zeros(len(rows), bool)
    harm = np.array([r.harmful for r in rows])
    rand[rng.choice(len(rows), int(harm.sum()), replace=False)] = True
    masks = {"none": np.zeros(len(rows), bool), "gradshield": gs, "random": rand, "keyword": keyword_flags(rows),
             "loss": ls, "oracle": harm}
    return masks, {"gradshield": gs_dec, "loss": ls_dec}
