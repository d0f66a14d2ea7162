"""Routed experts without host syncs: device-side block routing and a grouped GEMM.

Terms: T tokens each choose k experts (``chosen`` [T, k], ``weights`` [T, k]); a *pair* is one
(token, choice), P = T * k of them. :func:`route_blocks` sorts the pairs by expert on the device
and lays them out in blocks of ``block_m`` rows, every block holding one expert's pairs (the
last block of an expert padded with -1). The number of blocks, ceil(P / block_m) + E, bounds
every routing, so no size depends on the routing and nothing is read back to the host.

Backends of :func:`grouped_experts`:

* ``triton``: the grouped GEMM kernel (``moe_triton.py``), dense or MXFP4 weights; CUDA, or CPU
  under ``TRITON_INTERPRET=1`` for tests;
* ``torch``: the same blocks computed with batched matmuls over per-block gathered weights (the
  kernel's reference; memory grows with blocks x expert size, so tests only);
* ``dense``: every expert over every row (``RoutedExperts.dense_forward``), the path where
  Triton cannot run. ``auto`` picks triton on CUDA, dense elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .markov_sampling import triton_available

if TYPE_CHECKING:
    from dspark_vllm.v4.experts import RoutedExperts

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 64


@dataclass(frozen=True)
class BlockRouting:
    """Pairs sorted by expert into blocks of ``block_m`` rows (R = num_blocks * block_m rows)."""

    rows: torch.Tensor          # [R] token of each row, -1 = padding
    pairs: torch.Tensor         # [R] flat pair index t * k + j of each row, -1 = padding
    block_expert: torch.Tensor  # [num_blocks] expert of each block, -1 = unused
    block_m: int


def route_blocks(chosen: torch.Tensor, num_experts: int, block_m: int = BLOCK_M) -> BlockRouting:
    """Block layout of ``chosen`` [T, k] (see the module docstring); device ops only."""
    dev = chosen.device
    flat = chosen.flatten().long()
    pairs = flat.numel()
    k = chosen.shape[1]
    num_blocks = -(-pairs // block_m) + num_experts
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)                      # [E] first block after expert e's
    segment = (block_end - blocks) * block_m                 # [E] expert e's first row
    order = torch.argsort(flat, stable=True)                 # pairs grouped by expert
    sorted_expert = flat[order]
    first = torch.cumsum(counts, 0) - counts                 # [E] expert e's first pair in order
    dest = segment[sorted_expert] + torch.arange(pairs, device=dev) - first[sorted_expert]
    rows = torch.full((num_blocks * block_m,), -1, dtype=torch.long, device=dev)
    pair_of_row = torch.full_like(rows, -1)
    rows[dest] = order // k
    pair_of_row[dest] = order
    block_expert = torch.searchsorted(block_end, torch.arange(num_blocks, device=dev), right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, torch.full_like(block_expert, -1))
    return BlockRouting(rows, pair_of_row, block_expert, block_m)


GroupedGemm = Callable[["RoutedExperts", str, torch.Tensor, torch.Tensor, BlockRouting], torch.Tensor]


def grouped_gemm_torch(experts: "RoutedExperts", name: str, a: torch.Tensor, rows: torch.Tensor,
                       routing: BlockRouting) -> torch.Tensor:
    """out [R, N]: row r = a[rows[r]] @ W_e^T for its block's expert e (0 for padding rows)."""
    blocks = routing.block_expert.numel()
    gathered = a[rows.clamp(min=0)] * (rows >= 0).unsqueeze(-1).to(a.dtype)               # [R, K]
    w = experts.weight(name, routing.block_expert.clamp(min=0), torch.float32)          # [nb, N, K]
    out = torch.bmm(gathered.float().view(blocks, routing.block_m, -1), w.transpose(1, 2))
    used = (routing.block_expert >= 0).view(blocks, 1, 1)
    return (out * used).flatten(0, 1).to(a.dtype)


def grouped_gemm_triton(experts: "RoutedExperts", name: str, a: torch.Tensor, rows: torch.Tensor,
                        routing: BlockRouting) -> torch.Tensor:
    import triton

    from .moe_triton import _grouped_gemm_kernel

    w = getattr(experts, name)
    n, k = experts.shape(name)
    a = a.contiguous()
    out = torch.zeros(rows.numel(), n, dtype=torch.float32, device=a.device)
    scale = getattr(experts, f"{name}_scale") if experts.fp4 else w
    grid = (routing.block_expert.numel(), triton.cdiv(n, BLOCK_N))
    _grouped_gemm_kernel[grid](
        a, a.stride(0), rows, routing.block_expert,
        w, w.stride(0), w.stride(1), scale, scale.stride(0), scale.stride(1),
        out, out.stride(0), n, k,
        # bf16 tensor-core dot on GPUs; Triton's CPU interpreter mis-emulates bf16 dots, so there
        # the operands are multiplied in float32 (loads, FP4 decoding and stores are the same code)
        FP4=experts.fp4, BF16=a.dtype == torch.bfloat16 and a.is_cuda,
        BLOCK_M=routing.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out.to(a.dtype)


def grouped_forward(experts: "RoutedExperts", x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                    gemm: GroupedGemm) -> torch.Tensor:
    """x [T, H] -> [T, H]: gate/up and down GEMMs over the routed blocks, weighted sum per token."""
    routing = route_blocks(chosen, experts.num_experts)
    h = experts.activation(gemm(experts, "w1", x, routing.rows, routing),
                           gemm(experts, "w3", x, routing.rows, routing))                  # [R, I]
    own_rows = torch.where(routing.rows >= 0, torch.arange(routing.rows.numel(), device=x.device), routing.rows)
    down = gemm(experts, "w2", h, own_rows, routing)                                      # [R, H]
    pair_weight = weights.flatten().float()[routing.pairs.clamp(min=0)] * (routing.pairs >= 0)
    out = torch.zeros(x.shape[0], experts.hidden, dtype=torch.float32, device=x.device)
    out.index_add_(0, routing.rows.clamp(min=0), down.float() * pair_weight[:, None])
    return out.to(x.dtype)


def grouped_experts(experts: "RoutedExperts", x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                    backend: str = "auto") -> torch.Tensor:
    """Routed experts' weighted output [T, H] for x [T, H] (see the module docstring for backends)."""
    if backend == "auto":
        backend = "triton" if x.is_cuda and triton_available(x.device) else "dense"
    if backend == "dense":
        return experts.dense_forward(x, chosen, weights)
    if backend == "torch":
        return grouped_forward(experts, x, chosen, weights, grouped_gemm_torch)
    if backend == "triton":
        if not triton_available(x.device):
            raise RuntimeError("Triton cannot run here: use CUDA tensors or set TRITON_INTERPRET=1 before import")
        return grouped_forward(experts, x, chosen, weights, grouped_gemm_triton)
    raise ValueError(f"backend must be auto, triton, torch or dense, got {backend!r}")
