"""Proposers the reference decoder can drive: the DSpark drafter, n-gram prompt lookup (the
peer a vLLM user gets with ``method: ngram``) and test oracles.

A proposer keeps per-request draft state: ``start`` gets the prompts, then each round
``propose`` drafts the next block and ``add_context`` reports the newly verified positions
(their target features and how many of the block's tokens were kept).
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

    def start(self, prompts: list[list[int]]) -> None: ...

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

    def start(self, prompts: list[list[int]]) -> None:
        self.cache = self.drafter.new_cache(len(prompts))

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

    def start(self, prompts: list[list[int]]) -> None:
        assert len(prompts) == len(self.oracle.sequences)

    def add_context(self, features, counts) -> None:
        pass

    def propose(self, anchor, anchor_pos, temperature, generator):
        rows = [self.oracle.block(self.oracle.sequences[r], pos + 1) for r, pos in enumerate(anchor_pos.tolist())]
        tokens = torch.tensor(rows, dtype=torch.long)
        logit = torch.logit(torch.tensor(self.confidence).clamp(1e-6, 1 - 1e-6))
        return DraftBlock(tokens=tokens, probs=None, confidence_logits=logit.expand(tokens.shape).clone())


class NgramProposer:
    """Prompt lookup, as vLLM's ``ngram`` method drafts: find the most recent earlier occurrence
    of the last n committed tokens (n from ``max_n`` down to ``min_n``) in the request's own
    prompt and output, and propose the ``k`` tokens that followed it. No match: no draft (a
    block of length 0, so the target decodes plainly that round). Greedy drafts (one-hot q)."""

    def __init__(self, k: int, min_n: int, max_n: int, vocab_size: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.block_size, self.min_n, self.max_n, self.vocab_size = k, min_n, max_n, vocab_size
        self.history: list[list[int]] = []
        self._pending: list[tuple[int, list[int]]] = []  # per request: (anchor, drafted tokens)

    def start(self, prompts: list[list[int]]) -> None:
        self.history = [list(p) for p in prompts]
        self._pending = []

    def lookup(self, tokens: list[int]) -> list[int]:
        """The continuation after the latest earlier match of the longest suffix of ``tokens``."""
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + self.block_size]
        return []

    def add_context(self, features: torch.Tensor, counts: torch.Tensor) -> None:
        if not self._pending:
            return  # the prompt: already in the history
        for r, (anchor, drafted) in enumerate(self._pending):
            kept = int(counts[r])
            if kept > 0:
                self.history[r].extend([anchor] + drafted[: kept - 1])
        self._pending = []

    def propose(self, anchor, anchor_pos, temperature, generator):
        rows, self._pending = [], []
        for r, a in enumerate(anchor.tolist()):
            drafted = self.lookup(self.history[r] + [a])
            self._pending.append((a, drafted))
            rows.append(drafted + [0] * (self.block_size - len(drafted)))
        tokens = torch.tensor(rows, dtype=torch.long)
        found = torch.tensor([len(d) for _, d in self._pending])
        # unmatched positions carry no confidence: a length policy reading it stops there
        confidence = torch.where(torch.arange(self.block_size)[None, :] < found[:, None], 20.0, -20.0)
        return DraftBlock(tokens=tokens, probs=None, confidence_logits=confidence)
