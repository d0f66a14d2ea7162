"""MXFP4 (OCP Microscaling) weights as DeepSeek-V4-Flash ships its routed experts.

Layout of one expert projection of ``rows`` x ``cols`` (a ``Linear`` weight, [out, in]):

* ``packed`` [rows, cols / 2] bytes: two FP4 E2M1 elements per byte, the element at the even
  column in the low nibble; each nibble is 1 sign bit, 2 exponent bits (bias 1), 1 mantissa
  bit, so a magnitude is one of 0, 0.5, 1, 1.5, 2, 3, 4, 6;
* ``scales`` [rows, cols / 32] E8M0: one shared power of two 2^(s - 127) per 32 consecutive
  elements of a row (s = 255 is NaN).

Checkpoints store the bytes as int8, uint8 or ``float4_e2m1fn_x2`` and the scales as uint8 or
``float8_e8m0fnu``; :func:`as_bytes` views all of them as uint8 without converting values.
Dequantisation is exact in float32 (every product is a power of two times a 3-bit value).
"""

from __future__ import annotations

import torch

GROUP = 32          # elements per E8M0 scale
E8M0_BIAS = 127
E8M0_NAN = 255
# E2M1 magnitudes indexed by the 3 low bits of a nibble (exponent, mantissa)
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_BYTE_DTYPES = (torch.uint8, torch.int8) + tuple(
    getattr(torch, name) for name in ("float4_e2m1fn_x2", "float8_e8m0fnu") if hasattr(torch, name))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a packed-FP4 or E8M0 tensor as uint8 (a view: values are not converted)."""
    if t.dtype not in _BYTE_DTYPES:
        raise TypeError(f"expected packed FP4 or E8M0 bytes (uint8/int8/float4_e2m1fn_x2/float8_e8m0fnu), got {t.dtype}")
    return t.view(torch.uint8)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """FP4 elements of ``packed`` [..., C/2] bytes as float32 [..., C] (low nibble first)."""
    b = as_bytes(packed)
    nibbles = torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=b.device)
    magnitude = table[(nibbles & 0x07).long()]
    return torch.where((nibbles & 0x08).bool(), -magnitude, magnitude)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 scale bytes -> float32 2^(s - 127); the reserved 255 becomes NaN."""
    s = as_bytes(scales).to(torch.int32)
    value = torch.exp2((s - E8M0_BIAS).to(torch.float32))
    return torch.where(s == E8M0_NAN, torch.full_like(value, float("nan")), value)


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights [..., rows, cols] from ``packed`` [..., rows, cols/2] and ``scales`` [..., rows, cols/32]."""
    values = unpack_e2m1(packed)
    cols = values.shape[-1]
    if scales.shape[-1] * GROUP != cols or scales.shape[:-1] != values.shape[:-1]:
        raise ValueError(f"MXFP4 scales of shape {tuple(scales.shape)} do not fit packed weights of shape "
                         f"{tuple(packed.shape)}: expected [..., rows, cols/{GROUP}] = "
                         f"{(*values.shape[:-1], cols // GROUP)}")
    grouped = values.unflatten(-1, (-1, GROUP)) * e8m0_to_float(scales).unsqueeze(-1)
    return grouped.flatten(-2).to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [..., cols/2], E8M0 uint8 [..., cols/32]) of ``weight`` [..., cols]: each
    group's scale is the smallest power of two that brings its largest magnitude within 6, each
    element rounds to the nearest E2M1 value. For building test checkpoints; not a trained quantiser."""
    w = weight.float().unflatten(-1, (-1, GROUP))
    peak = w.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -126)
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = w / torch.exp2(exponent)
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=w.device)
    code = (scaled.abs().unsqueeze(-1) - table).abs().argmin(-1)
    nibble = (code | ((scaled < 0) & (code > 0)).long() << 3).flatten(-2).to(torch.uint8)
    packed = nibble[..., 0::2] | (nibble[..., 1::2] << 4)
    return packed, (exponent.squeeze(-1) + E8M0_BIAS).to(torch.uint8)
