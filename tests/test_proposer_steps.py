"""The vLLM proposer's per-step logic on a stub runner (no engine): gated steps queue context and
draft nothing, the first draft times the drafter at several batch sizes for the gate."""

import types

import numpy as np
import pytest
import torch

from dspark_vllm.drafters import SMOLLM2_DRAFTER
from dspark_vllm.settings import CONFIGS_DIR
from dspark_vllm.vllm_plugin.patches import ENV_CHECKPOINT, ENV_CONFIG
from dspark_vllm.vllm_plugin.proposer import (DRAFT_TIMING_SIZES, INGEST_TIMING_TOKENS, SHALLOW_TIMING_DEPTHS,
                                              DSparkV1Proposer)

NUM_REQS = 4


class StubRunner:
    """What ``propose_step`` reads from vLLM's GPUModelRunner, for NUM_REQS decoding requests."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.input_batch = types.SimpleNamespace(req_ids=[f"r{i}" for i in range(NUM_REQS)],
                                                 temperature_cpu=np.zeros(NUM_REQS))
        self.positions = torch.zeros(0, dtype=torch.long)

    def _get_positions(self, n: int) -> torch.Tensor:
        return self.positions[:n]


@pytest.fixture
def proposer(monkeypatch):
    monkeypatch.setenv(ENV_CHECKPOINT, str(SMOLLM2_DRAFTER))
    monkeypatch.setenv(ENV_CONFIG, str(CONFIGS_DIR / "llama-smollm2.yaml"))
    config = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.float32),
                                   scheduler_config=types.SimpleNamespace(max_num_seqs=8, max_num_batched_tokens=256))
    p = DSparkV1Proposer(config)
    cfg = p.drafter.config
    if not p.drafter.embeddings_bound:
        table = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
        p.drafter.bind_target_embeddings(table, table)
    runner = StubRunner()
    p.attach(runner)
    return p, runner


def run_step(p: DSparkV1Proposer, runner: StubRunner, start: list[int], counts: list[int]):
    """One engine step: request i had ``counts[i]`` tokens scheduled from position ``start[i]``."""
    runner.positions = torch.cat([torch.arange(s, s + n) for s, n in zip(start, counts)])
    total = sum(counts)
    width = p.drafter.config.hidden_size
    out = types.SimpleNamespace(finished_req_ids=set(), total_num_scheduled_tokens=total,
                                num_scheduled_tokens={f"r{i}": n for i, n in enumerate(counts)},
                                scheduled_spec_decode_tokens={})
    aux = [torch.randn(total, width) for _ in p.drafter.config.target_layer_ids]
    sampled = torch.randint(10, 1000, (NUM_REQS, 1))
    return p.propose_step(runner, out, sampled, aux)


def test_closed_gate_queues_context_and_drafts_nothing(proposer):
    p, runner = proposer
    gate = p.scheduler.gate
    gate.prior = np.full(p.block_size, 0.01)  # hopeless drafts: no length can pay
    gate.timer.observe(NUM_REQS, 1000.0)
    drafts = run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])
    assert drafts == [[]] * NUM_REQS and p.stats.gated == 1 and p.stats.steps == 0
    rows = [p.requests[f"r{i}"].row for i in range(NUM_REQS)]
    assert [p.context.pending_tokens(r) for r in rows] == [5, 6, 7, 8]
    assert p.cache.lengths[rows].tolist() == [0] * NUM_REQS  # nothing projected while gated
    drafts = run_step(p, runner, [5, 6, 7, 8], [1] * NUM_REQS)
    assert drafts == [[]] * NUM_REQS and [p.context.pending_tokens(r) for r in rows] == [6, 7, 8, 9]


def test_rejected_drafts_queue_only_each_requests_valid_prefix(proposer):
    """A verify step schedules 1 + d tokens per request; only the 1 + accepted ones are context.
    The queued features must be exactly those rows of the step's hidden states, per request."""
    p, runner = proposer
    run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])
    drafts = [[11, 12, 13]] * NUM_REQS  # what vLLM scheduled for verification (any drafts do)
    p.scheduler.gate.prior = np.full(p.block_size, 0.01)  # shut: the next step only queues
    p.scheduler.gate.timer.observe(NUM_REQS, 1000.0)
    p.scheduler.gate.timer.observe(1, 1000.0)
    counts = [1 + len(d) for d in drafts]
    accepted = [0, 1, 2, 3]  # drafts that survive, per request
    runner.positions = torch.cat([torch.arange(s, s + n) for s, n in zip([5, 6, 7, 8], counts)])
    width = p.drafter.config.hidden_size
    aux = [torch.randn(sum(counts), width) for _ in p.drafter.config.target_layer_ids]
    out = types.SimpleNamespace(finished_req_ids=set(), total_num_scheduled_tokens=sum(counts),
                                num_scheduled_tokens={f"r{i}": n for i, n in enumerate(counts)},
                                scheduled_spec_decode_tokens={f"r{i}": d for i, d in enumerate(drafts)})
    sampled = [[7] * (a + 1) for a in accepted]
    p.propose_step(runner, out, sampled, aux)
    features = torch.cat(aux, dim=-1)
    start = 0
    for i, (n, a) in enumerate(zip(counts, accepted)):
        row = p.requests[f"r{i}"].row
        assert p.context.pending_tokens(row) == 1 + a
        torch.testing.assert_close(torch.cat(p.context._parts[row]), features[start: start + 1 + a])
        assert p.requests[f"r{i}"].next_pos == 5 + i + 1 + a
        start += n


