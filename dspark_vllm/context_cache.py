"""Dense per-request draft context K/V (DeepSpec's DynamicCache + crop, batched).

Only *context* K/V (projections of fused target hidden states) live here; the block's own K/V
are recomputed every round and never stored, so nothing needs rolling back after rejections.
Rows are requests; each row has its own valid length, and the rest of its capacity is masked.

This is the cache of the reference decoder and of training checks: a few rows, sized by the
longest one. The vLLM path keeps its context in :mod:`dspark_vllm.paged_context` instead,
addressed like vLLM's own paged KV cache, so its memory is bounded by the engine's budget.
Both hand the drafter a :class:`ContextView`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INITIAL_CAPACITY = 256  # context positions per row before the first doubling


@dataclass
class ContextView:
    """What one block forward attends to, for N requests.

    keys/values: per draft layer [N, n_kv, T + spare, d]; the first T slots are context (valid
    where ``mask`` [N, T] is True), the last ``spare`` slots are scratch where the block may put
    its own K/V in place. ``positions`` [N]: absolute position of each block's first token (the
    anchor); block token j sits at positions + j."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    positions: torch.Tensor
    spare: int = 0

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


class ContextKVCache:
    """K/V tensors [N, n_kv, capacity, d] per layer plus the valid length of each row."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, capacity: int = INITIAL_CAPACITY) -> None:
        self.num_layers = num_layers
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                bigger = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                bigger[:, :, : t.shape[2]] = t
                store[i] = bigger

    def packed_slots(self, counts: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For positions given back to back (counts[0] for the first row, then counts[1], ...):
        the cache row and the absolute position each one will occupy, both [counts.sum()]."""
        device = self.lengths.device
        counts = counts.to(device).long()
        rows = torch.arange(len(counts), device=device) if rows is None else rows.to(device).long()
        owner = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)
        offset = torch.arange(len(owner), device=device) - (torch.cumsum(counts, 0) - counts)[owner]
        dst = rows[owner]
        return dst, self.lengths[dst] + offset

    def append_packed(self, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], counts: torch.Tensor,
                      rows: torch.Tensor | None = None) -> None:
        """Append positions given back to back: layer_kv[l] = (k, v) each [S, n_kv, d] holding
        counts[0] positions of the first row, then counts[1] of the next (S = counts.sum());
        rows = which cache rows they belong to (default: all rows, in order; must be distinct)."""
        device = self.lengths.device
        counts = counts.to(device).long()
        rows = torch.arange(self.batch, device=device) if rows is None else rows.to(device).long()
        if len(rows) == 0:
            return
        end = int((self.lengths[rows] + counts).max())
        if end > self.capacity:
            self._grow(end)
        dst, dest = self.packed_slots(counts, rows)
        for layer, (k, v) in enumerate(layer_kv):
            self.keys[layer][dst, :, dest] = k.to(self.keys[layer].dtype)
            self.values[layer][dst, :, dest] = v.to(self.values[layer].dtype)
        self.lengths[rows] += counts

    def view(self, rows: torch.Tensor | None = None, spare: int = 0) -> ContextView:
        """Some rows (default: all), with ``spare`` free slots past their longest row, where a
        draft block of that many positions puts its K/V in place.

        Ascending consecutive rows are a slice of this cache, shared and not copied: the block's
        K/V then land in slots past every listed row's valid length, which the next append
        overwrites. Any other selection is gathered into a copy. Positions count from each
        row's first context token."""
        lengths = self.lengths if rows is None else self.lengths[rows]
        n = lengths.shape[0]
        upto = int(lengths.max()) if n else 0
        if upto + spare > self.capacity:
            self._grow(upto + spare)
        pick: slice | torch.Tensor = slice(0, n) if rows is None else rows
        if rows is not None and n and _is_consecutive(rows):
            first = int(rows[0])
            pick = slice(first, first + n)
        mask = torch.arange(upto, device=lengths.device)[None, :] < lengths[:, None]
        return ContextView(keys=[k[pick, :, :upto + spare] for k in self.keys],
                           values=[v[pick, :, :upto + spare] for v in self.values],
                           mask=mask, positions=lengths, spare=spare)

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Forget the context of the given rows (a request slot was reused)."""
        self.lengths[rows] = 0


def _is_consecutive(rows: torch.Tensor) -> bool:
    """rows == [a, a+1, ..., a+n-1] (a slice selects the same rows as the index tensor)."""
    return bool((rows.cpu() == torch.arange(int(rows[0]), int(rows[0]) + len(rows))).all())
