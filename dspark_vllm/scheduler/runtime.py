"""The scheduler façade: everything a decoding engine asks of verification scheduling.

:class:`VerifyLengthScheduler` is the one object the reference decoder and the vLLM proposer
hold. Per step an engine calls

* :meth:`~VerifyLengthScheduler.plan` before drafting: which ready requests draft and how deep
  (the draft gate; without one, all of them, full block);
* :meth:`~VerifyLengthScheduler.confidences` and :meth:`~VerifyLengthScheduler.lengths` after
  drafting: STS-calibrated confidences, then the configured policy's verify lengths;
* the ``observe_*`` methods with what it measured (step, draft and ingestion wall times);
* :meth:`~VerifyLengthScheduler.snapshot` for metrics and traces.

Which policy runs is a name in the settings, looked up in ``policies.POLICIES``; load-aware
policies get the draft gate and the served step-cost estimator here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .calibration import STSCalibrator
from .cost_profile import CostProfile, ServedCost
from .draft_gate import DraftGate, DraftPlan
from .policies import POLICIES, StepLoad, VerifyPolicy, build_policy, require_confidence_head
from .step_cost import StepCostEstimator

if TYPE_CHECKING:
    from ..settings import DSparkSettings

CALIBRATION_FILE = "calibration.json"


def load_cost_profile(settings: "DSparkSettings") -> CostProfile | None:
    path = settings.resolve(settings.scheduler.cost_profile)
    return None if path is None else CostProfile.load(path)


def calibration_path(settings: "DSparkSettings", checkpoint_dir: str | Path | None) -> Path | None:
    """The configured STS file, else calibration.json beside the checkpoint, else None (identity)."""
    path = settings.resolve(settings.calibration.file)
    if path is None and checkpoint_dir is not None and (Path(checkpoint_dir) / CALIBRATION_FILE).exists():
        path = Path(checkpoint_dir) / CALIBRATION_FILE
    return path


def load_calibrator(settings: "DSparkSettings", checkpoint_dir: str | Path | None, block_size: int) -> STSCalibrator:
    """The configured STS file, else calibration.json beside the checkpoint, else identity."""
    path = calibration_path(settings, checkpoint_dir)
    if path is None:
        return STSCalibrator.identity(block_size)
    cal = STSCalibrator.load(path)
    if len(cal.temperatures) < block_size:
        raise ValueError(f"calibration file {path} has {len(cal.temperatures)} temperatures but the "
                         f"block size is {block_size}; refit it with `dspark-vllm calibrate`")
    return cal


@dataclass(frozen=True)
class SchedulerSnapshot:
    """What the scheduler has learned, for metrics and step traces."""

    cost_scale: float | None       # served / profiled step time (None: not learned by this policy)
    verify_premium: float | None   # extra cost of a drafted step (None: not learned yet)
    last_gain: float | None        # the draft gate's predicted gain at its last plan


class VerifyLengthScheduler:
    """Calibration + policy + (for load-aware policies) draft gate and step-cost estimator."""

    def __init__(self, policy: VerifyPolicy, calibrator: STSCalibrator, gate: DraftGate | None = None,
                 step_cost: StepCostEstimator | None = None) -> None:
        self.policy = policy
        self.calibrator = calibrator
        self.block_size = len(calibrator.temperatures)
        self.gate = gate
        self.step_cost = step_cost

    @classmethod
    def from_settings(cls, settings: "DSparkSettings", block_size: int, checkpoint_dir: str | Path | None = None,
                      cost: CostProfile | None = None,
                      calibrator: STSCalibrator | None = None) -> "VerifyLengthScheduler":
        """``cost`` / ``calibrator`` given: used as they are, no file is read for them."""
        sched = settings.scheduler
        profile = cost or load_cost_profile(settings)
        if profile is None and POLICIES[sched.policy].load_aware:
            profile = CostProfile.synthetic()
        step_cost = None
        served = None if profile is None else ServedCost(profile)  # one view shared by policy and gate
        if profile is not None and POLICIES[sched.policy].load_aware and sched.learn_step_cost:
            step_cost = StepCostEstimator(profile)  # owns what it learns; policy and gate read it
            served = step_cost.served
        policy = build_policy(sched, served, block_size)
        gate = None
        if policy.load_aware and sched.draft_gate:
            gate = DraftGate(served, block_size, smooth=sched.smooth_cost, min_gain=sched.gate_min_gain,
                             adaptive_depth=sched.adaptive_depth, learn_premium=step_cost is not None)
        return cls(policy, calibrator or load_calibrator(settings, checkpoint_dir, block_size), gate, step_cost)

    # ---- start-up ------------------------------------------------------------------------
    def check_drafter(self, has_confidence_head: bool) -> None:
        """Raise when the policy needs confidences and the drafter has no confidence head."""
        require_confidence_head(self.policy.name, has_confidence_head)

    @property
    def measures_draft_time(self) -> bool:
        """Whether :meth:`observe_draft_time` / :meth:`observe_ingest` feed anything (a draft gate)."""
        return self.gate is not None

    # ---- per step ------------------------------------------------------------------------
    def plan(self, ready: int, load: StepLoad | None = None) -> DraftPlan:
        """Which of ``ready`` requests draft this step and how deep (no gate: all, full block)."""
        if self.gate is None:
            return DraftPlan(ready, None)
        return self.gate.plan(ready, load)

    def confidences(self, confidence_logits: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
        """Calibrated per-position confidences c_k [N, D] (None without a confidence head)."""
        if confidence_logits is None:
            return None
        if isinstance(confidence_logits, torch.Tensor):
            confidence_logits = confidence_logits.detach().float().cpu().numpy()
        return self.calibrator.confidence(confidence_logits)

    def lengths(self, conf: np.ndarray | None, request_ids: list | None = None, load: StepLoad | None = None,
                max_lens: np.ndarray | None = None, width: int | None = None) -> np.ndarray:
        """Verify lengths [N] from calibrated confidences [N, D]. Without confidences (a drafter
        without the head, which only a policy not needing them accepts) every request verifies
        its whole ``width``-token draft, within ``max_lens``."""
        n = len(request_ids) if conf is None else conf.shape[0]
        ids = request_ids if request_ids is not None else list(range(n))
        if conf is None:
            self.check_drafter(False)
            conf = np.ones((n, width or self.block_size))
        return np.asarray(self.policy.step_lengths(conf, ids, max_lens, load), dtype=np.int64)

    def observe_step(self, num_tokens: int, step_ms: float, verified_drafts: int = 0) -> None:
        """An engine step's wall time (drafting excluded) and the draft tokens it verified."""
        if self.step_cost is not None:
            self.step_cost.observe(num_tokens, step_ms, verified_drafts)

    def observe_draft(self, confidence: np.ndarray | None, draft_ms: float) -> None:
        """A drafted step's calibrated confidences [R, D] and the drafter's wall time."""
        if self.gate is not None and confidence is not None:
            self.gate.observe(confidence, draft_ms)

    def observe_draft_time(self, positions: int, ms: float) -> None:
        """A timing-only draft of ``positions`` block positions (requests x depth), no outcome."""
        if self.gate is not None:
            self.gate.timer.observe(positions, ms)

    def observe_ingest(self, num_tokens: int, ms: float) -> None:
        """One context flush: ``num_tokens`` tokens projected into the drafter's context."""
        if self.gate is not None:
            self.gate.observe_ingest(num_tokens, ms)

    def forget(self, request_ids: list) -> None:
        """Requests that left the engine."""
        self.policy.forget(request_ids)

    def snapshot(self) -> SchedulerSnapshot:
        learned = self.step_cost.learned if self.step_cost is not None else None
        return SchedulerSnapshot(cost_scale=None if learned is None else learned.scale,
                                 verify_premium=None if learned is None else learned.verify_premium,
                                 last_gain=None if self.gate is None else self.gate.last_gain)

    def __call__(self, draft) -> torch.Tensor:
        """Reference-decoder hook: one DraftBlock -> verify lengths [N]."""
        conf = self.confidences(draft.confidence_logits)
        lengths = self.lengths(conf, list(range(draft.tokens.shape[0])), width=draft.tokens.shape[1])
        return torch.from_numpy(lengths)
