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
