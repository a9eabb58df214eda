"""Summarize py-spy collapsed stacks (`py-spy record --format raw`, as benchmarks/scale.py --profile writes):
the share of on-CPU samples by thread and by the frames they pass through (inclusive), largest first.

    .venv/bin/python benchmarks/profile_summary.py runs/prof/driver-1000x4.txt [--top 40] [--match gradshield_ray]
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path


def load(path: Path) -> list[tuple[list[str], int]]:
    """(frames root→leaf, samples) per collapsed line."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            out.append((stack.split(";"), int(n)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--match", default="", help="only frames whose text matches this regex")
    a = ap.parse_args()
    stacks = load(a.profile)
    total = sum(n for _, n in stacks)
    threads, inclusive = Counter(), Counter()
    pat = re.compile(a.match) if a.match else None
    for frames, n in stacks:
        threads[frames[0]] += n
        for f in set(frames[1:]):
            if pat is None or pat.search(f):
                inclusive[f] += n
    print(f"{total} samples")
    print("by thread:")
    for t, n in threads.most_common(10):
        print(f"  {100 * n / total:5.1f}%  {t}")
    print("by frame (inclusive):")
    for f, n in inclusive.most_common(a.top):
        print(f"  {100 * n / total:5.1f}%  {f}")


if __name__ == "__main__":
    main()
