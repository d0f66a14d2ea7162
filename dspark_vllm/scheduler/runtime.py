"""Glue between settings, calibration, cost profile and a policy, for one decoding engine.

:class:`VerifyLengthScheduler` turns a :class:`DraftBlock` (raw confidence logits) into
per-request verify lengths: calibrate with STS, then apply the configured policy under the
current step load. The reference decoder and the vLLM proposer both call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..settings import DSparkSettings
from .calibration import STSCalibrator
from .cost_profile import CostProfile
from .draft_gate import DraftGate, DraftPlan
from .step_cost import StepCostEstimator
from .policies import (
    AsyncTopKPolicy,
    CausalGreedyPolicy,
    FixedPolicy,
    StaleConfidences,
    StepLoad,
    ThresholdPolicy,
    extend_to_block,
)

CALIBRATION_FILE = "calibration.json"


def build_policy(settings: DSparkSettings, cost: CostProfile | None) -> Any:
    sched = settings.scheduler
    if sched.policy == "fixed":
        return FixedPolicy()
    if sched.policy == "threshold":
        return ThresholdPolicy(sched.threshold)
    cost = cost or CostProfile.synthetic()
    if sched.policy == "causal_greedy":
        return CausalGreedyPolicy(cost, smooth=sched.smooth_cost)
    return AsyncTopKPolicy(cost)


def load_cost_profile(settings: DSparkSettings) -> CostProfile | None:
    path = settings.resolve(settings.scheduler.cost_profile)
    return None if path is None else CostProfile.load(path)


def load_calibrator(settings: DSparkSettings, checkpoint_dir: str | Path | None, block_size: int) -> STSCalibrator:
    """The configured STS file, else calibration.json beside the checkpoint, else identity."""
    path = settings.resolve(settings.calibration.file)
    if path is None and checkpoint_dir is not None and (Path(checkpoint_dir) / CALIBRATION_FILE).exists():
        path = Path(checkpoint_dir) / CALIBRATION_FILE
    if path is None:
        return STSCalibrator.identity(block_size)
    cal = STSCalibrator.load(path)
    if len(cal.temperatures) < block_size:
        raise ValueError(f"calibration file {path} has {len(cal.temperatures)} temperatures but the "
                         f"block size is {block_size}; refit it with `dspark-vllm calibrate`")
    return cal


class VerifyLengthScheduler:
    """Calibrated confidences + policy -> verify lengths; callable on a DraftBlock."""

    def __init__(self, policy: Any, calibrator: STSCalibrator, stale_steps: int = 2,
                 gate: DraftGate | None = None, step_cost: StepCostEstimator | None = None) -> None:
        self.policy = policy
        self.calibrator = calibrator
        self.stale = StaleConfidences(len(calibrator.temperatures), lag=stale_steps)
        self.load = StepLoad()
        self.gate = gate
        self.step_cost = step_cost

    @classmethod
    def from_settings(cls, settings: DSparkSettings, block_size: int,
                      checkpoint_dir: str | Path | None = None, cost: CostProfile | None = None) -> "VerifyLengthScheduler":
        cost = cost or load_cost_profile(settings)
        if cost is None and settings.scheduler.policy in ("causal_greedy", "async_topk"):
            cost = CostProfile.synthetic()  # one object shared by policy, gate and step-cost estimator
        policy = build_policy(settings, cost)
        gate = step_cost = None
        if isinstance(policy, (CausalGreedyPolicy, AsyncTopKPolicy)):
            if settings.scheduler.learn_step_cost:
                step_cost = StepCostEstimator(cost)
            if settings.scheduler.draft_gate:
                gate = DraftGate(cost, block_size, smooth=settings.scheduler.smooth_cost,
                                 min_gain=settings.scheduler.gate_min_gain,
                                 adaptive_depth=settings.scheduler.adaptive_depth,
                                 learn_premium=step_cost is not None)
        return cls(policy, load_calibrator(settings, checkpoint_dir, block_size), settings.scheduler.stale_steps,
                   gate, step_cost)

    def should_draft(self, num_requests: int, load: StepLoad | None = None) -> bool:
        """Pre-draft gate (see :mod:`.draft_gate`): False = decode this step without drafts."""
        return self.num_to_draft(num_requests, load) > 0

    def num_to_draft(self, num_requests: int, load: StepLoad | None = None) -> int:
        """How many requests draft this step: all, one (a gate probe) or none."""
        return self.plan_draft(num_requests, load).requests

    def plan_draft(self, num_requests: int, load: StepLoad | None = None) -> DraftPlan:
        """How many requests draft this step and how deep (without a gate: all, full block)."""
        if self.gate is None:
            return DraftPlan(num_requests, None)
        return self.gate.plan(num_requests, load)

    def observe_draft(self, confidence: np.ndarray | None, draft_ms: float) -> None:
        """Feed a drafted step's calibrated confidences and drafter wall time to the gate."""
        if self.gate is not None and confidence is not None:
            self.gate.observe(confidence, draft_ms)

    def observe_ingest(self, num_tokens: int, ms: float) -> None:
        """Feed one context flush (tokens projected into the drafter's cache, wall time) to the gate."""
        if self.gate is not None:
            self.gate.observe_ingest(num_tokens, ms)

    def observe_step(self, num_tokens: int, step_ms: float, verified_drafts: int = 0) -> None:
        """Feed an engine step's wall time (drafting excluded) and how many draft tokens it
        verified to the step-cost estimator."""
        if self.step_cost is not None:
            self.step_cost.observe(num_tokens, step_ms, verified_drafts)

    def check_drafter(self, has_confidence_head: bool) -> None:
        """One rule for every engine: only the fixed policy runs without a confidence head."""
        if not has_confidence_head and not isinstance(self.policy, FixedPolicy):
            raise ValueError(f"scheduler policy '{self.policy.name}' needs confidences, but the drafter has no "
                             "confidence head (enable_confidence_head=false); set `scheduler: {policy: fixed}`")

    def confidences(self, confidence_logits: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
        """Calibrated per-position confidences c_k [N, B] (None without a confidence head)."""
        if confidence_logits is None:
            return None
        if isinstance(confidence_logits, torch.Tensor):
            confidence_logits = confidence_logits.detach().float().cpu().numpy()
        return self.calibrator.confidence(confidence_logits)

    def lengths(self, confidence_logits: torch.Tensor | None, request_ids: list | None = None,
                max_lens: np.ndarray | None = None, load: StepLoad | None = None) -> np.ndarray:
        if confidence_logits is None:
            self.check_drafter(False)
            raise ValueError("confidence logits are required to size the draft batch")
        return self.lengths_from_confidences(self.confidences(confidence_logits), request_ids, max_lens, load)

    def lengths_from_confidences(self, conf: np.ndarray, request_ids: list | None = None,
                                 max_lens: np.ndarray | None = None, load: StepLoad | None = None) -> np.ndarray:
        """Verify lengths from already calibrated confidences [N, B] (see :meth:`confidences`)."""
        load = load or self.load
        if isinstance(self.policy, AsyncTopKPolicy):
            ids = request_ids if request_ids is not None else list(range(conf.shape[0]))
            stale = self.stale.stale(ids)
            self.stale.push(ids, extend_to_block(conf, self.stale.block_size))  # a shallow draft has D < B
            return self.policy.lengths(conf, max_lens, load, stale_confidence=stale)
        return self.policy.lengths(conf, max_lens, load)

    def __call__(self, draft) -> torch.Tensor:
        """Reference-decoder hook: one DraftBlock -> lengths tensor [N]."""
        if draft.confidence_logits is None and isinstance(self.policy, FixedPolicy):
            return torch.full((draft.tokens.shape[0],), draft.tokens.shape[1], dtype=torch.long)
        return torch.from_numpy(self.lengths(draft.confidence_logits))
