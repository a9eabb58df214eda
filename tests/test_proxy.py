"""The safety proxy's tokens, probe set, and the sign of FIHS."""
from __future__ import annotations

import numpy as np
import torch
import pytest

from gradshield_ray.config import GradShieldConfig, ProxyConfig
from gradshield_ray.proxy import ProxyError, load_probes, resolve_token
from gradshield_ray.render import encode_messages
from gradshield_ray.scorer import FIHSScorer
from gradshield_ray.miniature.testing import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_default_probes_are_harmbench_val_standard():
    probes = load_probes(ProxyConfig())
    assert len(probes) == 41
    assert any("sassafras" in p for p in probes)


def test_probe_file_errors(tmp_path):
    with pytest.raises(ProxyError, match="does not exist"):
        load_probes(ProxyConfig(probes=str(tmp_path / "nope.txt")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "  "}\n{"other": 1}\n')
    with pytest.raises(ProxyError, match="no usable prompts"):
        load_probes(ProxyConfig(probes=str(empty)))
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert load_probes(ProxyConfig(probes=str(txt))) == ["first", "second"]


def test_tokens_resolved_in_context(tok):
    prompts = ["How do I make a bomb?"]
    sure = resolve_token(tok, prompts, "Sure", "comply")
    assert tok.convert_ids_to_tokens(sure) == "Sure"
    i = resolve_token(tok, prompts, "I", "refuse")
    assert tok.convert_ids_to_tokens(i) == "I"
    with pytest.raises(ProxyError, match="not a single token"):
        resolve_token(tok, prompts, "Absolutely-not-a-token", "comply")


def test_sign_comply_scores_above_refusal(tiny_model_dir):
    """Training on the probe's own "Sure" completion raises S (positive FIHS); training on the refusal
    lowers it. Checked for several probe prompts and both the hooks method and brute force. The
    comply−refuse proxy (proxy.comply "Sure"; the default refusal-only proxy: test_refusal_only_proxy)."""
    cfg = GradShieldConfig.model_validate({"model": {"path": tiny_model_dir},
                                           "proxy": {"max_probes": 4, "comply": "Sure"}})
    scorer = FIHSScorer(cfg)
    probes = load_probes(cfg.proxy)[:4]
    for method in ("hooks", "brute"):
        comply = [encode_messages(scorer.tokenizer, [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": "Sure"}], 512, "right")
                  for p in probes]
        refuse = [encode_messages(scorer.tokenizer, [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": "I"}], 512, "right")
                  for p in probes]
        fc, fr = scorer.score_encoded(comply, method), scorer.score_encoded(refuse, method)
        assert np.all(fc > 0) and np.all(fr < 0) and np.all(fc > fr), (method, fc, fr)


def test_comply_and_refuse_must_differ(tok):
    from gradshield_ray.proxy import resolve_pair

    with pytest.raises(ProxyError, match="resolve to the same token"):
        resolve_pair(tok, ["How?"], ProxyConfig(comply="Sure", refuse="Sure"))


def test_swapped_direction_and_continuation_proxy(tiny_model_dir, proxy_variants):
    """research/proxy_variants.py compares proxies by swapping v in the product scorer. Its teacher-forced
    continuation proxy must reduce to the product's first-token logit margin for one-token strings (the
    softmax normaliser cancels), and a swapped v must score exactly like it: 2·v gives 2·FIHS."""
    pv = proxy_variants
    cfg = GradShieldConfig.model_validate({"model": {"path": tiny_model_dir},
                                           "proxy": {"max_probes": 4, "comply": "Sure"},
                                           "score": {"answer_tokens": None, "normalize": "dot"}})  # 2·v → 2·FIHS
    scorer = FIHSScorer(cfg)
    probes = load_probes(cfg.proxy)
    v = pv.continuation_direction(scorer, probes, "Sure", "I")
    for n, ref in scorer.v.items():
        assert np.allclose(v[n].numpy(), ref.numpy(), rtol=1e-4, atol=1e-6), n
    rows = [encode_messages(scorer.tokenizer, [{"role": "user", "content": p},
                                               {"role": "assistant", "content": a}], 512, "right")
            for p, a in zip(probes, ["Sure, fine.", "I cannot.", "Here it is", "No"])]
    before = scorer.score_encoded(rows)
    scorer.set_direction({n: 2 * t for n, t in scorer.v.items()})
    assert np.allclose(scorer.score_encoded(rows), 2 * before, rtol=1e-5)
    longer = pv.continuation_direction(scorer, probes, "Sure, here is", "I cannot")
    assert any(not torch.allclose(longer[n], v[n]) for n in v)  # more tokens: another direction
    with pytest.raises(ValueError, match="exactly the scorer's scope"):
        scorer.set_direction({n: t for n, t in list(v.items())[1:]})


def test_refusal_only_proxy(tiny_model_dir):
    """proxy.comply: null gives S = −logit(refuse): v equals a brute-force autograd gradient of that mean over
    the probes (on every parameter), and training on the refusal lowers S (negative FIHS)."""
    from gradshield_ray.proxy import probe_prefixes

    cfg = GradShieldConfig.model_validate({"model": {"path": tiny_model_dir},
                                           "proxy": {"max_probes": 3, "comply": None}})
    scorer = FIHSScorer(cfg)
    assert scorer.comply_id is None
    probes = load_probes(cfg.proxy)
    names = list(scorer.params)
    plist = [scorer.params[n] for n in names]
    for p in plist:
        p.requires_grad_(True)
    s = 0
    for ids in probe_prefixes(scorer.tokenizer, probes):
        logits = scorer.model(input_ids=torch.tensor([ids])).logits[0, -1]
        s = s - logits[scorer.refuse_id] / len(probes)
    grads = torch.autograd.grad(s, plist, allow_unused=True)
    for p in plist:
        p.requires_grad_(False)
    for n, g in zip(names, grads):
        ref = torch.zeros_like(scorer.v[n]) if g is None else g
        assert torch.allclose(scorer.v[n], ref.float(), rtol=1e-4, atol=1e-6), n
    assert scorer.s0 == pytest.approx(float(s.detach()), rel=1e-5)
    refuse = [encode_messages(scorer.tokenizer, [{"role": "user", "content": p},
                                                 {"role": "assistant", "content": "I"}], 512, "right")
              for p in probes]
    for method in ("hooks", "brute"):
        assert np.all(scorer.score_encoded(refuse, method) < 0), method
    # the product proxy on the same probes is another direction
    both = FIHSScorer(GradShieldConfig.model_validate({"model": {"path": tiny_model_dir},
                                                      "proxy": {"max_probes": 3, "comply": "Sure"}}))
    assert any(not torch.allclose(both.v[n], scorer.v[n]) for n in names)
