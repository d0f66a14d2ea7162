"""The DeepSeek-V4 drafter's modules, loader and errors (tiny models built here, no downloads)."""

import json

import pytest
import torch
from v4_fixtures import TINY_V4, tiny_v4_folder, tiny_v4_target

from dspark_vllm.v4 import V4DraftConfig
from dspark_vllm.v4.layers import InterleavedRotary, V4Block
from dspark_vllm.v4.loader import V4CheckpointError, dequantize_fp8, load_v4_drafter


def _block_from_transformers(layer, config) -> V4Block:
    """Our V4Block holding the weights of a transformers DeepseekV4DecoderLayer."""
    block = V4Block(config)
    a, m = layer.self_attn, layer.mlp
    inter = config.moe_intermediate_size
    state = {"attn.wq_a.weight": a.q_a_proj.weight, "attn.q_norm.weight": a.q_a_norm.weight,
             "attn.wq_b.weight": a.q_b_proj.weight, "attn.wkv.weight": a.kv_proj.weight,
             "attn.kv_norm.weight": a.kv_norm.weight, "attn.wo_a.weight": a.o_a_proj.weight,
             "attn.wo_b.weight": a.o_b_proj.weight, "attn.attn_sink": a.sinks,
             "ffn.gate.weight": m.gate.weight, "ffn.gate.bias": m.gate.e_score_correction_bias,
             "ffn.shared_experts.w1.weight": m.shared_experts.gate_proj.weight,
             "ffn.shared_experts.w3.weight": m.shared_experts.up_proj.weight,
             "ffn.shared_experts.w2.weight": m.shared_experts.down_proj.weight,
             "attn_norm.weight": layer.input_layernorm.weight, "ffn_norm.weight": layer.post_attention_layernorm.weight}
    for e in range(config.n_routed_experts):
        state[f"ffn.experts.{e}.w1.weight"] = m.experts.gate_up_proj[e, :inter]
        state[f"ffn.experts.{e}.w3.weight"] = m.experts.gate_up_proj[e, inter:]
        state[f"ffn.experts.{e}.w2.weight"] = m.experts.down_proj[e]
    for hc in ("attn_hc", "ffn_hc"):
        for p in ("fn", "base", "scale"):
            state[f"{hc}.{p}"] = getattr(getattr(layer, hc), p)
    block.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return block


def test_v4_block_equals_the_transformers_decoder_layer_when_causal():
    """Attention (latent queries, K=V, interleaved partial RoPE, sinks, grouped output), the MoE
    (sqrt-softplus scores, corrected top-k, shared expert) and mHC match transformers."""
    model = tiny_v4_target(scale=0.5)
    config = V4DraftConfig(model.config.to_dict())
    layer = model.model.layers[0]  # a sliding-window layer, as the drafter's stages are
    ours = _block_from_transformers(layer, config)
    s = 12
    streams = torch.randn(1, s, config.hc_mult, config.hidden_size)
    pos = torch.arange(s)[None]
    emb = {k: model.model.rotary_emb(streams[:, :, 0], position_ids=pos, layer_type=k) for k in ("main", "compress")}
    causal = torch.full((s, s), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected = layer(streams, position_embeddings=emb, position_ids=pos, attention_mask=causal)
        cos, sin = InterleavedRotary(config.rope_head_dim, config.rope_theta)(pos)
        got = ours(streams, cos, sin, None, None, causal=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_loader_reads_mtp_tensors_and_binds_the_target_embeddings(tmp_path):
    folder = tiny_v4_folder(tmp_path)
    drafter = load_v4_drafter(folder)
    assert drafter.embeddings_bound and len(drafter.layers) == 2 and drafter.block_size == 4
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["mtp.0.main_proj.weight"] == "mtp.safetensors" and "mtp.1.hc_head_fn" in index
    assert "mtp.1.confidence_head.proj.weight" in index and "mtp.1.confidence_head.proj.bias" not in index
    target = tiny_v4_target()
    torch.testing.assert_close(drafter.lm_head.weight, target.lm_head.weight)


def test_loader_names_what_is_missing(tmp_path):
    folder = tiny_v4_folder(tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["mtp.1.attn.wkv.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(V4CheckpointError, match=r"mtp\.1\.attn\.wkv\.weight"):
        load_v4_drafter(folder)
    raw = json.loads((folder / "config.json").read_text())
    del raw["dspark_markov_rank"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(V4CheckpointError, match="missing 'dspark_markov_rank'"):
        load_v4_drafter(folder)


def test_fp8_block_scales_are_dequantised():
    w = torch.randn(200, 300)
    scale = torch.rand(2, 3) + 0.5
    full = scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    q = (w / full).to(torch.float8_e4m3fn)
    torch.testing.assert_close(dequantize_fp8(q, scale), q.float() * full)
    assert (dequantize_fp8(q, scale) - w).abs().max() < 0.1 * w.abs().max()


def test_draft_config_errors_name_the_field():
    from dspark_vllm.drafter_config import DSparkConfigError

    with pytest.raises(DSparkConfigError, match="dspark_target_layer_ids"):
        V4DraftConfig(dict(TINY_V4, dspark_markov_rank=8))
    with pytest.raises(DSparkConfigError, match=r"holds \[7\]"):
        V4DraftConfig(dict(TINY_V4, dspark_markov_rank=8, dspark_target_layer_ids=[0, 7]))


def test_mask_token_precedence_is_vllms():
    """vLLM fills the block with dflash_config.mask_token_id, else mask_token_id, else
    dspark_noise_token_id: the drafter must use the same token."""
    base = dict(TINY_V4, dspark_markov_rank=8, dspark_target_layer_ids=[0, 2])
    assert V4DraftConfig(dict(base, dspark_noise_token_id=100)).mask_token_id == 100
    assert V4DraftConfig(dict(base, dspark_noise_token_id=100, mask_token_id=101)).mask_token_id == 101
    both = dict(base, dspark_noise_token_id=100, mask_token_id=101, dflash_config={"mask_token_id": 102})
    assert V4DraftConfig(both).mask_token_id == 102
