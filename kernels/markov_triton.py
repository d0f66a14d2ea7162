"""Triton kernels for the fused Markov-head sequential sampling (reference: markov_reference.py).

Per block position k, two launches:

1. ``_markov_tile_kernel`` (grid: vocabulary tiles x request tiles). Each program loads one
   W2 tile [BLOCK_V, r] once and shares it across BLOCK_N requests: bias = E @ W2_tile^T on the
   tensor cores (E = W1[prev] for the request tile), z = U_k + bias, and reduces the tile to a
   per-request partial: best score (z for greedy rows, z/T + Gumbel for sampled rows) with its
   index, and an online-softmax pair (max, sum exp) of z/T. U_k and W2 are read exactly once
   per position regardless of batch size; nothing V-sized is written.
2. ``_markov_reduce_kernel`` (grid: requests). Merges the partials of all tiles into the draft
   token and logsumexp, computes the confidence logit w_h.h_k + w_e.W1[prev_k] + b in fp32, and
   stores the token as the next position's prev.

Only the vanilla Markov head is fused; gated and RNN heads run the PyTorch path (their per-step
gate/state update needs h_k-dependent GEMMs that do not fit this tiling).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _markov_tile_kernel(
    u_ptr, stride_un, stride_uk,
    w1_ptr, w2_ptr, prev_ptr, inv_t_ptr, greedy_ptr, seed_ptr,
    best_ptr, best_idx_ptr, max_ptr, sum_ptr,
    k, N, V, R, num_tiles,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_v = offs_v < V
    mask_r = offs_r < R

    prev = tl.load(prev_ptr + offs_n, mask=mask_n, other=0)
    e = tl.load(w1_ptr + prev[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    w2 = tl.load(w2_ptr + offs_v[:, None] * R + offs_r[None, :], mask=mask_v[:, None] & mask_r[None, :], other=0.0)
    bias = tl.dot(e.to(tl.float32), tl.trans(w2.to(tl.float32)), input_precision="ieee")  # [BLOCK_N, BLOCK_V]

    u = tl.load(u_ptr + offs_n[:, None] * stride_un + k * stride_uk + offs_v[None, :],
                mask=mask_n[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
    z = u + bias
    inv_t = tl.load(inv_t_ptr + offs_n, mask=mask_n, other=1.0)
    greedy = tl.load(greedy_ptr + offs_n, mask=mask_n, other=1) != 0
    scaled = z * inv_t[:, None]
    valid = mask_n[:, None] & mask_v[None, :]
    scaled = tl.where(valid, scaled, float("-inf"))

    seed = tl.load(seed_ptr + offs_n, mask=mask_n, other=0).to(tl.int64) & 0xFFFFFFFF
    counter = (k * V + offs_v).to(tl.int64)
    x = _lowbias32((counter[None, :] ^ _lowbias32(seed)[:, None]) & 0xFFFFFFFF)
    unif = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    gumbel = -tl.log(-tl.log(unif))
    score = tl.where(greedy[:, None], z, scaled + gumbel)
    score = tl.where(valid, score, float("-inf"))

    best = tl.max(score, axis=1)
    idx = tl.argmax(score, axis=1) + pid_v * BLOCK_V
    m = tl.max(scaled, axis=1)
    m_safe = tl.where(mask_n, m, 0.0)  # padded request rows are all -inf: avoid inf - inf
    s = tl.sum(tl.exp(scaled - m_safe[:, None]), axis=1)
    out = offs_n * num_tiles + pid_v
    tl.store(best_ptr + out, best, mask=mask_n)
    tl.store(best_idx_ptr + out, idx, mask=mask_n)
    tl.store(max_ptr + out, m, mask=mask_n)
    tl.store(sum_ptr + out, s, mask=mask_n)


@triton.jit
def _markov_reduce_kernel(
    best_ptr, best_idx_ptr, max_ptr, sum_ptr,
    prev_ptr, tokens_ptr, lse_ptr, conf_ptr,
    hidden_ptr, stride_hn, stride_hk, cw_ptr, cb_ptr, w1_ptr,
    k, B, H, R, num_tiles,
    HAS_CONF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):
    n = tl.program_id(0)
    base = n * num_tiles
    run_best = float("-inf")
    run_idx = 0
    run_max = float("-inf")
    run_sum = 0.0
    for t0 in range(0, num_tiles, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        mask = offs < num_tiles
        best = tl.load(best_ptr + base + offs, mask=mask, other=float("-inf"))
        idx = tl.load(best_idx_ptr + base + offs, mask=mask, other=0)
        m = tl.load(max_ptr + base + offs, mask=mask, other=float("-inf"))
        s = tl.load(sum_ptr + base + offs, mask=mask, other=0.0)
        chunk_best = tl.max(best, axis=0)
        chunk_idx = tl.min(tl.where(best == chunk_best, idx, 2147483647), axis=0)  # lowest index on ties
        if chunk_best > run_best:  # strict: earlier tiles win ties
            run_best = chunk_best
            run_idx = chunk_idx
        chunk_max = tl.max(m, axis=0)
        new_max = tl.maximum(run_max, chunk_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(s * tl.exp(m - new_max), axis=0)
        run_max = new_max

    prev = tl.load(prev_ptr + n)
    if HAS_CONF:
        acc = tl.load(cb_ptr).to(tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mh = offs_h < H
            hv = tl.load(hidden_ptr + n * stride_hn + k * stride_hk + offs_h, mask=mh, other=0.0).to(tl.float32)
            wv = tl.load(cw_ptr + offs_h, mask=mh, other=0.0).to(tl.float32)
            acc += tl.sum(hv * wv, axis=0)
        offs_r = tl.arange(0, BLOCK_R)
        mr = offs_r < R
        ev = tl.load(w1_ptr + prev * R + offs_r, mask=mr, other=0.0).to(tl.float32)
        we = tl.load(cw_ptr + H + offs_r, mask=mr, other=0.0).to(tl.float32)
        acc += tl.sum(ev * we, axis=0)
        tl.store(conf_ptr + n * B + k, acc)
    tl.store(tokens_ptr + n * B + k, run_idx.to(tl.int64))
    tl.store(lse_ptr + n * B + k, run_max + tl.log(run_sum))
    tl.store(prev_ptr + n, run_idx.to(tl.int64))
