"""Draft context K/V in a fixed pool of token slots, addressed like vLLM's paged KV cache.

The pool holds, per draft layer, K and V of shape [num_slots, n_kv, d]. Slot s holds the draft
context of the token whose *target* K/V vLLM keeps in slot s (slot = block_id x block_size +
offset, the target's own slot mapping). So the pool mirrors the engine's block table:

* bounded and accounted: it has exactly as many slots as vLLM's KV cache (the plugin takes its
  bytes out of vLLM's KV budget before vLLM sizes its cache), never grows, and is full exactly
  when vLLM's cache is full, which vLLM handles by preempting requests;
* freed with the request: when vLLM frees or reuses a block, the next writer of those slots
  overwrites them; nothing here needs freeing;
* prefix-aware: a prefix-cache hit hands a request blocks computed by an earlier request, and
  their draft context is in the same slots, so the drafter sees the whole prefix without any
  recomputation.

No vLLM import: slot numbers and block-table rows come in as plain tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .context_cache import ContextView

# A block forward gathers the context of the requests it drafts into one padded tensor per
# layer; requests are cut into chunks of at most this many gathered slots (N x (T + depth)) so
# one long context among short ones does not pad all of them to its length.
MAX_GATHER_SLOTS = 1 << 16


class PagedContextPool:
    """Per draft layer K/V [num_slots, n_kv, d]; written at target slot numbers.

    ``shared_kv``: K and V are one tensor (DeepSeek-V4's single K=V head), stored once;
    ``values`` are the same tensors as ``keys``.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, shared_kv: bool = False) -> None:
        shape = (num_slots, num_kv_heads, head_dim)
        self.shared_kv = shared_kv
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = self.keys if shared_kv else [torch.zeros(shape, device=device, dtype=dtype)
                                                   for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        shared_kv: bool = False) -> int:
        """K and V (or the one K=V tensor) of one token in every draft layer."""
        tensors = 1 if shared_kv else 2
        return tensors * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        stored = self.keys if self.shared_kv else self.keys + self.values
        return sum(t.numel() * t.element_size() for t in stored)

    def write(self, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], slots: torch.Tensor) -> None:
        """layer_kv[l] = (k, v), each [S, n_kv, d], for the tokens at ``slots`` [S] (with
        ``shared_kv`` only k is stored: v is the same tensor)."""
        for (k, v), keys, values in zip(layer_kv, self.keys, self.values):
            keys.index_copy_(0, slots, k.to(keys.dtype))
            if not self.shared_kv:
                values.index_copy_(0, slots, v.to(values.dtype))


class PagedContextView:
    """The context of N drafting requests: request n attends to its positions
    [start_n, end_n), read from the pool through its block-table row. Built without any host
    sync: ``starts``/``ends`` are host arrays (the proposer tracks them), the block table is a
    device tensor."""

    def __init__(self, pool: PagedContextPool, block_rows: torch.Tensor, block_size: int,
                 starts: np.ndarray, ends: np.ndarray) -> None:
        self.pool = pool
        self.counts = (ends - starts).astype(np.int64)
        device = pool.keys[0].device
        width = int(self.counts.max()) if len(self.counts) else 0
        start_t, count_t, end_t = to_device(np.stack([starts, self.counts, ends]).astype(np.int64), device)
        offsets = torch.arange(width, device=device)
        self.mask = offsets[None, :] < count_t[:, None]  # [N, T]
        pos = torch.where(self.mask, start_t[:, None] + offsets[None, :], start_t[:, None])
        blocks = torch.gather(block_rows.to(device).long(), 1, pos // block_size)
        self.slots = torch.where(self.mask, blocks * block_size + pos % block_size, 0)  # [N, T]
        self.positions = end_t  # anchor positions

    @property
    def batch(self) -> int:
        return len(self.counts)

    def chunks(self, spare: int, max_slots: int | None = None) -> Iterator[tuple[slice, ContextView]]:
        """Consecutive row ranges with their gathered context (``spare`` scratch slots each), at
        most ``max_slots`` gathered slots per range (default ``MAX_GATHER_SLOTS``) unless one
        request alone needs more."""
        max_slots = MAX_GATHER_SLOTS if max_slots is None else max_slots
        lo = 0
        n = self.batch
        while lo < n:
            hi, width = lo + 1, int(self.counts[lo])
            while hi < n and (hi - lo + 1) * (max(width, int(self.counts[hi])) + spare) <= max_slots:
                width = max(width, int(self.counts[hi]))
                hi += 1
            yield slice(lo, hi), self._gather(slice(lo, hi), width, spare)
            lo = hi

    def _gather(self, rows: slice, width: int, spare: int) -> ContextView:
        slots = self.slots[rows, :width]
        if spare:  # scratch: any slot will do, the block overwrites the gathered copy
            slots = torch.cat([slots, slots.new_zeros(slots.shape[0], spare)], dim=1)
        keys = [k[slots].transpose(1, 2) for k in self.pool.keys]  # [n, n_kv, T + spare, d]
        values = keys if self.pool.shared_kv else [v[slots].transpose(1, 2) for v in self.pool.values]
        return ContextView(keys=keys, values=values, mask=self.mask[rows, :width],
                           positions=self.positions[rows], spare=spare)

    def select(self, index: np.ndarray) -> "PagedContextView":
        """The same context for rows ``index`` (repeats allowed): timing runs at other sizes."""
        view = object.__new__(PagedContextView)
        pick = to_device(index.astype(np.int64), self.mask.device)
        view.pool, view.counts = self.pool, self.counts[index]
        view.mask, view.slots, view.positions = self.mask[pick], self.slots[pick], self.positions[pick]
        return view


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor without a host sync (pinned, asynchronous on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


