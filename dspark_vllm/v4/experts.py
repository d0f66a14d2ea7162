"""The routed experts of one DeepSeek-V4 MoE layer, stacked, computed without host syncs.

Storage (per projection p in w1 (gate), w3 (up), w2 (down), E experts, Linear layout [out, in]):

* dense: ``p`` [E, out, in] in the serving dtype (BF16/FP8 checkpoints, dequantised at load);
* MXFP4 (``expert_dtype: fp4``, as V4-Flash ships): ``p`` [E, out, in/2] packed bytes and
  ``p_scale`` [E, out, in/32] E8M0, kept packed on the device and dequantised per expert at use
  (about a quarter of the BF16 bytes).

The state dict keeps the checkpoint's per-expert names (``{e}.w1.weight``, and ``{e}.w1.scale``
for MXFP4), so loading, saving and training see the tensors the checkpoint has.

Why no host sync: the old loop asked the device which experts were hit (``unique().tolist()``)
and which rows each got (``nonzero``), one round trip per expert and layer. Here the work is
shaped by static sizes only: on CUDA the grouped kernel (``dspark_vllm.kernels.moe_grouped``)
sorts the (token, expert) pairs on the device into fixed-capacity blocks; elsewhere every expert
runs over every row and the routing weight (zero where the expert was not chosen) selects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mxfp4 import GROUP, as_bytes, dequantize_mxfp4

PROJECTIONS = ("w1", "w2", "w3")


class RoutedExperts(nn.Module):
    """E SwiGLU experts: w2(silu(w1 x) * w3 x), gate and up clamped at ``limit`` when given."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, limit: float | None,
                 fp4: bool = False) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.limit, self.fp4 = limit, fp4
        for name in PROJECTIONS:
            out_dim, in_dim = self.shape(name)
            if fp4:
                if in_dim % GROUP:
                    raise ValueError(f"MXFP4 experts need input sizes divisible by {GROUP}, got {in_dim}")
                self.register_buffer(name, torch.zeros(num_experts, out_dim, in_dim // 2, dtype=torch.uint8))
                self.register_buffer(f"{name}_scale", torch.zeros(num_experts, out_dim, in_dim // GROUP,
                                                                  dtype=torch.uint8))
            else:
                bound = in_dim ** -0.5  # nn.Linear's default init, per expert
                setattr(self, name, nn.Parameter(torch.empty(num_experts, out_dim, in_dim).uniform_(-bound, bound)))
        self._register_state_dict_hook(_per_expert_state)
        self._register_load_state_dict_pre_hook(_stack_expert_state, with_module=True)

    def shape(self, name: str) -> tuple[int, int]:
        """[out, in] of projection ``name``."""
        return (self.hidden, self.intermediate) if name == "w2" else (self.intermediate, self.hidden)

    def store(self, name: str, expert: int, weight: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Write one expert's projection from checkpoint tensors (packed bytes + scale for MXFP4)."""
        dst = getattr(self, name)
        with torch.no_grad():
            if self.fp4:
                if scale is None:
                    raise ValueError(f"MXFP4 expert {expert}.{name} needs its .scale tensor")
                dst[expert].copy_(as_bytes(weight).to(dst.device))
                getattr(self, f"{name}_scale")[expert].copy_(as_bytes(scale).to(dst.device))
            else:
                dst[expert].copy_(weight.to(dst.device, dst.dtype))

    def weight(self, name: str, expert: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Projection ``name`` of ``expert`` (an index, or a tensor of indices) as [..., out, in] in ``dtype``."""
        if self.fp4:
            return dequantize_mxfp4(getattr(self, name)[expert], getattr(self, f"{name}_scale")[expert], dtype)
        return getattr(self, name)[expert].to(dtype)

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; chosen [T, k] expert ids; weights [T, k] routing weights -> [T, H] (x's dtype)."""
        from ..kernels.moe_grouped import grouped_experts

        return grouped_experts(self, x, chosen, weights)

    def dense_forward(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert over every row, each scaled by its routing weight (zero where not chosen):
        E/k times the FLOPs of routed execution, no data-dependent shape. The reference path."""
        per_expert = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32, device=x.device)
        per_expert.scatter_add_(1, chosen, weights.float())
        out = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):
            h = self.activation(x @ self.weight("w1", e, x.dtype).T, x @ self.weight("w3", e, x.dtype).T)
            out += per_expert[:, e, None] * (h @ self.weight("w2", e, x.dtype).T).float()
        return out.to(x.dtype)


def _per_expert_state(module: RoutedExperts, state: dict, prefix: str, local_metadata) -> dict:
    """state_dict hook: stacked tensors -> the checkpoint's ``{e}.{p}.weight`` (+ ``.scale``)."""
    for name in PROJECTIONS:
        stacked = state.pop(prefix + name)
        scales = state.pop(prefix + f"{name}_scale", None)
        for e in range(module.num_experts):
            state[f"{prefix}{e}.{name}.weight"] = stacked[e]
            if scales is not None:
                state[f"{prefix}{e}.{name}.scale"] = scales[e]
    return state


def _stack_expert_state(module: RoutedExperts, state: dict, prefix: str, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: the checkpoint's per-expert tensors -> the stacked ones."""
    for name in PROJECTIONS:
        keys = [f"{prefix}{e}.{name}.weight" for e in range(module.num_experts)]
        if not all(k in state for k in keys):
            continue
        weights = [state.pop(k) for k in keys]
        scales = [state.pop(f"{prefix}{e}.{name}.scale", None) for e in range(module.num_experts)]
        if module.fp4:
            state[prefix + name] = torch.stack([as_bytes(w) for w in weights])
            state[prefix + f"{name}_scale"] = torch.stack([as_bytes(s) for s in scales])
        else:
            state[prefix + name] = torch.stack(weights)
