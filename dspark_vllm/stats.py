"""Acceptance statistics with the DeepSpec evaluator's definitions
(``deepspec/eval/base_evaluator.py``: ``verify_draft_tokens``, ``build_metrics_row``).

Per round: acceptance_length = accepted drafts + 1 (the bonus/correction token), or just the
accepted drafts when an accepted draft was a stop token; the round's proposal length is then
cut to the accepted drafts too (the drafts after the stop token do not count as proposed).
tau = mean acceptance length per round. accept_rate@k = rounds with more than k accepted /
rounds that proposed more than k drafts (unconditional prefix survival); the conditional rate
at k divides by accept@(k-1). Which rounds exist is the decoding loop's business: the reference
decoder runs them as DeepSpec's loop does (see ``reference_decoder.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AcceptanceStats:
    block_size: int
    rounds: int = 0
    acceptance_length_sum: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    accepted_gt: list[int] = field(default_factory=list)  # rounds with n > k
    verified_gt: list[int] = field(default_factory=list)  # rounds with L > k
    reached: list[int] = field(default_factory=list)  # rounds with n >= k and L > k

    def __post_init__(self) -> None:
        self.accepted_gt = self.accepted_gt or [0] * self.block_size
        self.verified_gt = self.verified_gt or [0] * self.block_size
        self.reached = self.reached or [0] * self.block_size

    def record_round(self, draft_len: int, accepted: int, stopped: bool) -> None:
        """One verification: ``draft_len`` drafts verified, ``accepted`` of them accepted (cut at a
        stop token), ``stopped``: an accepted draft was a stop token."""
        if stopped:
            draft_len = accepted
        self.rounds += 1
        self.draft_tokens += draft_len
        self.accepted_tokens += accepted
        self.acceptance_length_sum += accepted if stopped else accepted + 1
        for k in range(self.block_size):
            self.verified_gt[k] += int(draft_len > k)
            self.accepted_gt[k] += int(accepted > k)
            self.reached[k] += int(accepted >= k and draft_len > k)

    def merge(self, other: "AcceptanceStats") -> None:
        for name in ("rounds", "acceptance_length_sum", "draft_tokens", "accepted_tokens",
                     "generated_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds += other.seconds
        self.accepted_gt = [a + b for a, b in zip(self.accepted_gt, other.accepted_gt)]
        self.verified_gt = [a + b for a, b in zip(self.verified_gt, other.verified_gt)]
        self.reached = [a + b for a, b in zip(self.reached, other.reached)]

    @property
    def tau(self) -> float:
        """Mean acceptance length per round (bonus token included)."""
        return self.acceptance_length_sum / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def accept_rate(self) -> list[float]:
        """Unconditional prefix survival accept@k per position."""
        return [a / v if v else 0.0 for a, v in zip(self.accepted_gt, self.verified_gt)]

    def conditional_accept_rate(self) -> list[float]:
        """P(draft k accepted | drafts < k accepted), per position."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_gt, self.reached)]

    def summary(self) -> str:
        rates = " ".join(f"{r:.2f}" for r in self.conditional_accept_rate())
        return (f"tau={self.tau:.3f} rounds={self.rounds} drafts/round="
                f"{self.draft_tokens / max(self.rounds, 1):.2f} tokens={self.generated_tokens} "
                f"tok/s={self.tokens_per_second:.2f} cond_accept@k=[{rates}]")
