"""The proposer's optional step trace: one parseable JSON line per step, nothing when off."""

import json
import os

from dspark_vllm.vllm_plugin.step_trace import ENV_STEP_TRACE, StepTrace


def test_trace_writes_one_json_line_per_step_to_the_pid_path(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_STEP_TRACE, str(tmp_path / "trace-{pid}.jsonl"))
    trace = StepTrace.from_env()
    assert trace.enabled
    trace.write(batch=16, ready=16, drafting=0, gain=0.97)
    trace.write(batch=16, ready=16, drafting=16, gain=1.2, draft_ms=61.5)
    trace.close()
    lines = (tmp_path / f"trace-{os.getpid()}.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["drafting"] for r in rows] == [0, 16]
    assert rows[1]["draft_ms"] == 61.5 and rows[0]["t"] <= rows[1]["t"]


def test_trace_is_a_no_op_when_unset(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_STEP_TRACE, raising=False)
    monkeypatch.chdir(tmp_path)
    trace = StepTrace.from_env()
    assert not trace.enabled
    trace.write(batch=1)
    assert list(tmp_path.iterdir()) == []
