"""Tiny DeepSeek-V4 targets built in the test session (no downloads): a random transformers
``DeepseekV4ForCausalLM`` plus a DSpark drafter saved into the same folder as ``mtp.*``."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
BLOCK = 4
TARGET_LAYERS = [0, 2]  # includes the last layer: its output is tapped by a hook, not hidden_states

TINY_V4 = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=32,
               partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=32, hc_mult=2, hc_sinkhorn_iters=5, sliding_window=16,
               layer_types=["sliding_attention", "heavily_compressed_attention", "sliding_attention"],
               compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 4},
               mlp_layer_types=["moe", "moe", "moe"], index_n_heads=2, index_head_dim=16, index_topk=8,
               max_position_embeddings=4096, eos_token_id=1, bos_token_id=0)
DSPARK_FIELDS = dict(dspark_target_layer_ids=TARGET_LAYERS, n_mtp_layers=2, dspark_markov_rank=16,
                     dspark_block_size=BLOCK, dspark_noise_token_id=VOCAB - 1, enable_confidence_head=True)


def tiny_v4_target(seed: int = 0, scale: float = 0.0, vocab: int = VOCAB, logit_scale: float = 1.0):
    """A random tiny V4 causal LM; ``scale`` > 0 also randomises what init leaves at 0 or 1
    (sinks, mHC biases and scales, the router's correction bias), to test those paths;
    ``logit_scale`` sharpens its next-token distributions."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    fields = dict(TINY_V4, vocab_size=vocab, **dict(DSPARK_FIELDS, dspark_noise_token_id=vocab - 1))
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**fields)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    if scale:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("sinks", "hc.base", "hc.scale", "hc_base", "hc_scale")):
                    p.normal_(0.0, scale)
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.normal_(0.0, scale)
    return model


def random_v4_drafter(model, seed: int = 1, scale: float = 0.02):
    """A random DSpark V4 drafter for ``model``'s config, its embedding/head bound to the target's."""
    from dspark_vllm.v4 import DSparkV4Drafter, V4DraftConfig

    torch.manual_seed(seed)
    drafter = DSparkV4Drafter(V4DraftConfig(model.config.to_dict()))
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith(("norm.weight",)):
                p.fill_(1.0)
            elif name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, scale)
    drafter.bind_target_embeddings(model.model.embed_tokens.weight, model.lm_head.weight)
    return drafter.eval()


def tiny_v4_folder(root: Path, seed: int = 0) -> Path:
    """A V4 target folder with its drafter inside (target shard + mtp shard + index)."""
    from dspark_vllm.v4.loader import save_v4_drafter

    model = tiny_v4_target(seed)
    folder = root / "tiny-v4"
    model.save_pretrained(folder)
    save_v4_drafter(random_v4_drafter(model), folder)
    return folder


FLASH_FP8 = (".attn.wq_a.weight", ".attn.wq_b.weight", ".attn.wkv.weight", ".attn.wo_a.weight", ".attn.wo_b.weight",
             ".shared_experts.w1.weight", ".shared_experts.w2.weight", ".shared_experts.w3.weight")


def flash_layout_folder(root: Path, seed: int = 0, expert_storage: str = "int8") -> Path:
    """``tiny_v4_folder`` with its ``mtp.*`` stages rewritten as DeepSeek-V4-Flash ships them:
    routed experts MXFP4 (packed bytes as ``expert_storage``: int8, uint8 or float4_e2m1fn_x2,
    E8M0 scales as float8_e8m0fnu), attention and shared-expert projections FP8 E4M3 with E8M0
    scales per 128 x 128 tile, config.json without ``expert_dtype`` (vLLM then assumes fp4)."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    from dspark_vllm.v4.mxfp4 import quantize_mxfp4

    folder = tiny_v4_folder(root, seed)
    shard = folder / "mtp.safetensors"
    out = {}
    for name, t in load_file(str(shard)).items():
        if re.fullmatch(r"mtp\.\d+\.ffn\.experts\.\d+\.w[123]\.weight", name):
            packed, scale = quantize_mxfp4(t)
            storage = {"int8": torch.int8, "uint8": torch.uint8,
                       "float4_e2m1fn_x2": torch.float4_e2m1fn_x2}[expert_storage]
            out[name], out[name[:-7] + ".scale"] = packed.view(storage), scale.view(torch.float8_e8m0fnu)
        elif name.endswith(FLASH_FP8):
            rows, cols = t.shape
            assert rows <= 128 and cols <= 128, "one scale tile: the tiny model's projections"
            peak = t.abs().amax().clamp_min(1e-12)
            exponent = torch.ceil(torch.log2(peak / 448.0))
            out[name] = (t.float() / torch.exp2(exponent)).to(torch.float8_e4m3fn)
            grid = (-(-rows // 128), -(-cols // 128))
            out[name[:-7] + ".scale"] = torch.exp2(exponent).expand(grid).contiguous().to(torch.float8_e8m0fnu)
        else:
            out[name] = t
    save_file(out, str(shard))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update((n, shard.name) for n in out)
    index_path.write_text(json.dumps(index))
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("expert_dtype", None)
    raw["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    (folder / "config.json").write_text(json.dumps(raw))
    return folder
