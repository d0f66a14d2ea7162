"""DeepSeek-V4 block pieces for the drafter, with the checkpoint's parameter names.

* :class:`V4Attention`: single-latent attention. Queries through a low-rank path (``wq_a`` ->
  ``q_norm`` -> ``wq_b``, then an unweighted RMSNorm per head); one shared K=V head (``wkv`` ->
  ``kv_norm``); RoPE on the trailing ``rope_head_dim`` channels, pairs interleaved; a learned
  per-head sink logit that takes part in the softmax and is then dropped; the output's rope
  channels rotated back by the query position (K = V carried the keys' rotation into the
  values); grouped low-rank output ``wo_a`` (one block per head group) then ``wo_b``.
* :class:`V4MoE`: routed experts scored by sqrt(softplus(logits)), top-k chosen on score +
  ``gate.bias`` (the correction bias), weights from the raw scores, normalised and scaled;
  plus one shared expert; SwiGLU with the gate and up projections clamped at ``swiglu_limit``.
  The routed experts are stacked (:class:`~dspark_vllm.v4.experts.RoutedExperts`, BF16 or
  MXFP4) and run without host syncs.
* :class:`HyperConnection` / :class:`HyperHead`: mHC. The residual is ``hc_mult`` streams; a
  block reads their ``pre``-weighted sum and writes ``post`` x its output plus the streams mixed
  by ``comb``, a Sinkhorn-normalised (doubly stochastic) matrix; the head collapses the streams.

The drafter's blocks attend non-causally within the block and to a trailing window of context
K/V (:meth:`V4Attention.forward`); ``causal=True`` gives the target's own causal layer, which
the tests use to check these modules against the transformers implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import V4DraftConfig
from .experts import RoutedExperts


class RMSNorm(nn.Module):
    """Weighted RMSNorm computed in float32 (V4's norms keep their weights in float32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class InterleavedRotary(nn.Module):
    """cos/sin for V4's RoPE: one frequency per channel pair, applied to the last ``dim`` channels."""

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        self.dim, self.theta = dim, theta
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)

    def _frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        return 1.0 / self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim)

    def reset(self) -> None:
        """Recompute the frequencies (after ``to_empty``: a non-persistent buffer is not loaded)."""
        self.inv_freq = self._frequencies(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., dim] (float32, each value repeated for its pair)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        return freqs.cos().repeat_interleave(2, -1), freqs.sin().repeat_interleave(2, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing cos.shape[-1] channels of x [..., S, d] with cos/sin [..., S, rd]
    (broadcast over any head axis in between); pairs (2i, 2i+1) rotate together."""
    rd = cos.shape[-1]
    nope, rope = x[..., :-rd], x[..., -rd:].float()
    pairs = rope.unflatten(-1, (-1, 2))
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat([nope, (rope * cos + swapped * sin).to(x.dtype)], dim=-1)


class GroupedLinear(nn.Module):
    """``wo_a``: a block-diagonal projection, head group g's channels -> its own o_lora_rank outputs."""

    def __init__(self, in_per_group: int, out_per_group: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups * out_per_group, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., groups, in_per_group] -> [..., groups * out_per_group]."""
        w = self.weight.view(self.groups, -1, self.weight.shape[-1])  # [g, out, in]
        return torch.einsum("...gi,goi->...go", x, w).flatten(-2)


class V4Attention(nn.Module):
    def __init__(self, config: V4DraftConfig) -> None:
        super().__init__()
        h, heads, hd = config.hidden_size, config.num_attention_heads, config.head_dim
        self.num_heads, self.head_dim, self.eps = heads, hd, config.rms_norm_eps
        self.o_groups = config.o_groups
        self.wq_a = nn.Linear(h, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = nn.Linear(config.q_lora_rank, heads * hd, bias=False)
        self.wkv = nn.Linear(h, hd, bias=False)
        self.kv_norm = RMSNorm(hd, config.rms_norm_eps)
        self.wo_a = GroupedLinear(heads * hd // config.o_groups, config.o_lora_rank, config.o_groups)
        self.wo_b = nn.Linear(config.o_groups * config.o_lora_rank, h, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(heads))

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The single K=V head of tokens x [..., S, H] at the positions of cos/sin: [..., S, d]."""
        return apply_rope(self.kv_norm(self.wkv(x)), cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x [N, D, H] at the positions of cos/sin [N, D, rd]; context K=V [N, T, d]. ``context_mask``
        [N, T]: the context each query sees (all of x too, or its past with ``causal``); or a full
        [N, D, T + D] mask of the context and x slots each query sees (packed training blocks)."""
        n, d, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))).view(n, d, self.num_heads, self.head_dim)
        q = apply_rope(unweighted_rms_norm(q, self.eps).transpose(1, 2), cos[:, None], sin[:, None])  # [N, h, D, d]
        kv = self.project_kv(x, cos, sin)  # [N, D, d]
        if context is not None:
            kv = torch.cat([context.to(kv.dtype), kv], dim=1)
        if context_mask is not None and context_mask.dim() == 3:
            visible = context_mask
        else:
            visible = torch.ones(n, d, d, dtype=torch.bool, device=x.device)
            if causal:
                visible = visible.tril()
            if context is not None:
                visible = torch.cat([context_mask[:, None, :].expand(n, d, -1), visible], dim=2)
        scores = torch.einsum("nhqd,nkd->nhqk", q.float(), kv.float()) * self.head_dim ** -0.5
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        sink = self.attn_sink.float().view(1, -1, 1, 1).expand(n, -1, d, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        out = torch.einsum("nhqk,nkd->nhqd", probs, kv.float()).to(x.dtype)
        out = apply_rope(out, cos[:, None], -sin[:, None]).transpose(1, 2)  # [N, D, h, d]
        return self.wo_b(self.wo_a(out.reshape(n, d, self.o_groups, -1)))


class SwiGLU(nn.Module):
    """One expert: w2(silu(w1 x) * w3 x), gate and up clamped at ``limit`` when given."""

    def __init__(self, hidden: int, intermediate: int, limit: float | None) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.bias = nn.Parameter(torch.zeros(experts))  # score correction: steers the choice, not the weights


SCORE_FUNCTIONS = {
    "sqrtsoftplus": lambda x: torch.sqrt(F.softplus(x)),
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: torch.softmax(x, dim=-1),
}


class V4MoE(nn.Module):
    def __init__(self, config: V4DraftConfig) -> None:
        super().__init__()
        if config.scoring_func not in SCORE_FUNCTIONS:
            raise ValueError(f"unknown scoring_func {config.scoring_func!r}; expected one of {sorted(SCORE_FUNCTIONS)}")
        h, inter, limit = config.hidden_size, config.moe_intermediate_size, config.swiglu_limit
        self.top_k, self.scale, self.normalise = config.num_experts_per_tok, config.routed_scaling_factor, config.norm_topk_prob
        self.score = SCORE_FUNCTIONS[config.scoring_func]
        self.gate = Gate(h, config.n_routed_experts)
        self.experts = RoutedExperts(config.n_routed_experts, h, inter, limit, fp4=config.experts_fp4)
        self.shared_experts = SwiGLU(h, inter, limit)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [T, H] -> (chosen experts [T, k], their weights [T, k] float32)."""
        scores = self.score(F.linear(flat.float(), self.gate.weight.float()))
        chosen = torch.topk(scores + self.gate.bias.float(), self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.normalise:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        chosen, weights = self.route(flat)
        return (self.experts(flat, chosen, weights) + self.shared_experts(flat)).view_as(x)


class HyperConnection(nn.Module):
    """mHC weights of one block from its input streams [..., hc, H]: (post, comb, collapsed)."""

    def __init__(self, config: V4DraftConfig) -> None:
        super().__init__()
        hc = config.hc_mult
        self.hc, self.iters, self.eps, self.norm_eps = hc, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + hc) * hc, hc * config.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + hc) * hc))
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hc = self.hc
        mixes = F.linear(unweighted_rms_norm(streams.flatten(-2).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([hc, hc, hc * hc])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (hc, hc)) * s_comb + comb_b.view(hc, hc), dim=-1) + self.eps
        comb = comb / (comb.sum(-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):  # Sinkhorn: rows and columns towards sum 1
            comb = comb / (comb.sum(-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(-2, keepdim=True) + self.eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(-2).to(streams.dtype)
        return post, comb, collapsed


def hc_update(streams: torch.Tensor, block_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams: post_j x block output + sum_i comb[i, j] streams_i."""
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * block_out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2),
                                                                                 streams)


class HyperHead(nn.Module):
    """Collapse the streams [..., hc, H] -> [..., H] with learned, input-dependent weights."""

    def __init__(self, config: V4DraftConfig) -> None:
        super().__init__()
        hc = config.hc_mult
        self.eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty(hc, hc * config.hidden_size))
        self.base = nn.Parameter(torch.zeros(hc))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(unweighted_rms_norm(streams.flatten(-2).float(), self.norm_eps), self.fn.float())
        pre = torch.sigmoid(mixes * self.scale.float() + self.base.float()) + self.eps
        return (pre.unsqueeze(-1) * streams).sum(-2).to(streams.dtype)


class V4Block(nn.Module):
    """One DSpark stage: mHC around attention and around the MoE."""

    def __init__(self, config: V4DraftConfig) -> None:
        super().__init__()
        self.attn = V4Attention(config)
        self.ffn = V4MoE(config)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_hc = HyperConnection(config)
        self.ffn_hc = HyperConnection(config)

    def forward(self, streams: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: torch.Tensor | None,
                context_mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
        post, comb, x = self.attn_hc(streams)
        streams = hc_update(streams, self.attn(self.attn_norm(x), cos, sin, context, context_mask, causal), post, comb)
        post, comb, x = self.ffn_hc(streams)
        return hc_update(streams, self.ffn(self.ffn_norm(x)), post, comb)
