"""STS calibration on synthetic overconfident scores, metrics, persistence and plots."""

import numpy as np
import pytest

from dspark_vllm.scheduler.calibration import (
    CalibrationRecords,
    STSCalibrator,
    auroc,
    ece,
    reliability_diagram,
)

BLOCK = 5


def synthetic_records(n=6000, overconfidence=3.0, seed=0) -> CalibrationRecords:
    """True per-position acceptance probabilities p_k; the 'head' reports logit(p_k) * 3
    (overconfident). Acceptance follows the true p, verified length is the full block."""
    rng = np.random.default_rng(seed)
    true_p = rng.beta(4, 1.5, size=(n, BLOCK))
    logits = overconfidence * np.log(true_p / (1 - true_p)) + rng.normal(0, 0.3, size=(n, BLOCK))
    accepted_each = rng.random((n, BLOCK)) < true_p
    accepted = np.cumprod(accepted_each, axis=1).sum(axis=1)
    return CalibrationRecords(logits=logits, verified=np.full(n, BLOCK), accepted=accepted)


def test_sts_reduces_ece_on_overconfident_scores(tmp_path):
    fit_on, held_out = synthetic_records(seed=0), synthetic_records(seed=1)
    cal = STSCalibrator.fit(fit_on)
    assert all(t > 1.5 for t in cal.temperatures[:2])  # softening, as overconfidence demands
    before = [m["ece"] for m in cal.metrics["before"]]
    after = [m["ece"] for m in cal.metrics["after"]]
    assert min(before) > 0.05
    # held-out check with a stated bound: every position's ECE <= 0.03 after STS
    raw, fitted = STSCalibrator.identity(BLOCK), cal
    for k in range(BLOCK):
        rows, labels = held_out.position(k)
        e_raw = ece(raw.survival(held_out.logits)[rows, k], labels)
        e_sts = ece(fitted.survival(held_out.logits)[rows, k], labels)
        assert e_sts <= 0.03 and e_sts < e_raw / 2, (k, e_raw, e_sts)
    assert max(after) <= 0.03


def test_sts_never_changes_ranking():
    records = synthetic_records()
    cal = STSCalibrator.fit(records)
    raw = STSCalibrator.identity(BLOCK).confidence(records.logits)
    new = cal.confidence(records.logits)
    for k in range(BLOCK):
        assert np.array_equal(np.argsort(raw[:, k], kind="stable"), np.argsort(new[:, k], kind="stable"))
        assert auroc(new[:, k], records.accepted > k) == pytest.approx(auroc(raw[:, k], records.accepted > k))


def test_records_only_label_verified_positions():
    rec = CalibrationRecords(logits=np.zeros((3, 3)), verified=np.array([0, 2, 3]), accepted=np.array([0, 1, 3]))
    rows, labels = rec.position(1)
    assert rows.tolist() == [False, True, True] and labels.tolist() == [0.0, 1.0]


def test_metric_definitions():
    assert ece(np.array([0.9, 0.9]), np.array([1.0, 1.0])) == pytest.approx(0.1)
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def test_save_load_and_bad_file(tmp_path):
    cal = STSCalibrator.fit(synthetic_records(n=500))
    cal.save(tmp_path / "calibration.json")
    loaded = STSCalibrator.load(tmp_path / "calibration.json")
    assert loaded.temperatures == cal.temperatures
    (tmp_path / "bad.json").write_text('{"temperatures": [1.0, -2.0]}')
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        STSCalibrator.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(ValueError, match="cannot read calibration file"):
        STSCalibrator.load(tmp_path / "broken.json")


def test_reliability_diagram_png(tmp_path):
    records = synthetic_records(n=1000)
    out = reliability_diagram(records, {"raw": STSCalibrator.identity(BLOCK), "STS": STSCalibrator.fit(records)},
                              tmp_path / "rel.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
