"""Draft context memory: the paged pool against a dense per-request cache, for two workloads.

    python -m dspark_vllm.bench.context_memory --max-num-seqs 256

For each drafter shape (the shipped SmolLM2 drafter; a Qwen3-8B DeepSpec drafter: 5 layers,
8 KV heads of 128, bf16) it prints, for (a) 16 requests with 2,000-token prompts and (b) one
8,000-token prompt among 15 short ones:

* dense: a [max_num_seqs, n_kv, capacity, d] K/V tensor per draft layer whose capacity every
  row shares and which doubles until the longest context (plus the block) fits (the layout of
  :class:`~dspark_vllm.context_cache.ContextKVCache`); resident as soon as it has grown;
* pool: the paged pool, one draft slot per slot of vLLM's KV cache, its bytes taken from vLLM's
  KV budget (``--kv-budget-gib``: the target's KV cache plus the pool) before vLLM sizes its
  cache; allocated once, never grown;
* in use: the pool slots the workload's requests occupy (whole blocks of ``--block-size``).

Memory figures are computed from the shapes (no tensors are allocated) with the same rules the
code applies: ``PagedContextPool.bytes_per_token`` and the plugin's D / (T + D) budget share.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from ..paged_context import PagedContextPool


@dataclass(frozen=True)
class Shape:
    name: str
    draft_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    target_layers: int
    target_kv_heads: int
    target_head_dim: int
    kv_budget_gib: float  # vLLM's KV cache budget where this target is served
    vocab: int = 151936   # target vocabulary (the drafter's per-step workspace is vocabulary-wide)
    block: int = 7


SHAPES = (
    Shape("SmolLM2-135M drafter (fp32, CPU)", 2, 3, 64, torch.float32, 30, 3, 64, 1.0, vocab=49152),
    Shape("Qwen3-8B DeepSpec drafter (bf16, H200 at 0.92)", 5, 8, 128, torch.bfloat16, 36, 8, 128, 110.0),
)
WORKLOADS = {"(a) 16 x 2,000-token prompts": [2000] * 16,
             "(b) 1 x 8,000 + 15 x 200-token prompts": [8000] + [200] * 15}


def dense_bytes(shape: Shape, max_num_seqs: int, longest: int, block: int = 7, start: int = 256) -> int:
    """A dense cache's size once its shared capacity has doubled past the longest context."""
    capacity = start
    while capacity < longest + block:
        capacity = max(longest + block, 2 * capacity)
    per_token = PagedContextPool.bytes_per_token(shape.draft_layers, shape.kv_heads, shape.head_dim, shape.dtype)
    return max_num_seqs * capacity * per_token


def pool_slots(shape: Shape, budget_bytes: float) -> int:
    """Slots of vLLM's KV cache (= of the pool) when the pool takes D / (T + D) of the budget."""
    target = PagedContextPool.bytes_per_token(shape.target_layers, shape.target_kv_heads, shape.target_head_dim,
                                              shape.dtype)
    draft = PagedContextPool.bytes_per_token(shape.draft_layers, shape.kv_heads, shape.head_dim, shape.dtype)
    return int(budget_bytes / (target + draft))


def report(max_num_seqs: int, block_size: int, budget_gib: float | None) -> list[dict]:
    rows = []
    for shape in SHAPES:
        per_token = PagedContextPool.bytes_per_token(shape.draft_layers, shape.kv_heads, shape.head_dim, shape.dtype)
        budget = (budget_gib or shape.kv_budget_gib) * 2**30
        slots = pool_slots(shape, budget)
        for name, prompts in WORKLOADS.items():
            in_use = sum(math.ceil((n + 1) / block_size) * block_size for n in prompts) * per_token
            rows.append({"shape": shape.name, "workload": name, "dense": dense_bytes(shape, max_num_seqs, max(prompts)),
                         "pool": slots * per_token, "in_use": in_use, "pool_tokens": slots,
                         "fits": sum(prompts) + len(prompts) <= slots})
    return rows


def workspace_report(max_num_seqs: int, budget_gib: float | None) -> list[dict]:
    """The drafter's per-step workspace (base logits, q, a temporary; fp32, vocabulary-wide) if
    every request drafted at once (before: unbounded, outside vLLM's budget) and as reserved now
    (``vllm_plugin/workspace.py``: from the KV budget, capping the requests drafting per step)."""
    from ..vllm_plugin.workspace import bytes_per_request, max_drafting_requests, workspace_reservation

    rows = []
    for shape in SHAPES:
        budget = int((budget_gib or shape.kv_budget_gib) * 2**30)
        per = bytes_per_request(shape.block, shape.vocab)
        reserved = workspace_reservation(budget, max_num_seqs, shape.block, shape.vocab)
        cap = max_drafting_requests(budget - reserved, max_num_seqs, shape.block, shape.vocab)
        rows.append({"shape": shape.name, "unbounded": max_num_seqs * per, "reserved": reserved, "cap": cap,
                     "budget": budget})
    return rows


def _gib(x: float) -> str:
    return f"{x / 2**30:8.2f} GiB" if x >= 2**30 else f"{x / 2**20:8.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16, help="vLLM KV block size (tokens)")
    ap.add_argument("--kv-budget-gib", type=float, default=None,
                    help="vLLM KV budget (default per shape: 1 GiB on CPU, 110 GiB on an H200)")
    a = ap.parse_args(argv)
    print(f"max_num_seqs {a.max_num_seqs}, KV block {a.block_size} tokens")
    print(f"{'drafter / workload':<58}{'dense':>13}{'pool':>13}{'in use':>13}{'dense/pool':>11}{'dense/in use':>13}")
    for r in report(a.max_num_seqs, a.block_size, a.kv_budget_gib):
        label = f"{r['shape']}: {r['workload']}"
        print(f"{label[:57]:<58}{_gib(r['dense']):>13}{_gib(r['pool']):>13}{_gib(r['in_use']):>13}"
              f"{r['dense'] / r['pool']:>10.1f}x{r['dense'] / r['in_use']:>12.1f}x"
              + ("" if r["fits"] else "  (exceeds vLLM's KV cache: vLLM queues or preempts)"))
    print(f"\ndrafter workspace per step at max_num_seqs {a.max_num_seqs} (base logits + q + temporary, fp32)")
    print(f"{'drafter':<58}{'every request':>15}{'reserved':>13}{'of budget':>10}{'drafting cap':>14}")
    for r in workspace_report(a.max_num_seqs, a.kv_budget_gib):
        print(f"{r['shape'][:57]:<58}{_gib(r['unbounded']):>15}{_gib(r['reserved']):>13}"
              f"{r['reserved'] / r['budget']:>9.1%}{r['cap']:>14d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
