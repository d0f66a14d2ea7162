"""Rank target token ids for a drafter's draft vocabulary (``draft_vocab.json``).

A small target's LM head over its whole vocabulary dominates drafting cost on CPU (SmolLM2:
49,152 logits per drafted position). Drafting from the K ids that actually occur in the
target's answers keeps nearly all acceptance at a fraction of the cost (the idea of EAGLE-3's
reduced draft vocabulary and FR-Spec). Ranking: token frequency in the regenerated answers and
their prompts (prompt words are often copied), ties and unseen ids by ascending id (BPE ids
roughly follow merge order, i.e. corpus frequency).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from ..checkpoint import DRAFT_VOCAB_FILE


def rank_tokens(sequences: Iterable[list[int]], vocab_size: int) -> list[int]:
    """All ids 0..V-1, most frequent in ``sequences`` first, then unseen ids by ascending id."""
    counts = Counter(t for seq in sequences for t in seq if 0 <= t < vocab_size)
    seen = sorted(counts, key=lambda t: (-counts[t], t))
    seen_set = set(seen)
    return seen + [t for t in range(vocab_size) if t not in seen_set]


def coverage(token_ids: list[int], sequences: Iterable[list[int]]) -> float:
    """Fraction of the tokens in ``sequences`` that ``token_ids`` contains."""
    keep = set(token_ids)
    total = hit = 0
    for seq in sequences:
        total += len(seq)
        hit += sum(t in keep for t in seq)
    return hit / max(total, 1)


def write_draft_vocab(drafter_dir: Path, answers_file: Path, size: int, vocab_size: int,
                      holdout_every: int = 5) -> dict:
    """Rank ids from ``answers.json`` (training data), keep ``size``, write draft_vocab.json.

    Every ``holdout_every``-th sample is held out once to report the coverage a new answer can
    expect (the file's ids are then ranked on all samples)."""
    samples = json.loads(Path(answers_file).read_text())["samples"]
    if not samples:
        raise ValueError(f"{answers_file} holds no samples")
    seqs = lambda part: [s["answer_ids"] + s["prompt_ids"] for s in part]  # noqa: E731
    fit = [s for i, s in enumerate(samples) if i % holdout_every != holdout_every - 1]
    held_out = [s["answer_ids"] for i, s in enumerate(samples) if i % holdout_every == holdout_every - 1]
    fit_ids = rank_tokens(seqs(fit), vocab_size)[:size]
    ids = rank_tokens(seqs(samples), vocab_size)[:size]
    info = {"token_ids": ids, "size": len(ids), "vocab_size": vocab_size, "source": str(answers_file),
            "held_out_answer_coverage": round(coverage(fit_ids, held_out), 5) if held_out else None}
    out = Path(drafter_dir) / DRAFT_VOCAB_FILE
    out.write_text(json.dumps(info))
    return info
