"""An exactness oracle that shares no code with the scorer: every method × scope × answer_tokens of the product
against FIHS computed from public transformers / torch / peft API only, on three architectures.

The oracle (this file, float64 throughout):
- renders each row with `tokenizer.apply_chat_template(..., tokenize=True)` (the product renders to text and
  tokenizes with offsets);
- marks the trained tokens by searching the token ids: for each assistant turn, `<|assistant|>` followed by the
  ids of its content and `<|end|>` (content + end-of-turn marker, the README's contract), the first K of them
  with `answer_tokens: K`; the row is not cut (the product cuts it after the last scored token);
- L(z) is `model(input_ids, labels=...).loss` (transformers shifts the labels);
- S is read off `model(prefix).logits[-1]` for the same probes (the shipped HarmBench file's first 6 prompts,
  rendered with `add_generation_prompt=True`), comply/refuse ids = the single ids of "Sure" / "I";
- FIHS = −⟨∇S, ∇L⟩ with both gradients from `torch.autograd.grad`, restricted to the scope's parameters
  selected by their names here (LoRA: a fresh peft adapter, seeded as the config says);
- and, as a check of the oracle itself, the measured change of S after one real `torch.optim.SGD` step of
  size η on the row's loss over the scope: S(θ − η∇L) − S(θ) ≈ −η⟨∇S, ∇L⟩ = η·FIHS (central difference with a
  second SGD step with `maximize=True`, and Richardson extrapolation over two step sizes).

What is covered (the README's "every method and scope"): methods hooks, jvp, vmap, brute; scopes all, no_embed,
mlp, attn, last:1, layers:0-0, regex:norm, lora; answer_tokens 1, 3 and null (full answer); normalize dot for
every method and cosine for hooks/vmap/brute (jvp computes dots only); tiny Llama (tied), tiny Gemma-3 (scaled
embedding, tied head, soft-capping at 0.5, where the raw logits reach ~0.5, so the tanh bends them) and tiny Qwen2 (untied head, q/k/v
biases); the 10 sample rows (system turns, two assistant turns, lengths that make the product pad its micro-batches). The product runs float32 (its only full-precision dtype); the oracle float64. Tolerance
1e-5·max|oracle| per (arch, scope, answer_tokens, method, normalize); the SGD-step check 1e-4·max|oracle|
(see FD_RTOL). "float64" means the parameters and activations: transformers' RMSNorm and causal-LM loss compute
in float32 inside, so the oracle's own precision is about 1e-7 relative, far inside the tolerance.
"""
from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np
import pytest
import torch

from gradshield_ray.config import GradShieldConfig
from gradshield_ray.render import encode_messages
from gradshield_ray.scorer import FIHSScorer

ARCHS = ["llama", "gemma3", "qwen2"]
SCOPES = ["all", "no_embed", "mlp", "attn", "last:1", "layers:0-0", "regex:norm", "lora"]
ANSWER_TOKENS = [1, 3, None]
METHODS = ["hooks", "jvp", "vmap", "brute"]
N_PROBES = 6
RTOL = 1e-5  # the product (float32) against the oracle (float64), relative to max |oracle|
# the SGD-step measurement against the gradient dot product. Not 1e-10: transformers computes RMSNorm (Llama,
# Qwen2, Gemma-3) and the loss in float32 even in a float64 model, so S carries float32 rounding; with a step
# of ‖η∇L‖ = 1e-3 the plain central difference was off by up to 3.7e-5 of max |oracle| (rounding grows as the
# step shrinks, the O(η²) term as it grows); Richardson extrapolation over 3e-3 and 6e-3 removes the O(η²) term
FD_RTOL = 1e-4
ARCH_KWARGS = {"gemma3": {"final_logit_softcapping": 0.5}}  # raw logits reach ~0.5 here: tanh bends them


# ---------------------------------------------------------------- the oracle (public API only)


def probe_prompts() -> list[str]:
    path = resources.files("gradshield_ray") / "data" / "probes" / "harmbench_val_standard.jsonl"
    return [json.loads(x)["prompt"].strip() for x in path.read_text().splitlines() if x.strip()][:N_PROBES]


