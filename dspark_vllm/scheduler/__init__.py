"""Confidence-scheduled verification: policies, cost profiles, STS calibration (no vLLM import)."""

from .calibration import CalibrationRecorder, CalibrationRecords, STSCalibrator, evaluate, reliability_diagram
from .cost_profile import CostProfile, profile_step_times
from .policies import (
    AsyncTopKPolicy,
    CausalGreedyPolicy,
    FixedPolicy,
    RetrospectivePolicy,
    StaleConfidences,
    StepLoad,
    ThresholdPolicy,
    expected_tokens,
    survival,
)

__all__ = [
    "AsyncTopKPolicy", "CalibrationRecorder", "CalibrationRecords", "CausalGreedyPolicy", "CostProfile", "FixedPolicy",
    "RetrospectivePolicy", "STSCalibrator", "StaleConfidences", "StepLoad", "ThresholdPolicy",
    "evaluate", "expected_tokens", "profile_step_times", "reliability_diagram", "survival",
]

from .runtime import VerifyLengthScheduler, build_policy, load_calibrator, load_cost_profile  # noqa: E402

__all__ += ["VerifyLengthScheduler", "build_policy", "load_calibrator", "load_cost_profile"]
