"""Batched FIHS equals the one-backward-per-example definition, for every scope and method, whatever
the batch size, batch composition, order and padding side (PROTOTYPE_FINDINGS §A: compare on scale)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradshield_ray.config import GradShieldConfig
from gradshield_ray.render import encode_messages
from gradshield_ray.scorer import FIHSScorer

SCOPES = ["all", "no_embed", "mlp", "attn", "last:1", "layers:0-0", "lora", "regex:norm"]


def make_scorer(model_dir: str, **score) -> FIHSScorer:
    """The exactness tests score every answer token (answer_tokens=None) unless told otherwise: the longer
    the loss span, the more of each method's machinery the comparison exercises. They were written for the
    comply−refuse proxy and a raw dot product (the defaults before session 6), and pin both; the refusal-only
    proxy's v is checked against autograd in test_proxy.py, and every method contracts any v alike."""
    score.setdefault("answer_tokens", None)
    score.setdefault("normalize", "dot")
    cfg = GradShieldConfig.model_validate({"model": {"path": model_dir}, "score": score,
                                           "proxy": {"max_probes": 6, "comply": "Sure"}})
    return FIHSScorer(cfg)


def encode_all(scorer, rows):
    return [encode_messages(scorer.tokenizer, r, 512, "right") for r in rows]


def assert_close(fast: np.ndarray, brute: np.ndarray, rel: float = 1e-5) -> None:
    err = np.max(np.abs(fast - brute))
    assert err <= rel * np.max(np.abs(brute)), f"max err {err:.3g} vs scale {np.max(np.abs(brute)):.3g}"


@pytest.mark.parametrize("normalize", ["dot", "cosine"])
@pytest.mark.parametrize("scope", SCOPES)
def test_hooks_match_brute_force(tiny_model_dir, sample_rows, scope, normalize):
    scorer = make_scorer(tiny_model_dir, scope=scope, normalize=normalize)
    enc = encode_all(scorer, sample_rows)
    brute = scorer.score_encoded(enc, "brute")
    assert np.all(np.isfinite(brute)) and np.max(np.abs(brute)) > 0
    rng = np.random.default_rng(0)
    for bs in (1, 3, 8):
        for side in ("right", "left"):
            scorer.cfg.score.max_batch_size = bs
            scorer.cfg.score.padding_side = side
            perm = rng.permutation(len(enc))  # shuffled order → different batch compositions
            fast = np.empty(len(enc))
            fast[perm] = scorer.score_encoded([enc[i] for i in perm], "hooks")
            assert_close(fast, brute)


@pytest.mark.parametrize("scope", ["all", "no_embed", "mlp", "lora"])
def test_factored_v_matches_brute_force(untied_model_dir, sample_rows, scope):
    """v's exact low-rank factors (V = AᵀB over probe tokens) give the same scores as the dense v."""
    scorer = make_scorer(untied_model_dir, scope=scope, v_factors="always")
    assert scorer.hooks.factors, "the capture must have recorded factors"
    for pid, (A, B) in scorer.hooks.factors.items():
        dense = scorer.hooks.v[pid]
        assert torch.allclose(A.T @ B, dense, rtol=1e-4, atol=1e-6 * float(dense.abs().max()))
    enc = encode_all(scorer, sample_rows)
    brute = scorer.score_encoded(enc, "brute")
    for side in ("right", "left"):
        scorer.cfg.score.padding_side = side
        scorer.cfg.score.max_batch_size = 3
        assert_close(scorer.score_encoded(enc, "hooks"), brute)


@pytest.mark.parametrize("scope", ["all", "mlp", "last:1", "lora"])
def test_jvp_matches_brute_force(tiny_model_dir, sample_rows, scope):
    scorer = make_scorer(tiny_model_dir, scope=scope, method="jvp")
    enc = encode_all(scorer, sample_rows)
    brute = scorer.score_encoded(enc, "brute")
    for bs, side in ((3, "left"), (8, "right")):
        scorer.cfg.score.max_batch_size = bs
        scorer.cfg.score.padding_side = side
        assert_close(scorer.score_encoded(enc, "jvp"), brute)


@pytest.mark.parametrize("normalize", ["dot", "cosine"])
@pytest.mark.parametrize("scope", ["all", "no_embed", "last:1", "lora"])
def test_vmap_matches_brute_force(tiny_model_dir, sample_rows, scope, normalize):
    scorer = make_scorer(tiny_model_dir, scope=scope, normalize=normalize, method="vmap")
    enc = encode_all(scorer, sample_rows)
    brute = scorer.score_encoded(enc, "brute")
    for bs in (1, 3, 8):
        scorer.cfg.score.max_batch_size = bs
        assert_close(scorer.score_encoded(enc, "vmap"), brute)
    scorer.cfg.score.padding_side = "left"
    with pytest.raises(ValueError, match="needs right padding"):
        scorer.score_encoded(enc, "vmap")