def chat_ids(tok, msgs, generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
    return list(out)


def single_id(tok, s: str) -> int:
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (s, ids)
    return ids[0]


def trained_positions(tok, ids: list[int], msgs, k: int | None) -> list[int]:
    """Positions of the tokens the assistant generates, found by searching the ids of each assistant turn's text."""
    tag, end = tok.convert_tokens_to_ids("<|assistant|>"), tok.convert_tokens_to_ids("<|end|>")
    out, start = [], 0
    for m in msgs:
        if m["role"] != "assistant":
            continue
        span = tok(m["content"], add_special_tokens=False)["input_ids"] + [end]
        pattern = [tag] + span
        hit = next(i for i in range(start, len(ids) - len(pattern) + 1) if ids[i:i + len(pattern)] == pattern)
        pos = list(range(hit + 1, hit + 1 + len(span)))
        out += pos[:k] if k else pos
        start = hit + len(pattern)
    return out


def row_loss(model, ids: list[int], positions: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    labels = torch.full_like(x, -100)
    labels[0, positions] = x[0, positions]
    return model(input_ids=x, labels=labels, use_cache=False).loss


def proxy_s(model, prefixes: list[list[int]], comply: int, refuse: int) -> torch.Tensor:
    total = 0.0
    for ids in prefixes:
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        total = total + logits[comply] - logits[refuse]
    return total / len(prefixes)


def scope_names(names: list[str], scope: str, n_layers: int) -> list[str]:
    """The scope's parameters by their transformers names (written out here, not taken from gradshield_ray.scope)."""
    rules = {
        "all": lambda n: True,
        "no_embed": lambda n: "embed_tokens" not in n and "lm_head" not in n,
        "mlp": lambda n: ".mlp." in n,
        "attn": lambda n: ".self_attn." in n,
        "last:1": lambda n: f"layers.{n_layers - 1}." in n or n.endswith("model.norm.weight"),
        "layers:0-0": lambda n: ".layers.0." in n,
        "regex:norm": lambda n: re.search("norm", n) is not None,
        "lora": lambda n: "lora_" in n,
    }
    return [n for n in names if rules[scope](n)]


class Oracle:
    """Float64 gradients of S and of every row's loss (per answer_tokens) over all parameters of one model."""

    def __init__(self, model, tok, rows, lora: bool):
        self.model, self.tok, self.rows = model, tok, rows
        self.params = {n: p for n, p in model.named_parameters() if (not lora) or "lora_" in n}
        self.comply, self.refuse = single_id(tok, "Sure"), single_id(tok, "I")
        self.prefixes = [chat_ids(tok, [{"role": "user", "content": p}], True) for p in probe_prompts()]
        self.s0 = proxy_s(model, self.prefixes, self.comply, self.refuse)
        self.gS = self._grad(self.s0)
        self.ids = [chat_ids(tok, r, False) for r in rows]
        self.gL = {k: [self._grad(row_loss(model, ids, trained_positions(tok, ids, r, k)))
                       for ids, r in zip(self.ids, rows)] for k in ANSWER_TOKENS}

    def _grad(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        g = torch.autograd.grad(y, list(self.params.values()), allow_unused=True, retain_graph=False)
        return {n: (torch.zeros_like(p) if gi is None else gi) for (n, p), gi in zip(self.params.items(), g)}

    def fihs(self, names: list[str], k: int | None, normalize: str) -> np.ndarray:
        out = []
        for gl in self.gL[k]:
            dot = sum(float((self.gS[n] * gl[n]).sum()) for n in names)
            if normalize == "cosine":
                ns = sum(float(self.gS[n].pow(2).sum()) for n in names)
                nl = sum(float(gl[n].pow(2).sum()) for n in names)
                dot = dot / np.sqrt(ns * nl)
            out.append(-dot)
        return np.array(out)

    def sgd_step_fihs(self, names: list[str], k: int | None, step: float = 3e-3) -> np.ndarray:
        """The measured effect of one SGD step of length `step` on the row: D(η) = (S after a step on the row − S
        after a step against it) / 2η = −⟨∇S, ∇L⟩ + O(η²), with the O(η²) term removed by Richardson
        extrapolation (4·D(η) − D(2η)) / 3."""
        params = [self.params[n] for n in names]
        out = []
        for gl in self.gL[k]:
            norm = float(torch.sqrt(sum(gl[n].pow(2).sum() for n in names)))
            eta = step / norm
            d = [self._central_difference(params, [gl[n] for n in names], h) for h in (eta, 2 * eta)]
            out.append((4 * d[0] - d[1]) / 3)
        return np.array(out)

    def _central_difference(self, params, grads, eta: float) -> float:
        saved = [p.detach().clone() for p in params]
        s = []
        for maximize in (False, True):  # θ − η∇L (a plain SGD step), then θ + η∇L
            opt = torch.optim.SGD(params, lr=eta, maximize=maximize)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            with torch.no_grad():
                s.append(float(proxy_s(self.model, self.prefixes, self.comply, self.refuse)))
                for p, v in zip(params, saved):
                    p.copy_(v)
                    p.grad = None
        return (s[0] - s[1]) / (2 * eta)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    from gradshield_ray.miniature.testing import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp(request.param), seed=3, arch=request.param,
                           **ARCH_KWARGS.get(request.param, {}))
    return request.param, str(path)


def load64(path: str, lora: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    if lora:  # the config's defaults: r 8, alpha 16, all linear layers, seed 0 (drawn in float32, then widened)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    return model.double().eval(), tok


@pytest.fixture(scope="module")
def oracles(arch, sample_rows):
    _, path = arch
    out = {}
    for lora in (False, True):
        model, tok = load64(path, lora)
        out[lora] = Oracle(model, tok, sample_rows, lora)
    return out


def product(path: str, scope: str, k: int | None, normalize: str) -> FIHSScorer:
    cfg = GradShieldConfig.model_validate({
        "model": {"path": path}, "proxy": {"max_probes": N_PROBES, "comply": "Sure"},  # the oracle's S
        "score": {"scope": scope, "answer_tokens": k, "normalize": normalize, "verify_rows": 0,
                  "max_batch_size": 4}})
    return FIHSScorer(cfg)


# ---------------------------------------------------------------- tests


def test_oracle_inputs_agree_with_the_product(arch, oracles, sample_rows):
    """The product's rendering, loss mask, probe ids and S(θ₀) are the oracle's (independently computed)."""
    name, path = arch
    oracle = oracles[False]
    scorer = product(path, "all", None, "dot")
    assert (scorer.comply_id, scorer.refuse_id) == (oracle.comply, oracle.refuse)
    assert scorer.s0 == pytest.approx(float(oracle.s0.detach()), rel=1e-5, abs=1e-6)
    for r, ids in zip(sample_rows, oracle.ids):
        enc = encode_messages(scorer.tokenizer, r, 512, "right")
        assert enc.input_ids == ids, name
        for k in ANSWER_TOKENS:
            mask = enc.opening(k).loss_mask if k else enc.loss_mask
            assert [i for i, m in enumerate(mask) if m] == trained_positions(oracle.tok, ids, r, k), (name, k, r)


@pytest.mark.parametrize("scope", SCOPES)
def test_every_method_matches_the_oracle(arch, oracles, sample_rows, scope):
    name, path = arch
    lora = scope == "lora"
    oracle = oracles[lora]
    names = scope_names(list(oracle.params), scope, oracle.model.config.num_hidden_layers)
    assert names, scope
    for k in ANSWER_TOKENS:
        for normalize in ("dot", "cosine"):
            want = oracle.fihs(names, k, normalize)
            assert np.max(np.abs(want)) > 0
            scorer = product(path, scope, k, normalize)
            got_names = {n.replace("base_model.model.", "") for n in scorer.params}
            assert got_names == {n.replace("base_model.model.", "") for n in names}, (name, scope)
            enc = [encode_messages(scorer.tokenizer, r, 512, "right") for r in sample_rows]
            for method in METHODS:
                if method == "jvp" and normalize == "cosine":
                    continue
                got = scorer.score_encoded(enc, method)
                err = np.max(np.abs(got - want))
                assert err <= RTOL * np.max(np.abs(want)), (
                    f"{name} scope={scope} answer_tokens={k} {normalize} {method}: max err {err:.3g}, "
                    f"scale {np.max(np.abs(want)):.3g}")


@pytest.mark.parametrize("scope", ["all", "mlp", "last:1", "lora"])
def test_oracle_is_the_change_of_s_after_one_sgd_step(arch, oracles, scope):
    """Checks the oracle itself: the gradient dot product predicts the measured effect of a real SGD step."""
    oracle = oracles[scope == "lora"]
    names = scope_names(list(oracle.params), scope, oracle.model.config.num_hidden_layers)
    for k in ANSWER_TOKENS:
        want = oracle.fihs(names, k, "dot")
        measured = oracle.sgd_step_fihs(names, k)
        err = np.max(np.abs(measured - want))
        assert err <= FD_RTOL * np.max(np.abs(want)), (arch[0], scope, k, err, np.max(np.abs(want)))
