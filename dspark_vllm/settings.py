"""Everything a serving engineer tunes, as one pydantic model loaded from YAML (``configs/``).

Errors name the offending field and file, e.g.
``configs/bad.yaml: scheduler.policy: unknown policy 'fast'; expected one of 'fixed', ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .scheduler.policies import POLICIES


class SettingsError(ValueError):
    """A DSpark settings file is unreadable or holds an invalid field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSettings(_Strict):
    """How many drafts each request gets verified per step."""

    policy: str = Field("causal_greedy", description="a name in scheduler/policies.py POLICIES")
    threshold: float = Field(0.0, ge=0.0, le=1.0,
                             description="threshold policy: stop at the first position with c_k below this")
    cost_profile: Optional[str] = Field(None, description="JSON cost profile (step ms vs tokens); "
                                        "relative paths resolve against the settings file")
    profile_at_startup: bool = Field(False, description="measure the cost profile when the engine starts")
    profile_max_tokens: int = Field(512, ge=1)
    stale_steps: int = Field(2, ge=1, description="async_topk: age of the confidences used for the budget")
    smooth_cost: bool = Field(True, description="causal_greedy: decide on the cost curve interpolated "
                              "between profiled sizes (false: the paper's raw step curve)")
    draft_gate: bool = Field(True, description="causal_greedy/async_topk: skip drafting for a step when the "
                             "cost curve, measured draft time and past confidences say no length could pay")
    gate_min_gain: float = Field(1.05, ge=1.0, description="draft gate: draft only when the predicted throughput "
                                 "gain over plain decoding exceeds this (a margin for prediction error)")
    adaptive_depth: bool = Field(True, description="draft gate: draft only the first D block positions when the "
                                 "cost curve says deeper drafts cannot pay (false: always the full block)")
    learn_step_cost: bool = Field(True, description="causal_greedy/async_topk: scale the cost curve by the measured "
                                  "ratio of served engine step time to profiled forward time")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(map(repr, POLICIES))}")
        return name


class CalibrationSettings(_Strict):
    file: Optional[str] = Field(None, description="STS temperatures JSON; default: calibration.json "
                                "beside the checkpoint if present")


class DSparkSettings(_Strict):
    """Top-level DSpark settings (one YAML file)."""

    num_speculative_tokens: Optional[int] = Field(None, ge=1, description="default: the checkpoint's block_size")
    draft_sampling: Literal["greedy", "probabilistic"] = "probabilistic"
    draft_vocab_size: Optional[int] = Field(None, ge=0, description="draft from the first K ids of the "
                                            "checkpoint's draft_vocab.json; null: all of them; 0: full vocabulary")
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    source: Optional[str] = Field(None, exclude=True)

    @model_validator(mode="after")
    def _threshold_needs_value(self) -> "DSparkSettings":
        if self.scheduler.policy == "threshold" and self.scheduler.threshold <= 0.0:
            raise ValueError("scheduler.threshold must be > 0 when scheduler.policy is 'threshold'")
        return self

    def resolve(self, relative: Optional[str]) -> Optional[Path]:
        """Resolve a path from the file against the settings file's folder."""
        if relative is None:
            return None
        p = Path(relative).expanduser()
        if not p.is_absolute() and self.source:
            p = Path(self.source).parent / p
        return p


def _format(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return f"{source}: invalid DSpark settings: " + "; ".join(parts)


def settings_from_dict(data: dict[str, Any], source: str = "<dict>") -> DSparkSettings:
    try:
        settings = DSparkSettings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_format(exc, source)) from None
    settings.source = source if source != "<dict>" else None
    return settings


def load_settings(path: str | Path) -> DSparkSettings:
    """Load and validate a YAML settings file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read DSpark settings ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return settings_from_dict(data, str(path))


def _configs_dir() -> Path:
    """The shipped YAML settings: ``dspark_vllm/configs`` in an installed wheel (package data,
    read through importlib.resources), else the repository's ``configs/`` beside the package (a
    source checkout or an editable install: the same files)."""
    from importlib.resources import files

    installed = Path(str(files("dspark_vllm") / "configs"))
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "configs"


CONFIGS_DIR = _configs_dir()