@pytest.mark.parametrize("model", ["untied", "tied"])
def test_sparse_rows_of_v_are_exact(untied_model_dir, tiny_model_dir, sample_rows, model, monkeypatch):
    """v reaches an LM head only through the comply and refuse logits, so the hooks contract over v's
    nonzero rows alone. An untied head takes that path by default (exactly those 2 rows); a tied
    embedding/head matrix is forced onto it here (its nonzero rows are the probes' tokens, more than the
    default share of this tiny vocabulary). Both match brute force and the dense contraction."""
    from gradshield_ray import fihs

    path = untied_model_dir if model == "untied" else tiny_model_dir
    if model == "tied":
        monkeypatch.setattr(fihs, "SPARSE_ROWS", 1.0)
    scorer = make_scorer(path, v_factors="never")
    head = scorer.model.get_output_embeddings().weight
    rows = scorer.hooks._sparse_rows(head)
    assert rows is not None
    if model == "untied":
        assert sorted(rows.tolist()) == sorted([scorer.comply_id, scorer.refuse_id])
    else:
        assert 2 < rows.numel() < head.shape[0]
    enc = encode_all(scorer, sample_rows)
    scorer.cfg.score.max_batch_size = 3
    sparse = scorer.score_encoded(enc, "hooks")
    assert_close(sparse, scorer.score_encoded(enc, "brute"))
    monkeypatch.setattr(fihs, "SPARSE_ROWS", 0.0)  # only all-zero v takes the sparse path now
    dense = make_scorer(path, v_factors="never")
    assert dense.hooks._sparse_rows(dense.model.get_output_embeddings().weight) is None
    assert_close(sparse, dense.score_encoded(enc, "hooks"), rel=1e-6)


def test_default_method_is_an_exact_one():
    from gradshield_ray.config import ScoreConfig

    assert ScoreConfig().method in ("hooks", "jvp", "vmap", "brute")
    assert ScoreConfig().method == "hooks"


@pytest.mark.parametrize("normalize", ["dot", "cosine"])
@pytest.mark.parametrize("scope", ["all", "no_embed", "last:1"])
def test_untied_biased_padding_idx_model(untied_model_dir, sample_rows, scope, normalize):
    """Biases, an untied LM head, and a pad id that is also a real token inside the rows."""
    scorer = make_scorer(untied_model_dir, scope=scope, normalize=normalize)
    pad = scorer.model.get_input_embeddings().padding_idx
    enc = encode_all(scorer, sample_rows)
    assert any(pad in e.input_ids for e in enc), "fixture must put the padding id inside real text"
    brute = scorer.score_encoded(enc, "brute")
    scorer.cfg.score.max_batch_size = 4
    assert_close(scorer.score_encoded(enc, "hooks"), brute)


def test_cosine_is_dot_over_norms(tiny_model_dir, sample_rows):
    """cosine = dot / (‖v‖‖∇L‖): check against an explicit brute-force gradient norm."""
    import torch

    from gradshield_ray.batching import collate
    from gradshield_ray.loss import per_example_loss

    dot = make_scorer(tiny_model_dir, scope="mlp", normalize="dot")
    cos = make_scorer(tiny_model_dir, scope="mlp", normalize="cosine")
    enc = encode_all(dot, sample_rows[:3])
    d, c = dot.score_encoded(enc, "hooks"), cos.score_encoded(enc, "hooks")
    plist = list(dot.params.values())
    for i, e in enumerate(enc):
        for p in plist:
            p.requires_grad_(True)
        loss = per_example_loss(dot.model, collate([e], dot.pad))[0]
        g = torch.autograd.grad(loss, plist)
        for p in plist:
            p.requires_grad_(False)
        gnorm = float(torch.sqrt(sum((x.double() ** 2).sum() for x in g)))
        assert c[i] == pytest.approx(d[i] / (dot.v_norm * gnorm), rel=1e-5)
    assert np.all(np.abs(c) <= 1.0)


