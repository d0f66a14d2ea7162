"""Anchor sampling and packed training blocks.

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


def sample_candidates(shard: FeatureShard) -> list[torch.Tensor]:
    """Anchor candidates of every sample (CPU), for repeated :func:`build_batch` calls."""
    mask, offsets = shard.loss_mask.cpu(), shard.offsets.tolist()
    return [anchor_candidates(mask[lo:hi]) for lo, hi in zip(offsets[:-1], offsets[1:])]


def sample_anchor_rows(shard: FeatureShard, seq_ids: list[int], anchors_per_seq: int, generator: torch.Generator,
                       candidates: list[torch.Tensor] | None = None) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, sorted anchors) per sequence that has an anchor candidate."""
    rows = []
    offsets = shard.offsets.tolist()
    for s in seq_ids:
        lo, hi = offsets[s], offsets[s + 1]
        cand = candidates[s] if candidates is not None else anchor_candidates(shard.loss_mask[lo:hi].cpu())
        if len(cand) == 0:
            continue
        pick = torch.randperm(len(cand), generator=generator)[:anchors_per_seq]
        rows.append((lo, hi, cand[pick].sort().values))
    if not rows:
        raise ValueError("no sequence in the batch has an answer of 2+ tokens")
    return rows


def build_batch(shard: FeatureShard, seq_ids: list[int], anchors_per_seq: int, block_size: int,
                mask_token_id: int, generator: torch.Generator,
                candidates: list[torch.Tensor] | None = None, context_window: int | None = None) -> TrainBatch:
    """Sample up to ``anchors_per_seq`` anchors per sequence (uniform, without replacement).
    ``context_window`` W: a block sees only the W context positions before its anchor, as a
    sliding-window drafter does at inference (None: all of them).

    Built with whole-batch gathers on the shard's device (no per-block Python loop): on a GPU the
    per-block loop cost more than the training step itself. ``candidates`` (CPU, per sample, from
    :func:`sample_candidates`) saves recomputing them from a shard that lives on a GPU."""
    rows = sample_anchor_rows(shard, seq_ids, anchors_per_seq, generator, candidates)
    dev = shard.tokens.device
    s_n, a_n, b_n = len(rows), anchors_per_seq, block_size
    t_n = max(1, max(int(anchors.max()) for _, _, anchors in rows))
    # per-block anchor (relative to its sequence), sequence start/end; padding blocks: used=False
    anchor = torch.zeros(s_n, a_n, dtype=torch.long)
    used = torch.zeros(s_n, a_n, dtype=torch.bool)
    for r, (_, _, anchors) in enumerate(rows):
        anchor[r, : len(anchors)] = anchors
        used[r, : len(anchors)] = True
    lo = torch.tensor([r[0] for r in rows])
    length = torch.tensor([r[1] - r[0] for r in rows])
    anchor, used, lo, length = (x.to(dev) for x in (anchor, used, lo, length))
    j = torch.arange(b_n, device=dev)
    last = len(shard.tokens) - 1

    # context: each row's features at positions < its last anchor (zeros after)
    t = torch.arange(t_n, device=dev)
    ctx_len = anchor.max(1).values
    ctx_ok = t[None, :] < ctx_len[:, None]
    context = shard.features[(lo[:, None] + t[None, :]).clamp_max(last)] * ctx_ok[..., None]

    # labels x*_{a+1..a+B}: inside the sequence, answer tokens, up to the first that is not
    lab_rel = anchor[..., None] + 1 + j                                    # [S, A, B]
    lab_abs = (lo[:, None, None] + lab_rel).clamp_max(last)
    ok = (lab_rel < length[:, None, None]) & shard.loss_mask[lab_abs] & used[..., None]
    ok = torch.cumprod(ok.long(), -1).bool()
    labels = torch.where(ok, shard.tokens[lab_abs], -1)
    prev_abs = lab_abs - 1                                                 # a+j: anchor, x*_0, ...
    anchor_tok = shard.tokens[lo[:, None] + anchor]
    prev = torch.where(ok, shard.tokens[prev_abs], 0)
    prev[..., 0] = torch.where(used, anchor_tok, 0)
    target_hidden = shard.last_hidden[prev_abs] * ok[..., None]

    block_ids = torch.full((s_n, a_n, b_n), mask_token_id, dtype=torch.long, device=dev)
    block_ids[..., 0] = torch.where(used, anchor_tok, mask_token_id)
    block_pos = torch.where(used[..., None], anchor[..., None] + j, 0)
    # block b sees context positions < a_b and its own block (non-causally), nothing else
    own = torch.block_diag(*[torch.ones(b_n, b_n, dtype=torch.bool, device=dev)] * a_n)
    sees_ctx = (t[None, None, :] < anchor[..., None]) & used[..., None]    # [S, A, T]
    if context_window is not None:
        sees_ctx &= t[None, None, :] >= anchor[..., None] - context_window
    mask = torch.cat([sees_ctx.repeat_interleave(b_n, dim=1), own.expand(s_n, -1, -1)], dim=-1)
    context_pos = t[None, :].expand(s_n, t_n).contiguous()
    return TrainBatch(context, context_pos, block_ids.view(s_n, a_n * b_n), block_pos.view(s_n, a_n * b_n),
                      mask, labels, prev, target_hidden)
