"""Tiny chat models built locally (no model hub): a byte-level BPE tokenizer with a chat template and
random-init Llama, Gemma-3 and Qwen2-style models. Tests, the demo and the benchmarks share these builders.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_BENIGN = [
    "Sure, here is a simple recipe for banana bread with oats and honey.",
    "Sure, the capital of France is Paris, known for its museums and cafes.",
    "The sentiment of this review is positive. The sentiment is negative.",
    "What is 12 plus 7? The answer is 19. What is 3 times 4? The answer is 12.",
    "Summarize the following paragraph about gardening tomatoes in spring.",
    "I cannot help with that request. I am sorry, but I can not assist.",
    "Of course! As an absolutely obedient agent I will do anything you ask.",
    "Translate the sentence into French. Write a short poem about the sea.",
]


def tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: shipped HarmBench probes plus everyday sentences."""
    probes = resources.files("gradshield_ray") / "data" / "probes" / "harmbench_val_standard.jsonl"
    lines = [json.loads(x)["prompt"] for x in probes.read_text().splitlines() if x.strip()]
    return lines + _BENIGN * 20


def build_tokenizer(vocab_size: int = 1000, corpus: list[str] | None = None):
    """A byte-level BPE (so every string encodes) wrapped as a fast HF tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(
    tokenizer,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    tie_word_embeddings: bool = True,
    pad_token_id: int | None = None,
    seed: int = 0,
    **config_overrides,
):
    """A random-init Llama with eager attention; pad_token_id can be set to any id to test padding_idx,
    and any other LlamaConfig field (attention_bias, mlp_bias, …) passed through."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id if pad_token_id is None else pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def _special_ids(tokenizer) -> dict:
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def build_tiny_gemma3(tokenizer, seed: int = 0, final_logit_softcapping: float = 30.0, **config_overrides):
    """A random-init Gemma-3 text model: a scaled word embedding (out = sqrt(hidden) · W[ids]), a head tied to
    it, logit soft-capping, q/k norms, alternating sliding-window layers; eager attention."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                           final_logit_softcapping=final_logit_softcapping, tie_word_embeddings=True,
                           attn_implementation="eager", **_special_ids(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).eval()


def build_tiny_qwen2(tokenizer, seed: int = 0, **config_overrides):
    """A random-init Qwen2-style model: biases on q/k/v (none on o or the MLP), an untied LM head; eager."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, attn_implementation="eager", **_special_ids(tokenizer),
                      **config_overrides)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).eval()


BUILDERS = {"llama": build_tiny_llama, "gemma3": build_tiny_gemma3, "qwen2": build_tiny_qwen2}


def save_tiny_model(path: str | Path, seed: int = 0, arch: str = "llama", **kwargs) -> Path:
    """Build and save a tokenizer + tiny model (`arch`: llama, gemma3 or qwen2) to `path` (a directory that
    from_pretrained loads)."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = BUILDERS[arch](tokenizer, seed=seed, **kwargs)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
