"""A stand-in for vLLM's V1 GPUModelRunner: exactly what the DSpark proposer reads from it.

Requests get blocks of ``PAGE`` tokens from a shared pool on first sight (block 0 is never
handed out, as vLLM's null block); ``step`` fills the runner's host arrays and slot mapping the
way vLLM's ``_prepare_inputs`` does, then runs the proposer as the runner patch does.
"""

from __future__ import annotations

import types

import numpy as np
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

from dspark_vllm.vllm_plugin.patches import propose_guarded

PAGE = 16
NUM_BLOCKS = 64
MAX_BLOCKS_PER_REQ = 16
KV_BYTES = 4 * 2**30  # the KV budget the runner reports (accounting only: sizes the drafting cap, allocates nothing)


class StubBlockTable:
    def __init__(self, max_reqs: int, max_tokens: int) -> None:
        self.block_size = PAGE
        self.block_table = types.SimpleNamespace(gpu=torch.zeros(max_reqs, MAX_BLOCKS_PER_REQ, dtype=torch.int32))
        self.slot_mapping = types.SimpleNamespace(gpu=torch.full((max_tokens,), -1, dtype=torch.long))


class StubRunner:
    def __init__(self, req_ids: list[str], max_reqs: int = 32, max_tokens: int = 2048) -> None:
        self.device = torch.device("cpu")
        table = StubBlockTable(max_reqs, max_tokens)
        self.input_batch = types.SimpleNamespace(
            req_ids=list(req_ids), num_computed_tokens_cpu=np.zeros(max_reqs, dtype=np.int32),
            temperature_cpu=np.zeros(max_reqs, dtype=np.float32), block_table=[table])
        spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=1, head_size=64, dtype=torch.float32)
        self.kv_cache_config = types.SimpleNamespace(  # the fields of vLLM's KVCacheConfig that are read
            num_blocks=NUM_BLOCKS, kv_cache_tensors=[types.SimpleNamespace(size=KV_BYTES)],
            kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
        self.blocks: dict[str, list[int]] = {}
        self._next_block = 1

    def set_batch(self, req_ids: list[str]) -> None:
        self.input_batch.req_ids = list(req_ids)

    def _row_blocks(self, req_id: str, upto: int) -> list[int]:
        blocks = self.blocks.setdefault(req_id, [])
        while len(blocks) * PAGE < upto:
            blocks.append(self._next_block)
            self._next_block += 1
        return blocks

    def step(self, proposer, starts: list[int], counts: list[int], sampled: list[list[int]] | None = None,
             spec: dict[str, list[int]] | None = None, width: int | None = None, seed: int = 0):
        """One engine step: batch row i had ``counts[i]`` tokens scheduled from ``starts[i]``."""
        ids = self.input_batch.req_ids
        table = self.input_batch.block_table[0]
        slots = []
        for i, (req_id, s, n) in enumerate(zip(ids, starts, counts)):
            blocks = self._row_blocks(req_id, s + n + 8)
            table.block_table.gpu[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            self.input_batch.num_computed_tokens_cpu[i] = s
            pos = np.arange(s, s + n)
            slots.append(np.asarray(blocks)[pos // PAGE] * PAGE + pos % PAGE)
        total = sum(counts)
        table.slot_mapping.gpu[:total] = torch.from_numpy(np.concatenate(slots) if slots else np.zeros(0, np.int64))
        out = types.SimpleNamespace(finished_req_ids=set(), total_num_scheduled_tokens=total,
                                    num_scheduled_tokens={r: n for r, n in zip(ids, counts)},
                                    scheduled_spec_decode_tokens=spec or {})
        width = width or proposer.drafter.config.hidden_size
        gen = torch.Generator().manual_seed(seed)
        aux = [torch.randn(total, width, generator=gen) for _ in proposer.drafter.config.target_layer_ids]
        if sampled is None:
            sampled = [[int(t)] for t in torch.randint(10, 1000, (len(ids),), generator=gen)]
        self.drafter = proposer
        return propose_guarded(self, out, sampled, aux), aux
