"""Reference speculative decoding loop over a transformers target (the oracle for vLLM).

One round, for a batch of requests (gpt-fast style, readable in one screen):
    draft    = proposer.propose(anchor)                 # B tokens + q + confidences
    L        = verify_lengths(draft)                    # 0..B per request (policy)
    logits   = target.extend([anchor, d_0..d_{B-1}])    # one target forward, masked past L
    accepted = verify(draft, L, logits)                 # rejection sampling, lossless
    target.commit(accepted + 1); proposer.add_context(features of anchor + accepted drafts)
    anchor   = correction / bonus token
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .reference_proposers import Proposer
from .sampling import DraftBlock
from .acceptance_stats import AcceptanceStats
from .hf_target import HFTarget
from .verification import verify

VerifyLengths = Callable[[DraftBlock], torch.Tensor]
# Called once per round with (draft, verify lengths [N], accepted [N], live rows [N] bool).
RoundObserver = Callable[[DraftBlock, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class SamplingConfig:
    """Per-batch sampling settings (temperature 0 = greedy)."""

    max_new_tokens: int = 64
    temperature: float = 0.0   # for every request of the batch
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1.0: off
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: int = 0


def _cut_at_stop(tokens: list[int], accepted: int, stop: set[int]) -> tuple[list[int], int, bool]:
    """Cut emitted tokens after the first stop token; return (tokens, accepted, stopped_in_drafts)."""
    for i, tok in enumerate(tokens):
        if tok in stop:
            if i < accepted:
                return tokens[: i + 1], i + 1, True
            return tokens[: i + 1], accepted, False
    return tokens, accepted, False


class ReferenceDecoder:
    """Speculative decoding of an HF target with any :class:`Proposer` (or none: plain decoding)."""

    def __init__(self, target: HFTarget, proposer: Proposer | None,
                 verify_lengths: int | VerifyLengths | None = None,
                 observer: RoundObserver | None = None) -> None:
        self.target = target
        self.proposer = proposer
        self.block_size = proposer.block_size if proposer is not None else 0
        self.verify_lengths = verify_lengths
        self.observer = observer

    def _lengths(self, draft: DraftBlock, n: int) -> torch.Tensor:
        policy = self.verify_lengths
        if policy is None:
            return torch.full((n,), self.block_size, dtype=torch.long)
        if isinstance(policy, int):
            return torch.full((n,), min(policy, self.block_size), dtype=torch.long)
        return policy(draft).long().cpu().clamp(0, self.block_size)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> tuple[list[list[int]], AcceptanceStats]:
        start = time.perf_counter()
        n, block = len(prompts), self.block_size
        gen = torch.Generator().manual_seed(sampling.seed)
        temp = torch.full((n,), float(sampling.temperature))
        top_k = torch.full((n,), int(sampling.top_k), dtype=torch.long)
        top_p = torch.full((n,), float(sampling.top_p))
        stop = set(sampling.stop_token_ids)
        stats = AcceptanceStats(block_size=max(block, 1))

        prompt_lens = torch.tensor([len(p) for p in prompts])
        step = self.target.prefill(prompts)
        last = step.logits[torch.arange(n), prompt_lens - 1][:, None]
        first = verify(torch.zeros(n, 0, dtype=torch.long), None, torch.zeros(n), last, temp, top_k, top_p, gen)
        anchor = first.output_tokens[:, 0]
        anchor_pos = prompt_lens.clone()
        outputs = [[int(t)] for t in anchor]
        # DeepSpec's loop runs while the anchor sits before max length, i.e. while at most
        # max_new_tokens tokens are committed: a round that ends exactly at max length is
        # followed by one more (its tokens past max length are dropped, its acceptance counted).
        committed = [1] * n
        done = [int(t) in stop for t in anchor]
        if self.proposer is not None:
            self.proposer.start(prompts)
            self.proposer.add_context(step.features, prompt_lens)

        while not all(done):
            if self.proposer is not None:
                draft = self.proposer.propose(anchor, anchor_pos, temp, gen)
            else:
                draft = DraftBlock(tokens=torch.zeros(n, 0, dtype=torch.long), probs=None)
            lengths = self._lengths(draft, n)
            lengths[torch.tensor(done)] = 0
            step = self.target.extend(torch.cat([anchor[:, None], draft.tokens.cpu()], dim=1), lengths + 1)
            result = verify(draft.tokens.cpu(), None if draft.probs is None else draft.probs.cpu(), lengths,
                            step.logits.cpu(), temp, top_k, top_p, gen)
            if self.observer is not None:
                self.observer(draft, lengths.clone(), result.num_accepted.clone(), ~torch.tensor(done))
            kept = torch.zeros(n, dtype=torch.long)
            for r in range(n):
                if done[r]:
                    continue
                accepted = int(result.num_accepted[r])
                emitted, accepted_cut, stopped = _cut_at_stop(result.emitted(r), accepted, stop)
                stats.record_round(int(lengths[r]), accepted_cut, stopped)
                room = sampling.max_new_tokens - len(outputs[r])
                outputs[r].extend(emitted[:max(room, 0)])
                committed[r] += len(emitted)
                kept[r] = accepted + 1
                anchor[r] = emitted[-1]
                if emitted[-1] in stop or committed[r] > sampling.max_new_tokens:
                    done[r] = True
            self.target.commit(kept)
            if self.proposer is not None:
                self.proposer.add_context(step.features, kept)
            anchor_pos = anchor_pos + kept

        stats.generated_tokens = sum(len(o) for o in outputs)
        stats.seconds = time.perf_counter() - start
        return outputs, stats
