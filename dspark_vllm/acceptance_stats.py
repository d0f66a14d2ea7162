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
class PositionCounts:
    """Per draft position k over verification rounds: ``verified[k]`` rounds that verified more
    than k drafts, ``reached[k]`` those whose first k drafts were all accepted (draft k was
    tried), ``accepted[k]`` those that accepted more than k. The serving metrics and the
    evaluator's statistics both count with this."""

    size: int
    verified: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("verified", "reached", "accepted"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.size)

    def record(self, draft_len: int, accepted: int) -> None:
        """One round: ``draft_len`` drafts verified, the first ``accepted`` of them accepted."""
        for k in range(min(draft_len, self.size)):
            self.verified[k] += 1
            self.reached[k] += int(accepted >= k)
            self.accepted[k] += int(accepted > k)

    def merge(self, other: "PositionCounts") -> None:
        for name in ("verified", "reached", "accepted"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name))])

    def accept_rate(self) -> list[float]:
        """Unconditional prefix survival accept@k."""
        return [a / v if v else 0.0 for a, v in zip(self.accepted, self.verified)]

    def conditional_accept_rate(self) -> list[float]:
        """P(draft k accepted | drafts < k accepted)."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted, self.reached)]


@dataclass
class AcceptanceStats:
    """tau and per-position acceptance of a decoding run (DeepSpec's definitions, see above)."""

    block_size: int
    rounds: int = 0                  # verification rounds
    acceptance_length_sum: int = 0   # sum of per-round acceptance lengths (tau's numerator)
    draft_tokens: int = 0            # drafts verified (proposal lengths)
    accepted_tokens: int = 0
    generated_tokens: int = 0        # output tokens, whatever produced them
    seconds: float = 0.0             # wall time of the run
    positions: PositionCounts | None = None

    def __post_init__(self) -> None:
        self.positions = self.positions or PositionCounts(self.block_size)

    def record_round(self, draft_len: int, accepted: int, stopped: bool) -> None:
        """One verification: ``draft_len`` drafts verified, ``accepted`` of them accepted (cut at a
        stop token), ``stopped``: an accepted draft was a stop token."""
        if stopped:
            draft_len = accepted
        self.rounds += 1
        self.draft_tokens += draft_len
        self.accepted_tokens += accepted
        self.acceptance_length_sum += accepted if stopped else accepted + 1
        self.positions.record(draft_len, accepted)

    def merge(self, other: "AcceptanceStats") -> None:
        for name in ("rounds", "acceptance_length_sum", "draft_tokens", "accepted_tokens",
                     "generated_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds += other.seconds
        self.positions.merge(other.positions)

    @property
    def tau(self) -> float:
        """Mean acceptance length per round (bonus token included)."""
        return self.acceptance_length_sum / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def accept_rate(self) -> list[float]:
        """Unconditional prefix survival accept@k per position."""
        return self.positions.accept_rate()

    def conditional_accept_rate(self) -> list[float]:
        """P(draft k accepted | drafts < k accepted), per position."""
        return self.positions.conditional_accept_rate()

    def summary(self) -> str:
        rates = " ".join(f"{r:.2f}" for r in self.conditional_accept_rate())
        return (f"tau={self.tau:.3f} rounds={self.rounds} drafts/round="
                f"{self.draft_tokens / max(self.rounds, 1):.2f} tokens={self.generated_tokens} "
                f"tok/s={self.tokens_per_second:.2f} cond_accept@k=[{rates}]")
