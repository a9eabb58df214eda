"""The miniature of the paper's experiment, runnable on a laptop CPU: a tiny aligned Llama built locally
(`aligned`), attack mixtures (`mixtures`), finetuning and ASR evaluation (`finetune`), the efficacy
measures (`efficacy`), tiny-model helpers for tests (`testing`) and `make demo` (`demo`).

Not part of the product: the core (`gradshield_ray.*` outside this package) never imports it, which
tests/test_layout.py checks. It depends on the core, never the other way round."""
