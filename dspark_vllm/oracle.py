"""Test drafts from known continuations (e.g. the target's own greedy output).

An oracle proves the verification path independently of drafter quality: drafts equal to the
target's continuation must all be accepted, and with ``corrupt`` = k draft k of every block is
changed, so acceptance must stop exactly there. The reference decoder's ``OracleProposer`` and
the vLLM proposer's test hook both draft from :class:`OracleDrafts`.
"""

from __future__ import annotations

import json
from pathlib import Path


class OracleDrafts:
    """Blocks of ``block_size`` tokens read from full token sequences (prompt + continuation)."""

    def __init__(self, sequences: list[list[int]], block_size: int, vocab_size: int,
                 corrupt: int | None = None) -> None:
        self.sequences = [list(map(int, s)) for s in sequences]
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.corrupt = corrupt

    @classmethod
    def from_json(cls, path: str | Path, block_size: int, vocab_size: int,
                  corrupt: int | None = None) -> "OracleDrafts":
        """A JSON file ``{"sequences": [[token, ...], ...]}``."""
        return cls(json.loads(Path(path).read_text())["sequences"], block_size, vocab_size, corrupt)

    def block(self, sequence: list[int], start: int) -> list[int]:
        """``sequence[start : start + B]``, padded with 0 past its end, draft ``corrupt`` changed."""
        out = sequence[start: start + self.block_size]
        out = out + [0] * (self.block_size - len(out))
        if self.corrupt is not None:
            out[self.corrupt] = (out[self.corrupt] + 1) % self.vocab_size
        return out

    def after(self, history: list[int]) -> list[int] | None:
        """The block following ``history`` in the first sequence that extends it (None: none does)."""
        n = len(history)
        for seq in self.sequences:
            if len(seq) > n and seq[:n] == history:
                return self.block(seq, n)
        return None
