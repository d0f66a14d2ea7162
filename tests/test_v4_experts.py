"""DeepSeek-V4 routed experts as V4-Flash ships them: MXFP4 decoding, the sync-free grouped MoE
(Triton kernel under the interpreter, its PyTorch reference, the dense path), and host syncs
counted per draft step."""

from __future__ import annotations

import torch
import pytest

from dspark_vllm.bench.host_syncs import HostSyncCounter
from dspark_vllm.kernels.moe_grouped import grouped_experts, route_blocks
from dspark_vllm.v4.experts import RoutedExperts
from dspark_vllm.v4.mxfp4 import dequantize_mxfp4, quantize_mxfp4, unpack_e2m1

# ---- MXFP4 against the OCP Microscaling spec, element by element -----------------------------


def spec_e2m1(nibble: int) -> float:
    """OCP MX v1.0, FP4 E2M1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if nibble & 0b1000 else 1.0
    exponent, mantissa = (nibble >> 1) & 0b11, nibble & 0b1
    if exponent == 0:
        return sign * 2.0 ** (1 - 1) * (mantissa / 2)
    return sign * 2.0 ** (exponent - 1) * (1 + mantissa / 2)


def spec_e8m0(byte: int) -> float:
    """OCP MX v1.0, E8M0 scale: 2^(byte - 127), 0xFF is NaN."""
    return float("nan") if byte == 0xFF else 2.0 ** (byte - 127)


def spec_dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Row-major [rows, cols/2] bytes (even element in the low nibble), one scale per 32 elements."""
    rows, half = packed.shape
    out = torch.empty(rows, half * 2, dtype=torch.float64)
    for r in range(rows):
        for c in range(half * 2):
            byte = int(packed[r, c // 2])
            nibble = byte & 0x0F if c % 2 == 0 else byte >> 4
            out[r, c] = spec_e2m1(nibble) * spec_e8m0(int(scales[r, c // 32]))
    return out


def random_packed(experts: int, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (experts, rows, cols // 2), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 140, (experts, rows, cols // 32), generator=g, dtype=torch.uint8)
    return packed, scales


def test_mxfp4_dequantisation_matches_the_ocp_spec_on_the_v4_flash_layout():
    packed, scales = random_packed(3, 8, 64)  # [E, 2I, H/2] bytes, [E, 2I, H/32] E8M0
    got = dequantize_mxfp4(packed, scales)
    for e in range(3):
        assert torch.equal(got[e].double(), spec_dequantize(packed[e], scales[e]))
    # every checkpoint spelling of the same bytes decodes alike; E8M0 255 is NaN
    assert torch.equal(dequantize_mxfp4(packed.view(torch.int8), scales.view(torch.float8_e8m0fnu)), got)
    nan_scale = scales.clone()
    nan_scale[0, 0, 0] = 255
    assert dequantize_mxfp4(packed, nan_scale)[0, 0, :32].isnan().all()
    assert torch.equal(unpack_e2m1(torch.arange(256, dtype=torch.uint8)[None]).unique().sort().values,
                       torch.tensor(sorted({spec_e2m1(n) for n in range(16)}), dtype=torch.float32))


def test_mxfp4_nibbles_match_vllms_torch_decoder():
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import break_fp4_bytes

    packed, _ = random_packed(1, 16, 128, seed=3)
    assert torch.equal(unpack_e2m1(packed[0]), break_fp4_bytes(packed[0], torch.float32))


def test_quantiser_round_trips_what_it_produced():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    packed, scales = quantize_mxfp4(w)
    once = dequantize_mxfp4(packed, scales)
    assert (once - w).abs().max() <= w.abs().max() / 4  # within one E2M1 step of the group's peak
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(once)), once)


# ---- the routed MoE ----------------------------------------------------------------------------

E, H, INTER, TOPK = 8, 64, 32, 2


def make_experts(fp4: bool, dtype: torch.dtype = torch.float32, seed: int = 0) -> RoutedExperts:
    g = torch.Generator().manual_seed(seed)
    experts = RoutedExperts(E, H, INTER, limit=3.0, fp4=fp4)
    for name in ("w1", "w2", "w3"):
        for e in range(E):
            w = torch.randn(*experts.shape(name), generator=g) * 0.2
            experts.store(name, e, *(quantize_mxfp4(w) if fp4 else (w,)))
    return experts.to(dtype)


def loop_reference(experts: RoutedExperts, x, chosen, weights) -> torch.Tensor:
    """The drafter's former MoE loop: one host round trip per expert hit."""
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for e in chosen.unique().tolist():
        rows, slot = (chosen == e).nonzero(as_tuple=True)
        xs = x[rows].double()
        h = experts.activation(xs @ experts.weight("w1", e, torch.float64).T, xs @ experts.weight("w3", e, torch.float64).T)
        out.index_add_(0, rows, (h @ experts.weight("w2", e, torch.float64).T) * weights[rows, slot, None].double())
    return out


def routing(tokens: int, hit: int, seed: int = 0):
    """``tokens`` rows choosing TOPK distinct experts among the first ``hit``."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(hit, generator=g)[:TOPK] for _ in range(tokens)])
    return (torch.randn(tokens, H, generator=g), chosen, torch.rand(tokens, TOPK, generator=g))


def test_block_routing_covers_every_pair_once_in_single_expert_blocks():
    _, chosen, _ = routing(37, E)
    r = route_blocks(chosen, E, block_m=4)
    used = r.pairs >= 0
    assert sorted(r.pairs[used].tolist()) == list(range(chosen.numel()))
    assert torch.equal(r.rows[used], r.pairs[used] // TOPK)
    row_expert = r.block_expert.repeat_interleave(4)
    assert torch.equal(row_expert[used], chosen.flatten()[r.pairs[used]])
    assert r.block_expert.numel() == -(-chosen.numel() // 4) + E  # static: no size read from the device


@pytest.mark.parametrize("fp4", [False, True], ids=["bf16-dense", "mxfp4"])
@pytest.mark.parametrize("backend", ["dense", "torch", "triton"])
@pytest.mark.parametrize("tokens,hit", [(1, 2), (9, 3), (40, E)])
def test_every_backend_equals_the_old_loop(fp4, backend, tokens, hit):
    experts = make_experts(fp4)
    x, chosen, weights = routing(tokens, hit, seed=tokens)
    expected = loop_reference(experts, x, chosen, weights)
    got = grouped_experts(experts, x, chosen, weights, backend=backend)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_triton_kernel_in_bfloat16():
    experts = make_experts(True, torch.bfloat16)
    x, chosen, weights = routing(20, E, seed=5)
    x = x.bfloat16()
    ref = grouped_experts(experts, x, chosen, weights, backend="torch").float()
    got = grouped_experts(experts, x, chosen, weights, backend="triton").float()
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


# ---- host syncs --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_the_routed_moe_reads_nothing_back(backend):
    experts = make_experts(True)
    for tokens, hit in ((1, 2), (16, 4), (64, E)):
        x, chosen, weights = routing(tokens, hit)
        with HostSyncCounter() as counter:
            grouped_experts(experts, x, chosen, weights, backend=backend)
        assert len(counter) == 0, counter.calls
    with HostSyncCounter() as counter:  # the old loop, for contrast: one read per expert hit and more
        loop_reference(experts, x, chosen, weights)
    assert len(counter) > E


def test_draft_block_syncs_do_not_grow_with_batch_or_experts_hit():
    from dspark_vllm.context_cache import ContextView
    from v4_fixtures import random_v4_drafter, tiny_v4_target

    drafter = random_v4_drafter(tiny_v4_target())
    counts = {}
    for batch in (1, 3, 12):
        g = torch.Generator().manual_seed(batch)
        context = 10
        view = ContextView(keys=[torch.randn(batch, 1, context, drafter.config.head_dim, generator=g)
                                 for _ in drafter.layers], values=None,
                           mask=torch.ones(batch, context, dtype=torch.bool),
                           positions=torch.full((batch,), context))
        anchor = torch.randint(0, drafter.config.vocab_size, (batch,), generator=g)
        with torch.no_grad(), HostSyncCounter() as counter:
            drafter._forward_view(anchor, view, drafter.block_size)
        counts[batch] = len(counter)
    assert len(set(counts.values())) == 1, counts
    assert counts[1] == 0, counts
