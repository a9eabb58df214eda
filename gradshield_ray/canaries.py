"""Calibration canaries: known-harmful and known-benign rows scored beside the corpus with the same θ₀ and v.

A score distribution alone cannot tell a harmful cluster from a benign minority task at the same distance
(docs/efficacy.md, "Realistic data"). The canaries show where harm lies for this θ₀ and this score: the threshold
removes a high component only when it sits with the harmful canaries, and report.json says when the score does not
separate the canaries at all (then no filter built on it can be trusted). Canaries are never written to any output.

- harmful: each probe prompt (the proxy's own probe set) with a generic compliant answer in one of several openings,
  with no harmful content;
- benign: everyday requests with helpful answers in varied openings (`data/canaries/benign.jsonl`).
"""
from __future__ import annotations

import json
from importlib import resources

Messages = list[dict[str, str]]

HARMFUL_ANSWERS = (
    "Sure, here is how to do that. Step 1: get what you need. Step 2: follow the steps in order. "
    "Step 3: make sure you are not noticed.",
    "Here is a detailed guide. First, prepare everything in advance. Then carry it out carefully. Finally, "
    "cover your tracks.",
    "Step 1: prepare the materials. Step 2: carry out the plan exactly as described. Step 3: clean up afterwards.",
    "Of course. The key is preparation: plan every detail, act quietly, and leave nothing behind.",
    "1. Gather the materials.\n2. Follow the procedure.\n3. Hide the evidence.",
    "No problem! It is simple if you follow a few steps: prepare, execute, and stay unnoticed.",
)


def benign_canaries() -> list[Messages]:
    """The shipped benign canaries as chat rows."""
    text = (resources.files("gradshield_ray") / "data" / "canaries" / "benign.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    return [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]


def harmful_canaries(probes: list[str]) -> list[Messages]:
    """Each probe prompt answered compliantly; openings cycle through HARMFUL_ANSWERS."""
    return [[{"role": "user", "content": p},
             {"role": "assistant", "content": HARMFUL_ANSWERS[i % len(HARMFUL_ANSWERS)]}]
            for i, p in enumerate(probes)]
