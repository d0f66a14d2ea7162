"""Sequential Temperature Scaling (STS, paper §3.2.1) and calibration metrics.

The scheduler needs *absolute* prefix-survival probabilities, not just a ranking, so raw
confidence logits l_k are recalibrated with one temperature per block position:

    c_k = sigmoid(l_k / t_k),    a_k = prod_{i<=k} c_i.

STS fits t_1, t_2, ... left to right: t_k is the grid value minimising the ECE of a_k against the
prefix-acceptance label y_k = 1[drafts 0..k all accepted], with t_<k already fixed. A positive
temperature is monotone, so the ranking of confidences at each position never changes.

Records come from verification: confidence logits [N, B], the number of drafts verified L [N]
and accepted n [N]; position k is labelled only in records with L > k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ECE_BINS = 20  # DeepSpec's recorder uses 20 equal-width bins
DEFAULT_GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def ece(pred: np.ndarray, label: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error with equal-width bins: sum_b (n_b / N) |mean p_b - mean y_b|."""
    if len(pred) == 0:
        return 0.0
    idx = np.minimum((pred * bins).astype(np.int64), bins - 1)
    p_sum = np.bincount(idx, weights=pred, minlength=bins)
    y_sum = np.bincount(idx, weights=label.astype(np.float64), minlength=bins)
    return float(np.abs(p_sum - y_sum).sum() / len(pred))


def auroc(pred: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan if one class."""
    label = label.astype(bool)
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(pred, kind="mergesort")
    ranks = np.empty(len(pred))
    sorted_pred = pred[order]
    i = 0
    while i < len(pred):  # average ranks over ties
        j = i
        while j + 1 < len(pred) and sorted_pred[j + 1] == sorted_pred[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[label].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def brier(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean((pred - label) ** 2)) if len(pred) else 0.0


@dataclass
class CalibrationRecords:
    """Verification outcomes to fit and evaluate calibration on."""

    logits: np.ndarray  # [N, B] raw confidence logits
    verified: np.ndarray  # [N] drafts verified L
    accepted: np.ndarray  # [N] drafts accepted n

    def position(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(row mask of records that verified position k, prefix-accept labels for them)."""
        rows = self.verified > k
        return rows, (self.accepted[rows] > k).astype(np.float64)

    @classmethod
    def concat(cls, parts: list["CalibrationRecords"]) -> "CalibrationRecords":
        return cls(np.concatenate([p.logits for p in parts]), np.concatenate([p.verified for p in parts]),
                   np.concatenate([p.accepted for p in parts]))


class CalibrationRecorder:
    """Collects (confidence logits, verified, accepted) per live request per round; usable as a
    :class:`ReferenceDecoder` observer."""

    def __init__(self) -> None:
        self.parts: list[CalibrationRecords] = []

    def __call__(self, draft, lengths, accepted, live) -> None:
        if draft.confidence_logits is None:
            raise ValueError("calibration needs a drafter with a confidence head")
        rows = live.cpu().numpy()
        self.parts.append(CalibrationRecords(draft.confidence_logits.float().cpu().numpy()[rows],
                                             lengths.cpu().numpy()[rows], accepted.cpu().numpy()[rows]))

    def records(self) -> CalibrationRecords:
        if not self.parts:
            raise ValueError("no rounds were recorded")
        return CalibrationRecords.concat(self.parts)


@dataclass
class STSCalibrator:
    """Per-position temperatures; identity (all 1.0) until fitted."""

    temperatures: list[float]
    metrics: dict = field(default_factory=dict)

    @classmethod
    def identity(cls, block_size: int) -> "STSCalibrator":
        return cls([1.0] * block_size)

    def confidence(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated per-position c_k = sigmoid(l_k / t_k) for logits [..., B]."""
        t = np.asarray(self.temperatures[: logits.shape[-1]])
        return _sigmoid(np.asarray(logits, np.float64) / t)

    def survival(self, logits: np.ndarray) -> np.ndarray:
        return np.cumprod(self.confidence(logits), axis=-1)

    @classmethod
    def fit(cls, records: CalibrationRecords, grid: np.ndarray = DEFAULT_GRID) -> "STSCalibrator":
        """Fit temperatures left to right, each minimising the ECE of the cumulative product."""
        block = records.logits.shape[1]
        temps: list[float] = []
        prefix = np.ones(len(records.logits))  # calibrated product of positions < k
        for k in range(block):
            rows, labels = records.position(k)
            if rows.sum() == 0:
                temps.append(temps[-1] if temps else 1.0)
            else:
                logits = records.logits[rows, k]
                errors = [ece(prefix[rows] * _sigmoid(logits / t), labels) for t in grid]
                temps.append(float(grid[int(np.argmin(errors))]))
            prefix = prefix * _sigmoid(records.logits[:, k] / temps[-1])
        out = cls(temps)
        out.metrics = {"before": evaluate(cls.identity(block), records), "after": evaluate(out, records)}
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"method": "sts", "temperatures": self.temperatures,
                                          "metrics": self.metrics}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "STSCalibrator":
        try:
            data = json.loads(Path(path).read_text())
            temps = [float(t) for t in data["temperatures"]]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"cannot read calibration file {path}: expected JSON with a "
                             f"'temperatures' list ({exc})") from exc
        if any(t <= 0 for t in temps):
            raise ValueError(f"calibration file {path}: temperatures must be > 0, got {temps}")
        return cls(temps, data.get("metrics", {}))


def evaluate(calibrator: STSCalibrator, records: CalibrationRecords) -> list[dict]:
    """Per-position ECE / AUROC / Brier of the cumulative product a_k against prefix acceptance."""
    surv = calibrator.survival(records.logits)
    out = []
    for k in range(records.logits.shape[1]):
        rows, labels = records.position(k)
        pred = surv[rows, k]
        out.append({"position": k, "count": int(rows.sum()), "ece": ece(pred, labels),
                    "auroc": auroc(pred, labels), "brier": brier(pred, labels),
                    "mean_pred": float(pred.mean()) if len(pred) else float("nan"),
                    "accept_rate": float(labels.mean()) if len(labels) else float("nan")})
    return out


def reliability_diagram(records: CalibrationRecords, calibrators: dict[str, STSCalibrator],
                        path: str | Path, bins: int = 10) -> Path:
    """Draw one reliability panel per block position (predicted survival vs empirical) to PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = records.logits.shape[1]
    fig, axes = plt.subplots(1, block, figsize=(2.6 * block, 2.8), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for k, ax in enumerate(axes[0]):
        rows, labels = records.position(k)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for name, cal in calibrators.items():
            pred = cal.survival(records.logits)[rows, k]
            idx = np.clip(np.digitize(pred, edges) - 1, 0, bins - 1)
            xs = [pred[idx == b].mean() for b in range(bins) if (idx == b).any()]
            ys = [labels[idx == b].mean() for b in range(bins) if (idx == b).any()]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{name} (ECE {ece(pred, labels):.3f})")
        ax.set_title(f"position {k}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted prefix survival")
        if k == 0:
            ax.set_ylabel("empirical acceptance")
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
