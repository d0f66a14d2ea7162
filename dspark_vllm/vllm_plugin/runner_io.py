"""Everything the proposer reads from or writes to vLLM's V1 model runner, in one place.

:func:`read_step` turns one engine step into a :class:`StepInput` of plain host arrays and
device tensors; the proposer answers with a :class:`StepDrafts`, which :func:`write_drafts`
hands back (token lists for vLLM's scheduler, q for its rejection sampler); :func:`kv_layout`
finds the KV-cache group whose slot numbers the draft context pool mirrors. Nothing here waits
for the device: host values come from the runner's own host copies (``*_cpu`` arrays, the
sampled-token lists vLLM already built for ``custom_class`` proposers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


class KVLayoutError(RuntimeError):
    """The runner has no KV-cache layout the draft context can mirror."""


@dataclass
class StepInput:
    """One engine step as the proposer needs it (batch rows in the runner's order)."""

    req_ids: list[str]
    num_scheduled: np.ndarray     # [R] tokens scheduled this step per row (0: not scheduled)
    first_pos: np.ndarray         # [R] absolute position of each row's first scheduled token
    num_spec: np.ndarray          # [R] draft tokens scheduled for verification per row
    sampled: list[list[int]]      # [R] tokens emitted this step (empty: a prefill chunk, not done)
    features: torch.Tensor        # [T, m*H] aux hidden states of the T scheduled tokens, rows back to back
    slot_mapping: torch.Tensor    # [T] target KV slot of each scheduled token
    block_table: torch.Tensor     # [R, W] block ids of each row (device)
    page_size: int                # tokens per block-table entry
    temperatures: np.ndarray      # [R]
    seeds: list[int | None]       # [R] the request's sampling seed (None: unseeded)
    finished: set[str]
    total_tokens: int             # tokens the target processed this step
    history: Callable[[int], list[int]]  # row -> prompt + output tokens (host copy; read by tests' oracle proposer)


@dataclass
class StepDrafts:
    """The proposer's answer: per-row draft token lists, and q of the drafted rows (or None)."""

    tokens: list[list[int]]
    probs: torch.Tensor | None = None   # [N, D, V] for the requests in ``prob_req_ids``
    prob_req_ids: list[str] | None = None


@dataclass(frozen=True)
class KVLayout:
    """Which KV-cache group the pool mirrors and how many token slots it has."""

    group: int
    num_slots: int
    target_bytes: int  # vLLM's own KV cache, all layers (for the log line and metrics)


def kv_layout(runner) -> KVLayout:
    """The first full-attention KV-cache group: its blocks hold every position of a request
    for the request's whole life (sliding-window groups drop old blocks)."""
    config = getattr(runner, "kv_cache_config", None)
    if config is None or not config.kv_cache_groups:
        raise KVLayoutError("the model runner has no KV cache config yet")
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    for gid, group in enumerate(config.kv_cache_groups):
        spec = group.kv_cache_spec
        if isinstance(spec, FullAttentionSpec):
            target = sum(int(t.size) for t in config.kv_cache_tensors)
            return KVLayout(gid, int(config.num_blocks) * int(spec.block_size), target)
    kinds = sorted({type(g.kv_cache_spec).__name__ for g in config.kv_cache_groups})
    raise KVLayoutError(f"DSpark needs a full-attention KV cache group to address its draft context, "
                        f"but this target has only {kinds}")


def target_bytes_per_token(kv_cache_spec: dict) -> float:
    """KV bytes one token costs the target over all its attention layers (vLLM's spec)."""
    total = 0.0
    for spec in kv_cache_spec.values():
        size, block = getattr(spec, "page_size_bytes", None), getattr(spec, "block_size", None)
        if size and block:
            total += size / block
    return total


def read_step(runner, scheduler_output, sampled_token_ids, aux_hidden_states, group: int) -> StepInput:
    """One step's inputs from the runner (no host sync)."""
    batch = runner.input_batch
    req_ids = list(batch.req_ids)
    n = len(req_ids)
    sched = scheduler_output.num_scheduled_tokens
    num_scheduled = np.fromiter((sched.get(r, 0) for r in req_ids), dtype=np.int64, count=n)
    spec = scheduler_output.scheduled_spec_decode_tokens
    num_spec = np.fromiter((len(spec.get(r, ())) for r in req_ids), dtype=np.int64, count=n)
    if isinstance(sampled_token_ids, torch.Tensor):  # other runner paths hand a padded tensor
        sampled = [[t for t in row if t >= 0] for row in sampled_token_ids.tolist()]
    else:
        sampled = [list(row) for row in sampled_token_ids]
    total = int(num_scheduled.sum())
    table = batch.block_table[group]
    return StepInput(
        req_ids=req_ids, num_scheduled=num_scheduled,
        first_pos=np.asarray(batch.num_computed_tokens_cpu[:n], dtype=np.int64).copy(),
        num_spec=num_spec, sampled=sampled,
        features=torch.cat([h[:total] for h in aux_hidden_states], dim=-1),
        slot_mapping=table.slot_mapping.gpu[:total],
        block_table=table.block_table.gpu[:n], page_size=int(table.block_size),
        temperatures=np.asarray(batch.temperature_cpu[:n], dtype=np.float64),
        seeds=request_seeds(runner, req_ids),
        finished=set(scheduler_output.finished_req_ids),
        total_tokens=int(scheduler_output.total_num_scheduled_tokens),
        history=lambda row: token_history(runner, row))


def write_drafts(runner, drafts: StepDrafts) -> list[list[int]]:
    """Hand a step's drafts back: q to vLLM's rejection sampler (rows looked up by request id;
    None: one-hot, i.e. greedy drafts), the token lists as ``propose_draft_token_ids``' result."""
    runner._draft_probs = None if drafts.probs is None else drafts.probs.to(runner.device)
    runner._draft_prob_req_ids = drafts.prob_req_ids
    return drafts.tokens


def request_seeds(runner, req_ids: list[str]) -> list[int | None]:
    """Each request's ``SamplingParams.seed`` (None when unseeded or unknown)."""
    requests = getattr(runner, "requests", {})
    seeds: list[int | None] = []
    for req_id in req_ids:
        params = getattr(requests.get(req_id), "sampling_params", None)
        seeds.append(getattr(params, "seed", None))
    return seeds


def token_history(runner, row: int) -> list[int]:
    """Prompt + output tokens of batch row ``row``."""
    batch = runner.input_batch
    return batch.token_ids_cpu[row, : int(batch.num_tokens_no_spec[row])].tolist()
