"""Memory-aware scoring: the chunked LM head (loss.per_example_loss never holds the whole [rows, positions,
vocab] logits) is exact against the full-logits definition for every method, and the micro-batch byte
budget (memory.py) keeps the estimated peak of every micro-batch under score.memory_budget_mb."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradshield_ray import loss as loss_mod
from gradshield_ray.batching import collate
from gradshield_ray.render import encode_messages
from tests.test_fihs_exact import assert_close, encode_all, make_scorer

MODELS = ["tiny_model_dir", "untied_model_dir", "tiny_gemma3_dir"]  # tied Llama, untied+biases, Gemma-3 soft-cap


def _chunk_tiny(monkeypatch, vocab: int, rows: int = 1, positions: int = 2) -> None:
    """Chunks of `positions` scored positions per row (the default byte size gives one chunk on a tiny vocab)."""
    monkeypatch.setattr(loss_mod, "LOGITS_CHUNK_BYTES", 4 * vocab * rows * positions)


def _head_calls(model) -> list[int]:
    calls = [0]
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("model_fx", MODELS)
def test_chunked_loss_and_gradients_equal_full_logits_in_fp64(request, sample_rows, model_fx, monkeypatch):
    """In float64 the chunked loss and its gradient for every parameter equal the model's own full-logits
    loss (soft-capping included) to 1e-12: chunking regroups the head's GEMM rows and nothing else."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(model_fx)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
    enc = [encode_messages(tok, r, 512, "right") for r in sample_rows]
    # transformers' Gemma-3 eager mask gives NaN on padded rows in float64 (fp32 is fine): one row per batch there
    groups = [[e] for e in enc] if model_fx == "tiny_gemma3_dir" else [enc]
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    calls, most = _head_calls(model), 0
    for group in groups:
        batch = collate(group, tok.pad_token_id, "right")
        ref = loss_mod.reference_loss(model, batch)
        g_ref = torch.autograd.grad(ref.sum(), params)
        _chunk_tiny(monkeypatch, model.config.vocab_size, rows=batch.size, positions=3)
        calls[0] = 0
        ours = loss_mod.per_example_loss(model, batch)
        n_chunks = calls[0]
        g = torch.autograd.grad(ours.sum(), params)
        monkeypatch.undo()
        # the backward recomputes each chunk once (checkpointing); a single chunk is not checkpointed
        assert calls[0] == (2 * n_chunks if n_chunks > 1 else 1)
        most = max(most, n_chunks)
        assert torch.isfinite(ref).all()
        assert float((ours - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
        for a, b in zip(g, g_ref):
            assert float((a - b).abs().max()) <= 1e-12 * max(float(b.abs().max()), 1e-30)
    assert most > 3, "the test must exercise several head chunks"


@pytest.mark.parametrize("model_fx", MODELS)
@pytest.mark.parametrize("method,normalize", [("hooks", "dot"), ("hooks", "cosine"), ("jvp", "dot"),
                                              ("brute", "cosine")])
def test_chunked_head_matches_full_logits_brute_force(request, sample_rows, model_fx, method, normalize,
                                                     monkeypatch):
    """Every method that uses per_example_loss, with a head chunk of 2 positions per row, against brute force
    over the full logits (one chunk). Cosine exercises the hooks' cross terms between the head's chunks
    (each chunk is one more use of the head weight, like a tied matrix's second use)."""
    path = request.getfixturevalue(model_fx)
    scope_kw = {} if method != "jvp" else {"method": "jvp"}
    full = make_scorer(path, normalize=normalize, verify_rows=0, **scope_kw)
    full.cfg.score.max_batch_size = 3
    enc = encode_all(full, sample_rows)
    brute, unchunked = full.score_encoded(enc, "brute"), full.score_encoded(enc, method)
    _chunk_tiny(monkeypatch, full.model.config.vocab_size, rows=3, positions=2)
    chunked = make_scorer(path, normalize=normalize, verify_rows=0, **scope_kw)
    chunked.cfg.score.max_batch_size = 3
    calls = _head_calls(chunked.model)
    got = chunked.score_encoded(enc, method)
    assert calls[0] > 2 * len(enc), "the head must have run in several chunks per micro-batch"
    assert_close(got, unchunked, rel=1e-6)
    # forward-mode AD rounds differently from the backward (jvp vs brute is ~1.3e-6 on the soft-capped
    # Gemma-3 with or without chunks); the reverse-mode methods stay within 1e-6 of the definition
    assert_close(got, brute, rel=1e-5 if method == "jvp" else 1e-6)


@pytest.mark.parametrize("normalize", ["dot", "cosine"])
def test_chunked_head_when_the_graph_starts_at_the_head(untied_model_dir, sample_rows, normalize, monkeypatch):
    """Scope = the untied head alone: nothing upstream needs a gradient, so the hooks start the graph at each
    chunk's logits (a fresh leaf inside the checkpoint) and the recomputed chunks must not count twice."""
    full = make_scorer(untied_model_dir, scope="regex:lm_head", normalize=normalize, verify_rows=0)
    enc = encode_all(full, sample_rows)
    brute = full.score_encoded(enc, "brute")
    _chunk_tiny(monkeypatch, full.model.config.vocab_size, rows=4, positions=1)
    chunked = make_scorer(untied_model_dir, scope="regex:lm_head", normalize=normalize, verify_rows=0)
    chunked.cfg.score.max_batch_size = 4
    assert_close(chunked.score_encoded(enc, "hooks"), brute, rel=1e-6)


# ---------------------------------------------------------------- the byte budget


def gemma3_270m_config():
    """Gemma-3-270M's text config (the shapes only; no weights are built)."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256)


def test_default_budget_keeps_gemma_full_answer_rows_under_the_box():
    """The case that was OOM-killed (issue 13): 1,024-token rows at token_budget 16384 on Gemma-3-270M. The old
    default's 16 rows are estimated far over this 24 GiB box; the CPU default budget admits what fits in 4 GiB."""
    from gradshield_ray import memory

    cfg = gemma3_270m_config()
    assert memory.activation_bytes(cfg, torch.float32, 16, 1024) > 24 * 2**30
    budget = memory.default_budget_bytes(torch.device("cpu"))
    assert budget <= 4 * 2**30
    n = memory.rows_that_fit(cfg, torch.float32, budget, 1024)
    assert n >= 1 and (n == 1 or memory.activation_bytes(cfg, torch.float32, n, 1024) <= budget)
    assert memory.activation_bytes(cfg, torch.float32, n + 1, 1024) > budget or n == 1
    # short rows pack many per batch; bf16 halves the per-token activations
    assert memory.rows_that_fit(cfg, torch.float32, 4 * 2**30, 128) >= 4 * memory.rows_that_fit(
        cfg, torch.float32, 4 * 2**30, 1024)
    assert memory.rows_that_fit(cfg, torch.bfloat16, 4 * 2**30, 512) > memory.rows_that_fit(
        cfg, torch.float32, 4 * 2**30, 512)


def test_micro_batches_respect_max_rows():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gradshield_ray.batching import micro_batches

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 300), min_size=1, max_size=80), st.integers(1, 20_000))
    def check(lengths, per_row_cap):
        fit = (lambda t: max(1, per_row_cap // t))  # rows of t tokens that fit: decreasing in t
        batches = micro_batches(lengths, 10**9, 64, 1.0, fit)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert len(b) <= fit(max(lengths[i] for i in b))

    check()


def test_memory_budget_changes_batches_not_scores(tiny_model_dir, sample_rows):
    """A budget that admits one row per micro-batch scores exactly as the default batching does."""
    wide = make_scorer(tiny_model_dir, verify_rows=0)
    narrow = make_scorer(tiny_model_dir, verify_rows=0, memory_budget_mb=1)
    enc = encode_all(wide, sample_rows)
    assert narrow.max_rows(max(e.n_tokens for e in enc), "hooks") == 1
    assert wide.max_rows(max(e.n_tokens for e in enc), "hooks") > len(enc)
    a = wide.score_encoded(enc)
    b = narrow.score_encoded(enc)
    assert narrow.stats.padded_tokens == sum(e.n_tokens for e in enc) < wide.stats.padded_tokens
    assert_close(b, a, rel=1e-6)


def test_out_of_memory_halves_the_micro_batch(tiny_model_dir, sample_rows, monkeypatch):
    """torch.OutOfMemoryError (a GPU's; none can be provoked on this CPU box, so _dots raises it for batches over
    2 rows, as a device would) makes the scorer score the two halves: same scores, every row kept; a single row
    that does not fit re-raises instead of being dropped."""
    from gradshield_ray import scorer as scorer_mod

    s = make_scorer(tiny_model_dir, verify_rows=0)
    enc = encode_all(s, sample_rows)
    expected = s.score_encoded(enc)
    real = scorer_mod.FIHSScorer._dots
    seen = []

    def small_device(self, batch, method):
        seen.append(batch.size)
        if batch.size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch, method)

    monkeypatch.setattr(scorer_mod.FIHSScorer, "_dots", small_device)
    got = s.score_encoded(enc)
    assert s.stats.oom_splits > 0 and max(seen) > 2 and all(n <= 2 for n in seen[-3:])
    assert_close(got, expected, rel=1e-6)
    monkeypatch.setattr(scorer_mod.FIHSScorer, "_dots",
                        lambda self, batch, method: (_ for _ in ()).throw(torch.OutOfMemoryError("one row")))
    with pytest.raises(torch.OutOfMemoryError, match="one row"):
        s.score_encoded(enc[:1])
