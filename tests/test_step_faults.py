"""A fault anywhere in DSpark's per-step path costs that step its drafts, never the engine:
the step returns no drafts, the fault is counted and logged once per kind, and the next steps
draft again."""

import logging

import pytest
from stub_runner import StubRunner
from test_proposer import IDS, NUM_REQS, make_proposer

from dspark_vllm.pending_context import PendingContext
from dspark_vllm.scheduler import DraftPlan
from dspark_vllm.vllm_plugin import patches
from dspark_vllm.vllm_plugin.metrics import ProposerMetrics


def fault_site(p, site: str) -> tuple[object, str]:
    """(owner, method name) of a call on the per-step path."""
    return {"read step": (patches, "read_step"), "drafter": (p.drafter, "propose"),
            "context": (PendingContext, "push_step"), "scheduler": (p.scheduler, "lengths"),
            "metrics": (ProposerMetrics, "record_step")}[site]


@pytest.mark.parametrize("site", ["read step", "drafter", "context", "scheduler", "metrics"])
def test_a_fault_costs_one_step_its_drafts_and_drafting_resumes(monkeypatch, caplog, site):
    p = make_proposer(monkeypatch)
    runner = StubRunner(IDS)
    p.attach(runner)
    p.bind_kv_cache(runner)
    monkeypatch.setattr(p.scheduler, "plan", lambda ready, load: DraftPlan(ready, None))  # always draft
    owner, name = fault_site(p, site)
    original = getattr(owner, name)
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (2, 3):  # two faults: both counted, logged once per code site
            raise ValueError(f"planted fault in {site}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, faulty)
    starts, drafted = [0] * NUM_REQS, []
    with caplog.at_level(logging.ERROR, logger="vllm.dspark"):
        for step in range(5):
            counts = [5] * NUM_REQS if step == 0 else [1] * NUM_REQS
            drafts = runner.step(p, starts, counts)[0]
            drafted.append(any(drafts))
            starts = [s + c for s, c in zip(starts, counts)]
    assert p.metrics.faults == 2
    assert drafted[-1], "drafting resumed after the faults"
    assert not all(drafted), "a faulting step returned drafts"
    logged = [r for r in caplog.records if "drafting failed" in r.getMessage()]
    sites = {r.args[0] for r in logged}
    assert 1 <= len(logged) == len(sites) <= 2
    assert all("r0" in r.getMessage() and f"planted fault in {site}" in r.getMessage() for r in logged)
