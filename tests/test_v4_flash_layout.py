"""A tiny random checkpoint in DeepSeek-V4-Flash-DSpark's real layout (MXFP4 experts, FP8
attention with E8M0 scales, ``mtp.{0,1}.*``, no ``expert_dtype`` key) loads, keeps what vLLM
keeps in float32, stores K=V once, and drafts what its dequantised weights say."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from test_v4_experts import spec_dequantize
from v4_fixtures import flash_layout_folder

from dspark_vllm.context_cache import ContextView
from dspark_vllm.paged_context import PagedContextPool
from dspark_vllm.v4 import DSparkV4Drafter, V4DraftConfig
from dspark_vllm.v4.drafter import FLOAT32_PARAMS
from dspark_vllm.v4.loader import load_v4_drafter


def stored(folder, name: str) -> torch.Tensor:
    with safe_open(str(folder / "mtp.safetensors"), "pt") as f:
        return f.get_tensor(name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return flash_layout_folder(tmp_path_factory.mktemp("flash"))


def test_fp4_experts_stay_packed_and_dequantise_to_the_spec(folder):
    drafter = load_v4_drafter(folder, dtype=torch.bfloat16)
    experts = drafter.layers[1].ffn.experts
    assert experts.fp4 and experts.w1.dtype == torch.uint8 and experts.w1_scale.dtype == torch.uint8
    assert drafter.config.experts_fp4  # detected from the tensors: config.json has no expert_dtype
    for e in range(experts.num_experts):
        for proj in ("w1", "w2", "w3"):
            packed = stored(folder, f"mtp.1.ffn.experts.{e}.{proj}.weight").view(torch.uint8)
            scale = stored(folder, f"mtp.1.ffn.experts.{e}.{proj}.scale").view(torch.uint8)
            assert torch.equal(experts.weight(proj, e, torch.float64), spec_dequantize(packed, scale))
    q = stored(folder, "mtp.0.attn.wq_a.weight")
    s = stored(folder, "mtp.0.attn.wq_a.scale")
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert torch.equal(drafter.layers[0].attn.wq_a.weight, (q.float() * s.float()).bfloat16())


@pytest.mark.parametrize("storage", ["uint8", "float4_e2m1fn_x2"])
def test_every_packed_spelling_loads_the_same_weights(folder, tmp_path, storage):
    other = flash_layout_folder(tmp_path, expert_storage=storage)
    a, b = load_v4_drafter(folder), load_v4_drafter(other)
    assert torch.equal(a.layers[0].ffn.experts.w2, b.layers[0].ffn.experts.w2)


def test_parameters_vllm_keeps_in_float32_are_float32_and_unrounded(folder):
    drafter = load_v4_drafter(folder, dtype=torch.bfloat16)
    kept = {n for n, _ in drafter.named_parameters()
            if any(__import__("fnmatch").fnmatch(n, p) for p in FLOAT32_PARAMS)}
    assert {"layers.0.attn_hc.fn", "layers.1.ffn.gate.bias", "layers.0.attn.attn_sink", "hc_head.scale",
            "confidence_head.proj.weight"} <= kept
    for name, p in drafter.named_parameters():
        assert p.dtype == (torch.float32 if name in kept else torch.bfloat16), name
    assert torch.equal(drafter.layers[1].ffn.gate.bias, stored(folder, "mtp.1.ffn.gate.bias").float())
    assert drafter.rotary_emb.inv_freq.dtype == torch.float32
    drafter.to(torch.float16)  # a later cast keeps them too
    assert drafter.layers[0].ffn_hc.base.dtype == torch.float32 and drafter.layers[0].attn.wkv.weight.dtype == torch.float16


def test_context_pool_stores_k_equals_v_once(folder):
    drafter = load_v4_drafter(folder, dtype=torch.bfloat16)
    pool = drafter.new_pool(32)
    separate = PagedContextPool(len(drafter.layers), 32, 1, drafter.config.head_dim, drafter.device, drafter.dtype)
    assert pool.nbytes * 2 == separate.nbytes
    assert drafter.context_bytes_per_token() * 2 == PagedContextPool.bytes_per_token(
        len(drafter.layers), 1, drafter.config.head_dim, drafter.dtype)
    kv = [(torch.randn(3, 1, drafter.config.head_dim),) * 2 for _ in drafter.layers]
    pool.write(kv, torch.tensor([4, 9, 17]))
    assert torch.equal(pool.values[1][9], kv[1][0][1].to(pool.values[1].dtype))


def test_fp4_drafter_drafts_what_its_dequantised_weights_say(folder):
    """The packed drafter's block hidden states equal those of a dense drafter holding the
    dequantised weights (same draft tokens follow)."""
    packed = load_v4_drafter(folder)
    dense = DSparkV4Drafter(V4DraftConfig({**packed.config.raw, "expert_dtype": "bf16"}))
    state = {}
    for name, t in packed.state_dict().items():
        if name.endswith(".scale") and ".experts." in name:
            continue
        if ".experts." in name:
            layer, e, proj = name.split(".")[1], int(name.split(".")[4]), name.split(".")[5]
            t = packed.layers[int(layer)].ffn.experts.weight(proj, e, torch.float32)
        state[name] = t
    dense.load_state_dict(state)
    dense.eval()
    g = torch.Generator().manual_seed(0)
    batch, context = 3, 12
    view = ContextView(keys=[torch.randn(batch, 1, context, packed.config.head_dim, generator=g)
                             for _ in packed.layers], values=None,
                       mask=torch.ones(batch, context, dtype=torch.bool), positions=torch.full((batch,), context))
    anchor = torch.randint(0, packed.config.vocab_size, (batch,), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(packed._forward_view(anchor, view, packed.block_size),
                                   dense._forward_view(anchor, view, packed.block_size), atol=1e-5, rtol=1e-5)
