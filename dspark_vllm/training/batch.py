"""Anchor sampling and packed training blocks (spec §1.5).

Each training row is one sequence: its context features (positions before the last anchor)
followed by A blocks [x_a, MASK x (B-1)] at positions a..a+B-1. The attention mask lets block b
see context positions < a_b and its own block (non-causally), nothing else, which is exactly
what the drafter sees at inference when a_b is the anchor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import FeatureShard


@dataclass
class TrainBatch:
    """S rows; T context slots; A blocks of B tokens per row."""

    context: torch.Tensor        # [S, T, m*H] target features (fp16)
    context_pos: torch.Tensor    # [S, T]
    block_ids: torch.Tensor      # [S, A*B] anchor then mask ids
    block_pos: torch.Tensor      # [S, A*B]
    mask: torch.Tensor           # [S, A*B, T + A*B] bool
    labels: torch.Tensor         # [S, A, B] label ids (-1 where unsupervised)
    prev: torch.Tensor           # [S, A, B] teacher-forced previous token (anchor, x*_0, ...)
    target_hidden: torch.Tensor  # [S, A, B, H] target last hidden at label position - 1 (fp16)

    @property
    def valid(self) -> torch.Tensor:
        return self.labels >= 0


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions i with loss_mask[i] and loss_mask[i+1] (an answer token followed by one)."""
    ok = loss_mask[:-1] & loss_mask[1:]
    return torch.nonzero(ok).flatten()


def build_batch(shard: FeatureShard, seq_ids: list[int], anchors_per_seq: int, block_size: int,
                mask_token_id: int, generator: torch.Generator) -> TrainBatch:
    """Sample up to ``anchors_per_seq`` anchors per sequence (uniform, without replacement)."""
    rows = []
    for s in seq_ids:
        lo, hi = int(shard.offsets[s]), int(shard.offsets[s + 1])
        cand = anchor_candidates(shard.loss_mask[lo:hi])
        if len(cand) == 0:
            continue
        pick = torch.randperm(len(cand), generator=generator)[:anchors_per_seq]
        rows.append((lo, hi, cand[pick].sort().values))
    if not rows:
        raise ValueError("no sequence in the batch has an answer of 2+ tokens")
    s_n, a_n, b_n = len(rows), anchors_per_seq, block_size
    t_n = max(int(anchors.max()) for _, _, anchors in rows)
    t_n = max(t_n, 1)
    m_h, h = shard.features.shape[1], shard.last_hidden.shape[1]
    context = torch.zeros(s_n, t_n, m_h, dtype=shard.features.dtype)
    block_ids = torch.full((s_n, a_n * b_n), mask_token_id, dtype=torch.long)
    block_pos = torch.zeros(s_n, a_n * b_n, dtype=torch.long)
    mask = torch.zeros(s_n, a_n * b_n, t_n + a_n * b_n, dtype=torch.bool)
    labels = torch.full((s_n, a_n, b_n), -1, dtype=torch.long)
    prev = torch.zeros(s_n, a_n, b_n, dtype=torch.long)
    target_hidden = torch.zeros(s_n, a_n, b_n, h, dtype=shard.last_hidden.dtype)
    j = torch.arange(b_n)
    for r, (lo, hi, anchors) in enumerate(rows):
        n = hi - lo
        toks = shard.tokens[lo:hi]
        lm = shard.loss_mask[lo:hi]
        ctx_len = min(int(anchors.max()), t_n)
        context[r, :ctx_len] = shard.features[lo: lo + ctx_len]
        for b in range(a_n):
            q = slice(b * b_n, (b + 1) * b_n)
            mask[r, q, t_n + b * b_n: t_n + (b + 1) * b_n] = True  # own block, non-causal
            if b >= len(anchors):
                continue  # padding block: sees only itself, never supervised
            a = int(anchors[b])
            block_ids[r, b * b_n] = toks[a]
            block_pos[r, q] = a + j
            mask[r, q, :a] = True
            lab_pos = a + 1 + j
            inside = lab_pos < n
            ok = inside.clone()
            ok[inside] &= lm[lab_pos[inside]]
            ok = torch.cumprod(ok.long(), 0).bool()
            k = int(ok.sum())
            labels[r, b, :k] = toks[a + 1: a + 1 + k]
            prev[r, b, 0] = toks[a]
            prev[r, b, 1:k] = toks[a + 1: a + k]
            target_hidden[r, b, :k] = shard.last_hidden[lo + a: lo + a + k]
    context_pos = torch.arange(t_n)[None, :].expand(s_n, t_n).contiguous()
    return TrainBatch(context, context_pos, block_ids, block_pos, mask, labels, prev, target_hidden)
