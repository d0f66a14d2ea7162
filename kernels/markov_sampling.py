"""Dispatch for fused Markov-head sampling: Triton where it can run, PyTorch reference otherwise.

``markov_sample(...)`` has the reference's signature and semantics (see markov_reference.py).
backend="auto" uses Triton for CUDA tensors (or CPU tensors under TRITON_INTERPRET=1 when
backend="triton" is asked for explicitly) and the reference everywhere else.
"""

from __future__ import annotations

import os

import torch

from .markov_reference import GREEDY_EPS, inverse_temperature, markov_sample_reference

BLOCK_N = 16
BLOCK_V = 128
BLOCK_T = 128


def triton_available(device: torch.device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(x: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(x, 1) - 1).bit_length())


def markov_sample_triton(base_logits, w1, w2, anchor, temperature, seeds, hidden=None, conf_weight=None,
                         conf_bias=None, block_v: int = BLOCK_V, block_n: int = BLOCK_N):
    from .markov_triton import _markov_reduce_kernel, _markov_tile_kernel

    n, block, vocab = base_logits.shape
    rank = w1.shape[1]
    dev = base_logits.device
    u = base_logits if base_logits.stride(-1) == 1 else base_logits.contiguous()
    w1c, w2c = w1.contiguous(), w2.contiguous()
    greedy = (temperature < GREEDY_EPS).to(torch.int32).to(dev)
    inv_t = inverse_temperature(temperature).to(dev)
    prev = anchor.to(dev).long().clone()
    seeds = seeds.to(dev).long()
    import triton

    tiles = triton.cdiv(vocab, block_v)
    best = torch.empty(n, tiles, device=dev, dtype=torch.float32)
    best_idx = torch.empty(n, tiles, device=dev, dtype=torch.int32)
    tmax = torch.empty_like(best)
    tsum = torch.empty_like(best)
    tokens = torch.empty(n, block, device=dev, dtype=torch.long)
    lse = torch.empty(n, block, device=dev, dtype=torch.float32)
    has_conf = conf_weight is not None and hidden is not None
    conf = torch.empty(n, block, device=dev, dtype=torch.float32) if has_conf else lse
    hid = hidden if has_conf else u
    cw = conf_weight.contiguous() if has_conf else inv_t
    cb = conf_bias.contiguous() if has_conf else inv_t
    h_dim = hidden.shape[-1] if has_conf else 1
    block_r = _next_pow2(rank)
    for k in range(block):
        _markov_tile_kernel[(tiles, triton.cdiv(n, block_n))](
            u, u.stride(0), u.stride(1), w1c, w2c, prev, inv_t, greedy, seeds,
            best, best_idx, tmax, tsum, k, n, vocab, rank, tiles,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_R=block_r)
        _markov_reduce_kernel[(n,)](
            best, best_idx, tmax, tsum, prev, tokens, lse, conf,
            hid, hid.stride(0), hid.stride(1), cw, cb, w1c, k, block, h_dim, rank, tiles,
            HAS_CONF=has_conf, BLOCK_T=BLOCK_T, BLOCK_H=min(_next_pow2(h_dim), 1024), BLOCK_R=block_r)
    return tokens, lse, (conf if has_conf else None)


def markov_sample(base_logits, w1, w2, anchor, temperature, seeds, hidden=None, conf_weight=None,
                  conf_bias=None, backend: str = "auto", all_greedy: bool | None = None):
    """Fused Markov sampling; returns (tokens [N, B], lse [N, B], conf_logits [N, B] | None).
    ``all_greedy`` (every temperature 0, known from host data) spares the reference a device check."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and base_logits.is_cuda and triton_available(base_logits.device))
    if use_triton:
        if not triton_available(base_logits.device):
            raise RuntimeError("Triton cannot run here: use CUDA tensors or set TRITON_INTERPRET=1 before import")
        return markov_sample_triton(base_logits, w1, w2, anchor, temperature, seeds, hidden, conf_weight, conf_bias)
    return markov_sample_reference(base_logits, w1, w2, anchor, temperature, seeds, hidden, conf_weight, conf_bias,
                                   all_greedy=all_greedy)