def test_first_draft_times_the_drafter_at_several_batch_sizes(proposer):
    p, runner = proposer
    timer = p.scheduler.gate.timer
    drafts = run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])  # no prior yet: the gate opens
    assert p.stats.steps == 1 and any(drafts)
    rows = [p.requests[f"r{i}"].row for i in range(NUM_REQS)]
    assert p.cache.lengths[rows].tolist() == [5, 6, 7, 8]  # drafting flushed the queued context
    sizes = [r for r in DRAFT_TIMING_SIZES if r <= 8]
    timed = len(sizes) + len(SHALLOW_TIMING_DEPTHS) + 1  # full blocks, shallow ones at 8, the step's own
    assert timer._s[0] == pytest.approx(sum(timer.decay ** k for k in range(timed)))
    # the fit spans 1 position (8 requests x depth 1 ... ) to 8 full blocks, so d(8 x B) comes from
    # a measurement, not an extrapolation
    assert timer._s[1] / timer._s[0] < 8 * p.block_size
    assert 0.0 < timer.predict(8) < timer.predict(8 * p.block_size)
    # ingestion: the step's own flush (26 queued tokens), then a scratch flush per seed size
    ingest = p.scheduler.gate.ingest
    assert ingest._s[0] == pytest.approx(sum(ingest.decay ** k for k in range(1 + len(INGEST_TIMING_TOKENS))))
    assert 0.0 < ingest.predict(8) < ingest.predict(512)
    assert p.cache.lengths[rows].tolist() == [5, 6, 7, 8]  # the seed flushes left the live cache alone


def test_shallow_plan_drafts_only_that_many_positions(proposer, monkeypatch):
    from dspark_vllm.scheduler.draft_gate import DraftPlan

    p, runner = proposer
    run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])  # first draft: full block, timing
    depths = []
    real = p.drafter.propose

    def spy(*args, **kwargs):
        depths.append(kwargs.get("depth"))
        return real(*args, **kwargs)

    monkeypatch.setattr(p.scheduler, "plan_draft", lambda n, load=None: DraftPlan(n, 2))
    monkeypatch.setattr(p.drafter, "propose", spy)
    drafted_before = p.stats.drafted
    drafts = run_step(p, runner, [5 + len(d) for d in [[]] * NUM_REQS], [1] * NUM_REQS)
    assert depths == [2]
    assert all(len(d) <= 2 for d in drafts)
    assert p.stats.drafted - drafted_before == 2 * NUM_REQS


def test_a_step_is_timed_as_drafted_only_if_it_verified_drafts(proposer, monkeypatch):
    """The step after a drafting call verifies its drafts and feeds the drafted-step samples
    (the verify premium); the step after a gated call is a plain sample."""
    p, runner = proposer
    seen = []
    monkeypatch.setattr(p.scheduler, "observe_step", lambda n, ms, verified=0: seen.append(verified))
    drafts = run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])  # first call: nothing to time yet
    handed = sum(len(d) for d in drafts)
    assert handed > 0 and seen == []
    p.scheduler.gate.prior = np.full(p.block_size, 0.01)  # from now on the gate stays shut
    p.scheduler.gate.timer.observe(NUM_REQS, 1000.0)
    p.scheduler.gate.timer.observe(1, 1000.0)
    start = [5 + len(d) for d in drafts]
    run_step(p, runner, start, [1 + len(d) for d in drafts])
    run_step(p, runner, [s + 1 + len(d) for s, d in zip(start, drafts)], [1] * NUM_REQS)
    assert seen == [handed, 0]


def test_step_trace_records_drafted_and_gated_steps(proposer, tmp_path):
    """DSPARK_VLLM_STEP_TRACE: a drafting step, then a gated one that verified its drafts."""
    import json

    from dspark_vllm.vllm_plugin.step_trace import StepTrace

    p, runner = proposer
    p.trace = StepTrace(str(tmp_path / "t.jsonl"))
    drafts = run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])
    p.scheduler.gate.prior = np.full(p.block_size, 0.01)
    p.scheduler.gate.timer.observe(NUM_REQS, 1000.0)
    p.scheduler.gate.timer.observe(1, 1000.0)
    run_step(p, runner, [5 + len(d) for d in drafts], [1 + len(d) for d in drafts])
    p.trace.close()
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["drafting"] for r in rows] == [NUM_REQS, 0]
    assert rows[0]["step_ms"] is None and rows[0]["draft_ms"] > 0 and rows[0]["ingest_ms"] > 0
    assert rows[1]["ingest_ms"] is None  # gated, no backlog at its cap: nothing projected
    assert rows[1]["verified"] == sum(len(d) for d in drafts) and rows[1]["step_ms"] > 0
    assert rows[1]["gain"] is not None and rows[1]["gain"] < 1.0 and rows[1]["emitted"] == NUM_REQS
