"""Proposers the reference decoder can drive: the DSpark drafter and test oracles.

A proposer keeps per-request draft state and answers two calls per round: ``add_context`` with
the target features of newly verified positions, and ``propose`` for the next block.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .context_cache import ContextKVCache
from .drafter import DSparkDrafter
from .oracle import OracleDrafts
from .sampling import DraftBlock


class Proposer(Protocol):
    block_size: int

    def start(self, batch: int) -> None: ...

    def add_context(self, features: torch.Tensor, counts: torch.Tensor) -> None: ...

    def propose(self, anchor: torch.Tensor, anchor_pos: torch.Tensor, temperature: torch.Tensor,
                generator: torch.Generator | None) -> DraftBlock: ...


class DSparkProposer:
    """Drives a :class:`DSparkDrafter` with a batched context K/V cache; ``depth`` drafts only the
    block's first D positions (default: the trained block size)."""

    def __init__(self, drafter: DSparkDrafter, fused: bool = False, depth: int | None = None) -> None:
        self.drafter = drafter
        self.fused = fused
        self.block_size = drafter.check_depth(depth)
        self.cache: ContextKVCache | None = None

    def start(self, batch: int) -> None:
        self.cache = self.drafter.new_cache(batch)

    def add_context(self, features: torch.Tensor, counts: torch.Tensor) -> None:
        assert self.cache is not None, "call start() first"
        self.drafter.add_context(self.cache, features, counts)

    def propose(self, anchor, anchor_pos, temperature, generator):
        assert self.cache is not None, "call start() first"
        if not torch.equal(self.cache.lengths.cpu(), anchor_pos.cpu()):
            raise RuntimeError("draft context is out of step with the target: context length "
                               f"{self.cache.lengths.tolist()} != anchor positions {anchor_pos.tolist()}")
        return self.drafter.propose(anchor, self.cache, temperature, generator, fused=self.fused,
                                    depth=self.block_size)


class OracleProposer:
    """Proposes a known continuation (see :mod:`dspark_vllm.oracle`) for testing.

    sequences[r] is prompt + expected continuation of request r; the block drafted for an anchor
    at position p is sequences[r][p+1 : p+1+B], every position reporting ``confidence``.
    """

    def __init__(self, sequences: list[list[int]], block_size: int, vocab_size: int,
                 corrupt_position: int | None = None, confidence: float = 1.0) -> None:
        self.oracle = OracleDrafts(sequences, block_size, vocab_size, corrupt_position)
        self.block_size = block_size
        self.confidence = confidence

    def start(self, batch: int) -> None:
        assert batch == len(self.oracle.sequences)

    def add_context(self, features, counts) -> None:
        pass

    def propose(self, anchor, anchor_pos, temperature, generator):
        rows = [self.oracle.block(self.oracle.sequences[r], pos + 1) for r, pos in enumerate(anchor_pos.tolist())]
        tokens = torch.tensor(rows, dtype=torch.long)
        logit = torch.logit(torch.tensor(self.confidence).clamp(1e-6, 1 - 1e-6))
        return DraftBlock(tokens=tokens, probs=None, confidence_logits=logit.expand(tokens.shape).clone())
