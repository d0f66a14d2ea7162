"""The drafter's per-step workspace: bounded, and taken from vLLM's KV budget.

A drafting step holds, per drafting request, vocabulary-wide fp32 rows for each of the B block
positions: the base logits, the draft distribution q handed to vLLM (probabilistic drafts), and
one temporary of the same width. At vLLM's GPU defaults (max_num_seqs 1024) and a 151,936-token
vocabulary that is 1024 x 7 x 151,936 x 4 B = 4.4 GB per tensor if every request drafted at once,
memory vLLM's profiling run never sees. So the plugin reserves the workspace of every request, or at most
``Tuning.workspace_share`` of the KV budget, before vLLM sizes its cache (like the draft context
pool), and the proposer lets at most as many requests draft in one step as that reservation holds. The cap is computed from
the sizes of the KV cache vLLM allocated, the same on every tensor-parallel rank.
"""

from __future__ import annotations

from ..scheduler.tuning import TUNING

FP32_ROWS_PER_POSITION = 3  # base logits, q, one temporary: each vocabulary-wide, fp32


def bytes_per_request(block_size: int, vocab_size: int) -> int:
    """Workspace one drafting request needs in a step."""
    return block_size * vocab_size * 4 * FP32_ROWS_PER_POSITION


def workspace_reservation(available: int, max_num_seqs: int, block_size: int, vocab_size: int,
                          share: float = TUNING.workspace_share) -> int:
    """Bytes of a KV budget ``available`` reserved for the workspace: all ``max_num_seqs``
    requests' if that fits in ``share`` of it, else ``share`` of it."""
    return min(max_num_seqs * bytes_per_request(block_size, vocab_size), int(available * share))


def max_drafting_requests(cache_bytes: int, max_num_seqs: int, block_size: int, vocab_size: int,
                          share: float = TUNING.workspace_share) -> int:
    """Requests that may draft in one step, from the KV memory vLLM ended up with
    (``cache_bytes``: its KV cache plus the draft context pool, the same on every TP rank): the
    reservation was at most ``share`` of the budget, i.e. share / (1 - share) of what is left;
    at least 1, at most ``max_num_seqs``."""
    fit = int(cache_bytes * share / (1.0 - share)) // bytes_per_request(block_size, vocab_size)
    return max(1, min(max_num_seqs, fit))
