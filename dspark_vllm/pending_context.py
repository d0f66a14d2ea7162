"""Deferred context injection: verified target features wait here until their row drafts.

Every verified token's target features must reach the drafter's context K/V cache (fc + norm,
then K/V projections in every draft layer) before that request drafts again, but not sooner.
Under load the draft gate skips most engine steps, and projecting a few tokens per request per
step is then pure overhead (small GEMMs, Python per call). Holding the features and projecting
them packed when the request next drafts, or once its backlog reaches ``max_tokens``, does the
same arithmetic in fewer, larger calls, and none at all for a request that finishes first.
The cache contents after a flush are the same as if every step had been added at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .context_cache import ContextKVCache


class PendingContext:
    """Per cache row, target features [n, m*H] not yet in ``cache`` (plain torch, no vLLM)."""

    def __init__(self, drafter, cache: ContextKVCache, max_tokens: int = 64) -> None:
        self.drafter = drafter
        self.cache = cache
        self.max_tokens = max_tokens
        self._parts: dict[int, list[torch.Tensor]] = {}
        self._tokens: dict[int, int] = {}

    def push(self, row: int, features: torch.Tensor) -> None:
        """Queue features [n, m*H] for ``row`` (copied, so a queued slice does not keep the whole
        step's feature tensor alive)."""
        if features.shape[0] == 0:
            return
        self._parts.setdefault(row, []).append(features.clone())
        self._tokens[row] = self._tokens.get(row, 0) + features.shape[0]

    def pending_tokens(self, row: int) -> int:
        return self._tokens.get(row, 0)

    def drop(self, row: int) -> None:
        """Forget a row's queue (its request left, or its cache row was reset)."""
        self._parts.pop(row, None)
        self._tokens.pop(row, None)

    def flush(self, rows: Iterable[int] | None = None) -> int:
        """Project the queued features of ``rows`` (default: every row) into the cache in one
        packed call; returns how many positions were added."""
        rows = [r for r in dict.fromkeys(self._parts if rows is None else rows) if r in self._parts]
        if not rows:
            return 0
        feats = torch.cat([part for r in rows for part in self._parts[r]])
        counts = torch.tensor([self._tokens[r] for r in rows])
        for r in rows:
            self.drop(r)
        self.drafter.add_context_packed(self.cache, feats, counts, rows=torch.tensor(rows))
        return int(counts.sum())

    def full_rows(self) -> list[int]:
        """Rows whose backlog reached ``max_tokens``."""
        return [r for r, n in self._tokens.items() if n >= self.max_tokens]

    def flush_full(self) -> int:
        """Flush the rows whose backlog reached ``max_tokens`` (bounds memory while gated)."""
        return self.flush(self.full_rows())
