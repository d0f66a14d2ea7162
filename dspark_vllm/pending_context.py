"""Deferred context injection: verified target features wait here until their row drafts.

Every verified token's target features must reach the drafter's context K/V cache (fc + norm,
then K/V projections in every draft layer) before that request drafts again, but not sooner.
Under load the draft gate skips most engine steps, and projecting a few tokens per request per
step is then pure overhead (small GEMMs, Python per call). Holding the features and projecting
them packed when the request next drafts, or once its backlog reaches ``max_tokens``, does the
same arithmetic in fewer, larger calls, and none at all for a request that finishes first.
The cache contents after a flush are the same as if every step had been added at once.

Two bounds keep the queue's memory in check: ``max_tokens`` per row (512) and ``max_bytes``
over all rows (256 MiB; past it the largest backlogs are flushed first, down to 3/4 of it). A
queued token holds m*H floats (SmolLM2 drafter: 5 x 576 x 4 B = 11.5 KB, 5.9 MB per full row;
a 4096-wide target: 82 KB, so the byte budget binds first with many rows). The per-row cap was
64 tokens at first: then every request that kept decoding under a closed gate projected its
backlog every 64 steps for drafts it never made, 0.8% of the vLLM worker's time at 16 clients
(py-spy), about as much as all other gated-step work together.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .context_cache import ContextKVCache


class PendingContext:
    """Per cache row, target features [n, m*H] not yet in ``cache`` (plain torch, no vLLM)."""

    VIEW_MAX_TOKENS = 64  # push_step: steps up to this size are queued as views, never copied

    def __init__(self, drafter, cache: ContextKVCache, max_tokens: int = 512,
                 max_bytes: int = 256 << 20) -> None:
        self.drafter = drafter
        self.cache = cache
        self.max_tokens = max_tokens
        self.max_bytes = max_bytes
        self._parts: dict[int, list[torch.Tensor]] = {}
        self._tokens: dict[int, int] = {}
        self.total_tokens = 0
        self.token_bytes = 0  # one queued token's features (every push has the same width and dtype)

    def push(self, row: int, features: torch.Tensor) -> None:
        """Queue features [n, m*H] for ``row`` (copied, so a queued slice does not keep the whole
        step's feature tensor alive)."""
        self._append(row, features.clone())

    def push_step(self, rows: list[int], features: torch.Tensor, counts: list[int]) -> None:
        """Queue one step's features for several rows at once: ``features`` [sum(counts), m*H]
        holds ``counts[j]`` tokens of ``rows[j]`` back to back and must be the caller's own copy.

        Rows keep views into it instead of copies (16 clones and calls per gated decode step
        were ~0.3 ms of the proposer's ~1.3 ms). A view keeps the whole tensor alive, so in a
        step of more than ``VIEW_MAX_TOKENS`` tokens (a prefill) a part under half of it is
        copied: the byte budget then undercounts what is held by at most 2x, and in decode-sized
        steps by at most the step's own few tokens per row."""
        if len(rows) != len(counts) or sum(counts) != features.shape[0]:
            raise ValueError(f"push_step: {len(rows)} rows with counts summing to {sum(counts)} "
                             f"for {features.shape[0]} feature rows")
        total = features.shape[0]
        for row, part in zip(rows, torch.split(features, counts)):
            if 0 < part.shape[0] and total > self.VIEW_MAX_TOKENS and 2 * part.shape[0] < total:
                part = part.clone()
            self._append(row, part)

    def _append(self, row: int, features: torch.Tensor) -> None:
        n = features.shape[0]
        if n == 0:
            return
        self._parts.setdefault(row, []).append(features)
        self._tokens[row] = self._tokens.get(row, 0) + n
        self.total_tokens += n
        self.token_bytes = features[0].numel() * features.element_size()

    @property
    def total_bytes(self) -> int:
        return self.total_tokens * self.token_bytes

    def pending_tokens(self, row: int) -> int:
        return self._tokens.get(row, 0)

    def drop(self, row: int) -> None:
        """Forget a row's queue (its request left, or its cache row was reset)."""
        self._parts.pop(row, None)
        self.total_tokens -= self._tokens.pop(row, 0)

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
        """Rows whose backlog reached ``max_tokens``, plus, while all backlogs together exceed
        ``max_bytes``, the largest ones until the rest fit in 3/4 of it."""
        full = [r for r, n in self._tokens.items() if n >= self.max_tokens]
        left = (self.total_tokens - sum(self._tokens[r] for r in full)) * self.token_bytes
        if left > self.max_bytes:
            for r in sorted(set(self._tokens) - set(full), key=self._tokens.__getitem__, reverse=True):
                if left <= self.max_bytes * 3 // 4:
                    break
                full.append(r)
                left -= self._tokens[r] * self.token_bytes
        return full

    def flush_full(self) -> int:
        """Flush :meth:`full_rows` (bounds memory while gated)."""
        return self.flush(self.full_rows())
