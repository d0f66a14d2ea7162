"""DeepSeek-V4-Flash's DSpark drafter: device bytes per rank and peak host bytes of a load.

    python -m dspark_vllm.bench.v4_memory

Computed from shapes (the drafter is built on the meta device; no weight is read): V4-Flash's
backbone config (transformers' ``DeepseekV4Config`` defaults are V4-Flash's) with three DSpark
stages. Two loaders are compared:

* before: the whole drafter cast to the serving dtype (routed experts dequantised to it), the
  target's embedding and LM head copied into it; the load built the drafter in float32 with
  random init, read every ``mtp.*`` tensor at once and dequantised all of them to float32
  before copying (what ``load_v4_drafter`` did; FP4 experts were refused outright, so this
  counts them as if dequantised like FP8 ones);
* after: routed experts kept as MXFP4 bytes + E8M0 scales, ``FLOAT32_PARAMS`` in float32, the
  rest in the serving dtype, embedding and LM head shared with the served target; the load
  allocates the drafter once in its final dtypes on the device and holds one checkpoint tensor
  (plus its float32 dequantisation) at a time in host memory.

Checkpoint storage assumed for the host figures (V4-Flash's published layout): routed experts
MXFP4, attention and shared-expert projections FP8 with one E8M0 scale per 128 x 128 tile,
float32 for the parameters vLLM keeps in float32, the serving dtype for the rest. Every rank
of a tensor-parallel server holds the whole drafter (it is replicated), so per rank = total.
"""

from __future__ import annotations

import argparse
import math
import re
from fnmatch import fnmatch

import torch

GIB = 2**30
FP8_PROJECTIONS = re.compile(r".*\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|ffn\.shared_experts\.w[123])\.weight")
EXPERT = re.compile(r".*\.ffn\.experts\.w[123](_scale)?")


def flash_config(stages: int = 3, block_size: int = 5, markov_rank: int = 256) -> dict:
    """V4-Flash's config.json fields the drafter reads, with DSpark keys for ``stages`` stages."""
    from transformers import DeepseekV4Config

    raw = DeepseekV4Config().to_dict()
    layers = raw["num_hidden_layers"]
    raw.update(n_mtp_layers=stages, dspark_target_layer_ids=[1, layers // 2, layers - 2], dspark_markov_rank=markov_rank,
               dspark_block_size=block_size, dspark_noise_token_id=raw["vocab_size"] - 1, expert_dtype="fp4",
               enable_confidence_head=True)
    return raw


def _meta_drafter(raw: dict):
    from ..v4 import DSparkV4Drafter, V4DraftConfig

    with torch.device("meta"):
        return DSparkV4Drafter(V4DraftConfig(raw))


def _is_fp32(name: str) -> bool:
    from ..v4.drafter import FLOAT32_PARAMS

    return any(fnmatch(name, p) for p in FLOAT32_PARAMS)


def device_bytes(raw: dict, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the drafter's tensors per rank, before and after, by group."""
    width = torch.empty(0, dtype=dtype).element_size()
    dense = _meta_drafter({**raw, "expert_dtype": "bf16"})
    before = {"routed experts": 0, "embedding + LM head (copies)": 0, "rest": 0}
    for name, p in dense.named_parameters():
        group = ("routed experts" if ".experts." in name else
                 "embedding + LM head (copies)" if name.startswith(("embed_tokens", "lm_head")) else "rest")
        before[group] += p.numel() * width
    packed = _meta_drafter(raw).to(dtype)
    after = {"routed experts": 0, "embedding + LM head (copies)": 0, "rest": 0}
    for name, t in list(packed.named_parameters()) + list(packed.named_buffers()):
        if name.startswith(("embed_tokens", "lm_head")):
            continue  # shared with the served target
        group = "routed experts" if EXPERT.fullmatch(name) else "rest"
        after[group] += t.numel() * t.element_size()
    return {"before": before, "after": after}


def checkpoint_tensors(raw: dict, dtype: torch.dtype) -> list[tuple[str, int, int]]:
    """(name, stored bytes, float32 bytes if dequantised at load else 0) per checkpoint tensor."""
    width = torch.empty(0, dtype=dtype).element_size()
    out = []
    for name, t in _meta_drafter(raw).state_dict().items():
        if name.startswith(("embed_tokens", "lm_head")):
            continue
        n = t.numel()
        if ".experts." in name:  # per-expert names: packed bytes (1 per 2 elements) and E8M0 scales
            out.append((name, n, 0))
        elif FP8_PROJECTIONS.fullmatch(name):
            rows, cols = t.shape
            out.append((name, n + math.ceil(rows / 128) * math.ceil(cols / 128), 4 * n))
        else:
            out.append((name, n * (4 if _is_fp32(name) else width), 0))
    return out


def host_peak(raw: dict, dtype: torch.dtype) -> dict[str, int]:
    """Peak host bytes of a load, before and after (see the module docstring)."""
    tensors = checkpoint_tensors(raw, dtype)
    v, h = raw["vocab_size"], raw["hidden_size"]
    dense = _meta_drafter({**raw, "expert_dtype": "bf16"})
    fp32_module = sum(p.numel() for p in dense.parameters()) * 4
    stored = sum(b for _, b, _ in tensors)
    # the old loader dequantised FP8 tensors and (as counted here) FP4 experts to float32, all at once
    expert_fp32 = sum(p.numel() for n, p in dense.named_parameters() if ".experts." in n) * 4
    dequantised = sum(f for _, _, f in tensors) + expert_fp32
    embed_read = 2 * v * h * (2 + 4)  # read in bf16, converted to float32 for the copy
    before = fp32_module + stored + dequantised + embed_read
    after = max(b + f for _, b, f in tensors)
    return {"before": before, "after": after}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--stages", type=int, default=3)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    raw = flash_config(args.stages)
    dev = device_bytes(raw, dtype)
    host = host_peak(raw, dtype)
    print(f"DeepSeek-V4-Flash DSpark drafter: {args.stages} stages, hidden {raw['hidden_size']}, "
          f"{raw['n_routed_experts']} experts x {raw['moe_intermediate_size']}, vocab {raw['vocab_size']}, "
          f"serving dtype {args.dtype}\n")
    print(f"{'device bytes per rank':34s} {'before':>10s} {'after':>10s}")
    for group in dev["before"]:
        print(f"  {group:32s} {dev['before'][group] / GIB:9.2f}G {dev['after'][group] / GIB:9.2f}G")
    total_b, total_a = sum(dev["before"].values()), sum(dev["after"].values())
    print(f"  {'total':32s} {total_b / GIB:9.2f}G {total_a / GIB:9.2f}G")
    print(f"\n{'peak host bytes of a load':34s} {host['before'] / GIB:9.2f}G {host['after'] / GIB:9.2f}G")


if __name__ == "__main__":
    main()