def test_verification_passes_and_catches_a_wrong_method(tiny_model_dir, monkeypatch):
    """The start-up check compares the method with brute force; a broken method must fail fast."""
    from gradshield_ray import scorer as scorer_mod

    make_scorer(tiny_model_dir, verify_rows=2)  # passes
    real = scorer_mod.FIHSScorer._dots

    def wrong(self, batch, method):
        dots, sq = real(self, batch, method)
        return (dots * 1.01 if method == "hooks" else dots), sq

    monkeypatch.setattr(scorer_mod.FIHSScorer, "_dots", wrong)
    with pytest.raises(scorer_mod.VerificationError, match="differs from brute force.*use score.method=jvp"):
        make_scorer(tiny_model_dir, verify_rows=2)


def test_micro_batches_respect_budget_and_padding():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gradshield_ray.batching import micro_batches

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 300), min_size=1, max_size=80), st.integers(64, 4096),
           st.integers(1, 16), st.floats(0.05, 1.0))
    def check(lengths, budget, max_bs, max_pad):
        batches = micro_batches(lengths, budget, max_bs, max_pad)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row exactly once
        for b in batches:
            longest = max(lengths[i] for i in b)
            assert len(b) <= max_bs
            if len(b) > 1:
                assert len(b) * longest <= budget
                assert 1 - sum(lengths[i] for i in b) / (len(b) * longest) <= max_pad + 1e-12

    check()


def test_bfloat16_model_scores_close_to_fp32(tiny_model_dir, sample_rows):
    """bf16 runs the GEMMs in bf16 and the dot products in fp32/fp64: close to the fp32 scores, and the
    start-up verification passes with its bf16 tolerance."""
    cfg32 = GradShieldConfig.model_validate({"model": {"path": tiny_model_dir},
                                             "proxy": {"max_probes": 6, "comply": "Sure"}})
    cfg16 = GradShieldConfig.model_validate({"model": {"path": tiny_model_dir, "dtype": "bfloat16"},
                                             "proxy": {"max_probes": 6, "comply": "Sure"}})
    s32, s16 = FIHSScorer(cfg32), FIHSScorer(cfg16)
    e32, e16 = encode_all(s32, sample_rows), encode_all(s16, sample_rows)
    a, b = s32.score_encoded(e32, "hooks"), s16.score_encoded(e16, "hooks")
    assert np.max(np.abs(a - b)) <= 0.1 * np.max(np.abs(a))
    assert np.corrcoef(a, b)[0, 1] > 0.99


def test_opening_keeps_the_first_k_tokens_of_each_assistant_turn():
    from gradshield_ray.render import Encoded

    mask = [False, False, True, True, True, False, False, True, True, True, True, False]
    e = Encoded(list(range(12)), mask, False)
    got = e.opening(2)
    assert got.loss_mask == [False, False, True, True, False, False, False, True, True]  # cut after token 8
    assert got.input_ids == list(range(9)) and got.n_loss_tokens == 4
    assert e.opening(100).loss_mask == mask[:11]  # trailing non-loss tokens go: they cannot change the loss


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("scope", ["all", "mlp", "last:1"])
def test_answer_tokens_is_the_brute_force_score_of_the_row_opening(tiny_model_dir, sample_rows, scope, k):
    """score.answer_tokens=k scores exactly the definition applied to each row cut to its answers' openings:
    the loss over the first k tokens of every assistant turn (a multi-turn row keeps k tokens per turn)."""
    full = make_scorer(tiny_model_dir, scope=scope)
    cut = make_scorer(tiny_model_dir, scope=scope, answer_tokens=k)
    enc = encode_all(full, sample_rows)
    brute = full.score_encoded([e.opening(k) for e in enc], "brute")
    assert_close(cut.score_encoded(enc), brute)
    assert not np.allclose(brute, full.score_encoded(enc, "brute"))  # the option changes the score


@pytest.mark.parametrize("normalize", ["dot", "cosine"])
@pytest.mark.parametrize("scope", ["all", "regex:embed_tokens", "lora"])
def test_hooks_match_brute_force_on_gemma3(tiny_gemma3_dir, sample_rows, scope, normalize):
    """Gemma's embedding multiplies W[ids] by embed_scale; the hooks path once assumed out = W[ids] and was
    off by that factor on the embedding's share (found on Gemma-3-270M by benchmarks/efficacy_real_lm.py)."""
    from gradshield_ray.fihs import _embedding_scale

    scorer = make_scorer(tiny_gemma3_dir, scope=scope, normalize=normalize, verify_rows=0)
    emb = scorer.model.get_input_embeddings()
    assert type(emb).__name__ == "Gemma3TextScaledWordEmbedding" and _embedding_scale(emb) == pytest.approx(32 ** 0.5, rel=1e-3)
    enc = encode_all(scorer, sample_rows)
    assert_close(scorer.score_encoded(enc, "hooks"), scorer.score_encoded(enc, "brute"))
