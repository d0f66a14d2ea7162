"""The V4-Flash memory table: computed from meta shapes, experts packed, a load bounded by one tensor."""

import torch

from dspark_vllm.bench import v4_memory


def test_flash_drafter_memory_before_and_after(capsys):
    raw = v4_memory.flash_config()
    dev = v4_memory.device_bytes(raw, torch.bfloat16)
    experts = raw["n_routed_experts"] * 3 * raw["hidden_size"] * raw["moe_intermediate_size"] * raw["n_mtp_layers"]
    assert dev["before"]["routed experts"] == experts * 2                 # bf16
    assert dev["after"]["routed experts"] == experts // 2 + experts // 32  # packed nibbles + E8M0 per 32
    assert dev["after"]["embedding + LM head (copies)"] == 0
    host = v4_memory.host_peak(raw, torch.bfloat16)
    largest = max(b + f for _, b, f in v4_memory.checkpoint_tensors(raw, torch.bfloat16))
    assert host["after"] == largest < 2**30 < host["before"]
    v4_memory.main([])
    out = capsys.readouterr().out
    assert "peak host bytes of a load" in out and "routed experts" in out
