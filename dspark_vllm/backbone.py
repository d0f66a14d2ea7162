"""Draft decoder layers with target-context K/V injection.

Each layer attends from the block tokens [anchor, MASK x (B-1)] to [context ; block] without a
causal mask: context K/V come from the fused target hidden states (same H_ctx for every
layer), block K/V from the block's own hidden states. Two flavours share the code:

* qwen3: Qwen3 layer (q/k per-head RMSNorm, SwiGLU, pre-norm residual), 1/sqrt(d) scaling.
* gemma4: Gemma4 layer (extra pre/post feed-forward norms, unscaled v_norm, optional
  ``attention_k_eq_v`` where V reuses the K projection, attention scaling 1.0, layer_scalar).

Norms, MLPs and rotary tables are the transformers building blocks of the matching family, so
the numerics match the targets the drafters were trained against.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, T, d]; cos/sin [N, T, d]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class DSparkAttention(nn.Module):
    """Non-causal block attention over [injected context K/V ; block K/V]."""

    def __init__(self, hf_config: Any, family: str, dims: tuple[int, int, bool]) -> None:
        super().__init__()
        self.family = family
        hidden = hf_config.hidden_size
        self.num_heads = hf_config.num_attention_heads
        self.head_dim, self.num_kv_heads, self.k_eq_v = dims
        bias = bool(getattr(hf_config, "attention_bias", False))
        if family == "gemma4":
            from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm as Norm

            self.scaling = 1.0
        else:
            from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm as Norm

            self.scaling = 1.0 / math.sqrt(self.head_dim)
        eps = hf_config.rms_norm_eps
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = None if self.k_eq_v else nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = Norm(self.head_dim, eps=eps)
        self.k_norm = Norm(self.head_dim, eps=eps)
        self.v_norm = Norm(self.head_dim, eps=eps, with_scale=False) if family == "gemma4" else None

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V for tokens x [N, T, H] at rotary (cos, sin): ([N, n_kv, T, d], [N, n_kv, T, d])."""
        n, t, _ = x.shape
        k_raw = self.k_proj(x).view(n, t, self.num_kv_heads, self.head_dim)
        v_raw = k_raw if self.v_proj is None else self.v_proj(x).view(n, t, self.num_kv_heads, self.head_dim)
        k = apply_rope(self.k_norm(k_raw).transpose(1, 2), cos, sin)
        v = (self.v_norm(v_raw) if self.v_norm is not None else v_raw).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx_k: torch.Tensor, ctx_v: torch.Tensor, ctx_mask: torch.Tensor,
                block_slots: bool = False) -> torch.Tensor:
        """x [N, B, H] block states; ctx_k/ctx_v [N, n_kv, T, d]; ctx_mask [N, T] bool (every
        block token sees the valid context and its whole block) or a full [N, B, T + B] bool mask
        (training packs many blocks of one sequence into one row, each seeing its own block and
        the context before its anchor).

        ``block_slots=True``: ctx_k/ctx_v are [N, n_kv, T + B, d] and their last B slots are
        scratch (past every row's context); the block's K/V are written there and attention reads
        the buffers as they are. Same attention as concatenating, without copying the context
        K/V twice per layer."""
        n, b, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(n, b, self.num_heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k_blk, v_blk = self.project_kv(x, cos, sin)
        if block_slots:
            ctx_k[:, :, -b:] = k_blk
            ctx_v[:, :, -b:] = v_blk
            k, v = ctx_k, ctx_v
        else:
            k = torch.cat([ctx_k.to(k_blk.dtype), k_blk], dim=2)
            v = torch.cat([ctx_v.to(v_blk.dtype), v_blk], dim=2)
        # Grouped-query attention without copying K/V per query head: the `groups` query heads
        # that share a K/V head become `groups` x b queries of that head (every query's softmax
        # is independent, so this is the same attention). Repeating K/V instead would copy
        # [N, heads, T, d] twice per layer, a cost that grows with the context.
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(n, self.num_kv_heads, groups * b, self.head_dim)
        if ctx_mask.dim() == 3:
            mask = ctx_mask.repeat(1, groups, 1)[:, None]
        else:
            mask = torch.cat([ctx_mask, ctx_mask.new_ones(n, b)], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        out = out.reshape(n, self.num_heads, b, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(n, b, -1))


class DSparkDecoderLayer(nn.Module):
    """Pre-norm residual layer; context enters only through the attention's K/V."""

    def __init__(self, hf_config: Any, family: str, layer_idx: int, dims: tuple[int, int, bool]) -> None:
        super().__init__()
        self.family = family
        eps = hf_config.rms_norm_eps
        hidden = hf_config.hidden_size
        self.self_attn = DSparkAttention(hf_config, family, dims)
        if family == "gemma4":
            from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm, Gemma4TextMLP

            self.mlp = Gemma4TextMLP(hf_config, layer_idx)
            self.input_layernorm = Gemma4RMSNorm(hidden, eps=eps)
            self.post_attention_layernorm = Gemma4RMSNorm(hidden, eps=eps)
            self.pre_feedforward_layernorm = Gemma4RMSNorm(hidden, eps=eps)
            self.post_feedforward_layernorm = Gemma4RMSNorm(hidden, eps=eps)
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

            self.mlp = Qwen3MLP(hf_config)
            self.input_layernorm = Qwen3RMSNorm(hidden, eps=eps)
            self.post_attention_layernorm = Qwen3RMSNorm(hidden, eps=eps)

    def forward(self, x, cos, sin, ctx_k, ctx_v, ctx_mask, block_slots: bool = False):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, ctx_mask, block_slots)
        if self.family == "gemma4":
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return x * self.layer_scalar
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


def build_rotary(hf_config: Any, family: str) -> nn.Module:
    if family == "gemma4":
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

        return Gemma4TextRotaryEmbedding(hf_config)
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return Qwen3RotaryEmbedding(hf_config)


def rotary_cos_sin(rotary: nn.Module, family: str, like: torch.Tensor,
                   positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if family == "gemma4":
        return rotary(like, positions, "full_attention")
    return rotary(like, positions)
