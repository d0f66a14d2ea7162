"""Deferred context injection: verified target features wait here until their request drafts.

Every verified token's target features must reach the drafter's context pool (fc + norm, then
K/V projections in every draft layer) before that request drafts again, but not sooner. Under
load the draft gate skips most engine steps, and projecting a few tokens per request per step
is then overhead (small GEMMs, per-call cost). Holding the features with their slot numbers and
positions and projecting them packed when the request next drafts, or once its backlog reaches
``max_tokens``, does the same arithmetic in fewer, larger calls. The pool after a flush holds
exactly what it would hold had every step been written at once: each token goes to its own
slot, so the order of flushes does not matter.

Two bounds keep the queue's memory in check: ``max_tokens`` per request and ``max_bytes`` over
all of them (past it the largest backlogs are flushed first, down to 3/4 of it). A queued token
holds m*H feature values (m fused target layers of width H).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .paged_context import PagedContextPool
from .scheduler.tuning import TUNING


class PendingContext:
    """Per request key, (features [n, m*H], slots [n], positions [n]) not yet in ``pool``."""

    VIEW_MAX_TOKENS = TUNING.queue_view_max_tokens
    MAX_TOKENS = TUNING.queue_max_tokens
    MAX_BYTES = TUNING.queue_max_bytes

    def __init__(self, drafter, pool: PagedContextPool, max_tokens: int = MAX_TOKENS,
                 max_bytes: int = MAX_BYTES) -> None:
        self.drafter = drafter
        self.pool = pool
        self.max_tokens = max_tokens
        self.max_bytes = max_bytes
        self._parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._tokens: dict[int, int] = {}
        self.total_tokens = 0
        self.token_bytes = 0  # one queued token's features (every push has the same width and dtype)

    def push_step(self, keys: list[int], features: torch.Tensor, counts: list[int], slots: torch.Tensor,
                  positions: torch.Tensor) -> None:
        """Queue one step's tokens for several requests: ``features`` [sum(counts), m*H],
        ``slots`` and ``positions`` [sum(counts)] hold ``counts[j]`` tokens of ``keys[j]`` back
        to back, and must be the caller's own copies.

        Requests keep views into them instead of copies. A view keeps the whole tensor alive, so
        in a step of more than ``VIEW_MAX_TOKENS`` tokens (a prefill) a part under half of it is
        copied: the byte budget then undercounts what is held by at most 2x, and in decode-sized
        steps by at most the step's own few tokens per request."""
        if len(keys) != len(counts) or sum(counts) != features.shape[0]:
            raise ValueError(f"push_step: {len(keys)} requests with counts summing to {sum(counts)} "
                             f"for {features.shape[0]} feature rows")
        total = features.shape[0]
        copy_small = total > self.VIEW_MAX_TOKENS
        for key, f, s, p in zip(keys, torch.split(features, counts), torch.split(slots, counts),
                                torch.split(positions, counts)):
            n = f.shape[0]
            if n == 0:
                continue
            if copy_small and 2 * n < total:
                f, s, p = f.clone(), s.clone(), p.clone()
            self._parts.setdefault(key, []).append((f, s, p))
            self._tokens[key] = self._tokens.get(key, 0) + n
            self.total_tokens += n
            self.token_bytes = f[0].numel() * f.element_size()

    @property
    def total_bytes(self) -> int:
        return self.total_tokens * self.token_bytes

    def pending_tokens(self, key: int) -> int:
        return self._tokens.get(key, 0)

    def keys(self) -> list[int]:
        return list(self._parts)

    def drop(self, key: int) -> None:
        """Forget a request's queue (its tokens will never be read)."""
        self._parts.pop(key, None)
        self.total_tokens -= self._tokens.pop(key, 0)

    def flush(self, keys: Iterable[int] | None = None) -> int:
        """Project the queued tokens of ``keys`` (default: all) into the pool in one packed call;
        returns how many tokens were written."""
        keys = [k for k in dict.fromkeys(self._parts if keys is None else keys) if k in self._parts]
        if not keys:
            return 0
        parts = [part for k in keys for part in self._parts[k]]
        count = sum(self._tokens[k] for k in keys)
        for k in keys:
            self.drop(k)
        feats, slots, positions = (torch.cat([p[i] for p in parts]) for i in range(3))
        self.pool.write(self.drafter.project_context(feats, positions), slots)
        return count

    def full_keys(self) -> list[int]:
        """Requests whose backlog reached ``max_tokens``, plus, while all backlogs together
        exceed ``max_bytes``, the largest ones until the rest fit in ``queue_refill_fraction`` of it."""
        full = [k for k, n in self._tokens.items() if n >= self.max_tokens]
        left = (self.total_tokens - sum(self._tokens[k] for k in full)) * self.token_bytes
        if left > self.max_bytes:
            for k in sorted(set(self._tokens) - set(full), key=self._tokens.__getitem__, reverse=True):
                if left <= self.max_bytes * TUNING.queue_refill_fraction:
                    break
                full.append(k)
                left -= self._tokens[k] * self.token_bytes
        return full
