"""Confidence-scheduled verification: policies, cost profiles, STS calibration (no vLLM import).

Engines use :class:`VerifyLengthScheduler` (``runtime.py``); the rest is its parts."""

from .calibration import CalibrationRecorder, CalibrationRecords, STSCalibrator, evaluate, reliability_diagram
from .cost_profile import CostProfile, LearnedCost, ServedCost, profile_grid, profile_step_times
from .draft_gate import DraftPlan
from .policies import (
    POLICIES,
    AsyncTopKPolicy,
    CausalGreedyPolicy,
    FixedPolicy,
    RetrospectivePolicy,
    StaleConfidences,
    StepLoad,
    ThresholdPolicy,
    VerifyPolicy,
    build_policy,
    expected_tokens,
    register_policy,
    require_confidence_head,
    survival,
)
from .runtime import SchedulerSnapshot, VerifyLengthScheduler, load_calibrator, load_cost_profile

__all__ = [
    "POLICIES", "AsyncTopKPolicy", "CalibrationRecorder", "CalibrationRecords", "CausalGreedyPolicy", "CostProfile", "LearnedCost", "ServedCost",
    "DraftPlan", "FixedPolicy", "RetrospectivePolicy", "STSCalibrator", "SchedulerSnapshot", "StaleConfidences",
    "StepLoad", "ThresholdPolicy", "VerifyLengthScheduler", "VerifyPolicy", "build_policy", "evaluate",
    "expected_tokens", "load_calibrator", "load_cost_profile", "profile_grid", "profile_step_times",
    "register_policy", "reliability_diagram", "require_confidence_head", "survival",
]
