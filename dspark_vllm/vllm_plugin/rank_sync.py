"""One set of decisions for every tensor-parallel rank.

Under tensor parallelism every rank runs its own copy of the proposer on identical inputs (the
target's aux hidden states are the same after its all-reduce), and each rank verifies the drafts
with its own q. Whatever the proposer decides (draft or not, how deep, how many drafts to keep)
must therefore be the same on every rank, or ranks accept differently and their states diverge.
The decisions are deterministic functions of the scheduler's state, the drafts and their
confidences, except for one input: wall clocks (served step time, drafter and ingestion time).

:class:`RankSync` removes that input's rank dependence. Every clock observation a rank makes
during a step is journaled instead of applied; at the end of the step the ranks exchange their
journals once (one ``all_gather_object`` over vLLM's CPU TP group, a fixed point every rank
reaches whatever happened in the step) and every rank replays rank 0's. The same exchange
carries a fault flag (a fault on any rank makes every rank serve the step without drafts) and, in
check mode (``DSPARK_VLLM_TP_CHECK=1``), a digest of each rank's drafts: the first step whose
drafts differ between ranks raises :class:`RankDivergence`, which the plugin's fault boundary
lets through. With one rank nothing is journaled or exchanged.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ENV_TP_CHECK = "DSPARK_VLLM_TP_CHECK"


class RankDivergence(RuntimeError):
    """Tensor-parallel ranks drafted differently in one step (check mode only)."""


class RankSync:
    """The ranks' one exchange per step: rank 0's clock journal, any fault, drafts' digests."""

    def __init__(self, group: Any | None = None, check: bool | None = None) -> None:
        self.group = group if group is not None and group.world_size > 1 else None
        self.check = os.environ.get(ENV_TP_CHECK) == "1" if check is None else check
        self.journal: list[tuple[str, tuple]] = []
        self.steps = 0

    @classmethod
    def from_vllm(cls) -> "RankSync":
        """The sync of this worker's TP group (a no-op object outside one)."""
        try:
            from vllm.distributed import get_tp_group

            return cls(get_tp_group())
        except Exception:  # noqa: BLE001 - no distributed state (tests, tools)
            return cls(None)

    @property
    def shared(self) -> bool:
        return self.group is not None

    def gather_rows(self, shard: "torch.Tensor") -> "torch.Tensor":
        """The whole tensor from each rank's row shard (vLLM's vocab-parallel embedding and LM
        head hold rows [r*V/tp, (r+1)*V/tp) on rank r); the shard itself with one rank."""
        return shard if self.group is None else self.group.all_gather(shard.contiguous(), dim=0)

    def observe(self, target: Any, method: str, *args) -> None:
        """Call ``target.method(*args)`` now with one rank, at the end of the step with rank 0's
        arguments with several."""
        if self.group is None:
            getattr(target, method)(*args)
        else:
            self.journal.append((method, args))

    def end_step(self, target: Any, faulted: bool, tokens: list[list[int]]) -> bool:
        """Exchange once: replay rank 0's journal on ``target``, check digests in check mode;
        returns whether any rank faulted this step."""
        if self.group is None:
            return faulted
        import torch.distributed as dist

        digest = _digest(tokens) if self.check else None
        gathered: list = [None] * self.group.world_size
        dist.all_gather_object(gathered, (self.journal, faulted, digest), group=self.group.cpu_group)
        self.journal = []
        self.steps += 1
        for method, args in gathered[0][0]:
            getattr(target, method)(*args)
        if self.check and len({g[2] for g in gathered}) > 1:
            raise RankDivergence(f"DSpark: tensor-parallel ranks drafted differently at step {self.steps} "
                                 f"(digests {[g[2] for g in gathered]}); a decision depends on the rank")
        return any(g[1] for g in gathered)


def _digest(tokens: list[list[int]]) -> str:
    return hashlib.sha1(repr(tokens).encode()).hexdigest()[:16]
