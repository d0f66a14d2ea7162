"""Triton grouped GEMM for routed experts (reference: ``grouped_gemm_torch`` in moe_grouped.py).

One program per (row block, output tile). Row blocks come from ``route_blocks``: each holds up
to BLOCK_M rows of a single expert (``block_expert``; -1 = an unused block, which returns at
once), so a program reads one expert's weight tile and multiplies the rows gathered through
``rows`` (-1 = padding, read as zeros). Weights are dense ([E, N, K], any float dtype) or MXFP4
(``FP4``: bytes [E, N, K/2], low nibble = even column, and E8M0 scales [E, N, K/32]), decoded
in registers tile by tile, so the packed experts are never dequantised in memory.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _e2m1_to_float(nibble):
    """FP4 E2M1 nibble (int32, 0..15) -> float32: sign bit 3, exponent bits 1-2 (bias 1), mantissa bit 0."""
    exponent = (nibble >> 1) & 3
    mantissa = (nibble & 1).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.5, (1.0 + mantissa * 0.5) * tl.exp2((exponent - 1).to(tl.float32)))
    return tl.where((nibble & 8) != 0, -magnitude, magnitude)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, stride_a, rows_ptr, block_expert_ptr,
    w_ptr, stride_we, stride_wn, s_ptr, stride_se, stride_sn,
    out_ptr, stride_o, N, K,
    FP4: tl.constexpr, BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.load(rows_ptr + offs_m)
    valid_m = rows >= 0
    mask_n = offs_n < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + tl.where(valid_m, rows, 0).to(tl.int64)[:, None] * stride_a + offs_k[None, :],
                    mask=valid_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_n[:, None] & mask_k[None, :]
        if FP4:
            byte = tl.load(w_base + (offs_k // 2)[None, :], mask=w_mask, other=0).to(tl.int32)
            nibble = tl.where((offs_k % 2 == 0)[None, :], byte & 15, byte >> 4)
            scale = tl.load(s_ptr + expert.to(tl.int64) * stride_se + offs_n[:, None] * stride_sn
                            + (offs_k // 32)[None, :], mask=w_mask, other=127).to(tl.int32)
            w = _e2m1_to_float(nibble) * tl.exp2((scale - 127).to(tl.float32))
        else:
            w = tl.load(w_base + offs_k[None, :], mask=w_mask, other=0.0)
        if BF16:
            acc += tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        else:
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_o + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid_m[:, None] & mask_n[None, :])
