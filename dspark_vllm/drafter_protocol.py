"""The drafter contract: what the serving proposer and the reference decoder require of a drafter.

Both drafters implement it: :class:`~dspark_vllm.drafter.DSparkDrafter` (Qwen3 / Gemma4 DeepSpec
checkpoints) and :class:`~dspark_vllm.v4.drafter.DSparkV4Drafter` (DeepSeek-V4's ``mtp.*`` stages,
built through the base initialiser). Shapes: N requests, B block size, D <= B drafted positions,
V vocabulary, H hidden size, m fused target layers, S context tokens.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .paged_context import PagedContextPool, PagedContextView
from .sampling import DraftBlock


@runtime_checkable
class DraftModel(Protocol):
    """A DSpark drafter as the proposer uses it (``vllm_plugin/proposer.py``)."""

    config: object                           # .vocab_size, .hidden_size, .target_layer_ids (DeepSpec ids)
    confidence_head: torch.nn.Module | None   # None: a drafter without survival estimates
    embeddings_bound: bool                    # False until bind_target_embeddings for shared-embedding checkpoints

    @property
    def block_size(self) -> int:
        """B: positions drafted per block, fixed by training."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def context_width(self) -> int:
        """m * H: width of the fused target features one context token carries."""

    @property
    def can_fuse_sampling(self) -> bool:
        """Whether ``propose(fused=True)`` can use the fused Markov sampling kernel."""

    def to(self, *args, **kwargs): ...

    def bind_target_embeddings(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Use the target's [V, H] input embedding and LM head (shared-embedding checkpoints)."""

    def context_bytes_per_token(self) -> int:
        """Bytes of draft context K/V per token over all draft layers (the pool's cost per slot)."""

    def new_pool(self, num_slots: int) -> PagedContextPool:
        """A draft-context pool of ``num_slots`` token slots."""

    def target_features(self, features: torch.Tensor) -> torch.Tensor:
        """[S, m*H] context features from the aux hidden states vLLM hands over for S tokens."""

    def propose(self, anchor: torch.Tensor, cache: PagedContextView, temperature: torch.Tensor,
                generator: torch.Generator | None = None, fused: bool = False, seeds: torch.Tensor | None = None,
                depth: int | None = None, all_greedy: bool | None = None) -> DraftBlock:
        """Draft one block per request: anchor [N] (last committed token), each request's context
        through ``cache``, temperature [N] (0: greedy), per-request ``seeds`` [N]. Returns tokens
        [N, D], q [N, D, V] fp32 (None when all greedy) and confidence logits [N, D] or None."""
