"""The vLLM proposer's per-step logic on a stub runner (no engine): gated steps queue context and
draft nothing, the first draft times the drafter at several batch sizes for the gate."""

import types

import numpy as np
import pytest
import torch
from stub_runner import PAGE, StubRunner

from dspark_vllm.bench.host_syncs import HostSyncCounter
from dspark_vllm.drafters import SMOLLM2_DRAFTER
from dspark_vllm.settings import CONFIGS_DIR, load_settings
from dspark_vllm.vllm_plugin.startup import ENV_WORKER, WorkerSettings
from dspark_vllm.vllm_plugin.gate_timing import DRAFT_TIMING_SIZES, INGEST_TIMING_TOKENS, SHALLOW_TIMING_DEPTHS
from dspark_vllm.vllm_plugin.proposer import DSparkV1Proposer

NUM_REQS = 4
IDS = [f"r{i}" for i in range(NUM_REQS)]


def make_proposer(monkeypatch, max_num_seqs: int = 8, prefix_caching: bool = False) -> DSparkV1Proposer:
    worker = WorkerSettings.for_checkpoint(SMOLLM2_DRAFTER, load_settings(CONFIGS_DIR / "llama-smollm2.yaml"))
    monkeypatch.setenv(ENV_WORKER, worker.to_json())
    config = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.float32),
                                   scheduler_config=types.SimpleNamespace(max_num_seqs=max_num_seqs,
                                                                          max_num_batched_tokens=2048),
                                   cache_config=types.SimpleNamespace(enable_prefix_caching=prefix_caching))
    p = DSparkV1Proposer(config)
    cfg = p.drafter.config
    if not p.drafter.embeddings_bound:
        table = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
        p.drafter.bind_target_embeddings(table, table)
    return p


@pytest.fixture
def proposer(monkeypatch):
    p = make_proposer(monkeypatch)
    runner = StubRunner(IDS)
    p.attach(runner)
    p.bind_kv_cache(runner)
    return p, runner


def run_step(p: DSparkV1Proposer, runner: StubRunner, start: list[int], counts: list[int]):
    """One engine step: request i had ``counts[i]`` tokens scheduled from position ``start[i]``."""
    return runner.step(p, start, counts)[0]


def pool_rows(p, runner, req_id: str, n: int) -> torch.Tensor:
    """Layer-0 keys of the first n positions of a request, read through its blocks."""
    blocks = torch.tensor(runner.blocks[req_id])
    pos = torch.arange(n)
    return p.pool.keys[0][blocks[pos // PAGE] * PAGE + pos % PAGE]


def test_closed_gate_queues_context_and_drafts_nothing(proposer):
    p, runner = proposer
    gate = p.scheduler.gate
    gate.prior = np.full(p.block_size, 0.01)  # hopeless drafts: no length can pay
    gate.timer.observe(NUM_REQS, 1000.0)
    drafts = run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])
    assert drafts == [[]] * NUM_REQS and p.metrics.gated == 1 and p.metrics.steps == 0
    keys = [p.requests[f"r{i}"].key for i in range(NUM_REQS)]
    assert [p.context.pending_tokens(k) for k in keys] == [5, 6, 7, 8]
    assert not p.pool.keys[0].any()  # nothing projected while gated
    drafts = run_step(p, runner, [5, 6, 7, 8], [1] * NUM_REQS)
    assert drafts == [[]] * NUM_REQS and [p.context.pending_tokens(k) for k in keys] == [6, 7, 8, 9]


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
    sampled = [[7] * (a + 1) for a in accepted]
    _, aux = runner.step(p, [5, 6, 7, 8], counts, sampled=sampled, spec={f"r{i}": d for i, d in enumerate(drafts)})
    features = torch.cat(aux, dim=-1)
    start = 0
    for i, (n, a) in enumerate(zip(counts, accepted)):
        key = p.requests[f"r{i}"].key
        assert p.context.pending_tokens(key) == 1 + a
        feats, slots, pos = (torch.cat([part[j] for part in p.context._parts[key]]) for j in range(3))
        torch.testing.assert_close(feats, features[start: start + 1 + a])
        assert pos.tolist() == list(range(5 + i, 5 + i + 1 + a))
        blocks = torch.tensor(runner.blocks[f"r{i}"])
        assert slots.tolist() == (blocks[pos // PAGE] * PAGE + pos % PAGE).tolist()
        assert p.requests[f"r{i}"].next_pos == 5 + i + 1 + a
        start += n


def test_first_draft_times_the_drafter_at_several_batch_sizes(proposer):
    p, runner = proposer
    timer = p.scheduler.gate.timer
    drafts = run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])  # no prior yet: the gate opens
    assert p.metrics.steps == 1 and any(drafts)
    assert p.context.total_tokens == 0  # drafting flushed the queued context
    written = [pool_rows(p, runner, f"r{i}", n) for i, n in enumerate([5, 6, 7, 8])]
    assert all(w.abs().sum(dim=(1, 2)).gt(0).all() for w in written)
    sizes = [r for r in DRAFT_TIMING_SIZES if r <= 8]
    timed = len(sizes) + len(SHALLOW_TIMING_DEPTHS) + 1  # full blocks, shallow ones at 8, the step's own
    assert timer._s[0] == pytest.approx(sum(timer.decay ** k for k in range(timed)))
    # the fit spans 1 position (8 requests x depth 1 ... ) to 8 full blocks, so d(8 x B) comes from
    # a measurement, not an extrapolation
    # (the times themselves are this machine's: only the sizes they were taken at are asserted)
    assert timer._s[1] / timer._s[0] < 8 * p.block_size
    # ingestion: the step's own flush (26 queued tokens), then a scratch flush per seed size
    # (INGEST_TIMING_TOKENS per request for the largest timed batch, 8 requests)
    ingest = p.scheduler.gate.ingest
    assert ingest._s[0] == pytest.approx(sum(ingest.decay ** k for k in range(1 + len(INGEST_TIMING_TOKENS))))
    sizes_seen = [26] + [8 * per for per in INGEST_TIMING_TOKENS]
    assert ingest._s[1] == pytest.approx(sum(n * ingest.decay ** (len(sizes_seen) - 1 - k)
                                             for k, n in enumerate(sizes_seen)))
    for i, n in enumerate([5, 6, 7, 8]):  # the seed flushes wrote a scratch pool, not the live one
        assert torch.equal(pool_rows(p, runner, f"r{i}", n), written[i])


def test_shallow_plan_drafts_only_that_many_positions(proposer, monkeypatch):
    from dspark_vllm.scheduler.draft_gate import DraftPlan

    p, runner = proposer
    run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])  # first draft: full block, timing
    depths = []
    real = p.drafter.propose

    def spy(*args, **kwargs):
        depths.append(kwargs.get("depth"))
        return real(*args, **kwargs)

    monkeypatch.setattr(p.scheduler, "plan", lambda n, load=None: DraftPlan(n, 2))
    monkeypatch.setattr(p.drafter, "propose", spy)
    drafts = run_step(p, runner, [5 + len(d) for d in [[]] * NUM_REQS], [1] * NUM_REQS)
    assert depths == [2]
    assert all(len(d) <= 2 for d in drafts)
    assert all(depth == 2 for _, depth in p.pending.values())  # counted as 2 positions once verified


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


def _decode_syncs(monkeypatch, batch: int) -> tuple[int, int]:
    """(host syncs of a drafted decode step, of a gated one) for ``batch`` requests."""
    from dspark_vllm.scheduler.draft_gate import DraftPlan

    with monkeypatch.context() as m:
        p = make_proposer(m, max_num_seqs=32)
        ids = [f"q{i}" for i in range(batch)]
        runner = StubRunner(ids)
        p.attach(runner)
        p.bind_kv_cache(runner)
        m.setattr(p.scheduler, "plan", lambda n, load=None: DraftPlan(n, None))
        lengths = [5 + 3 * i % 40 for i in range(batch)]
        drafts, _ = runner.step(p, [0] * batch, lengths, seed=1)  # prefill, first draft (timing runs)
        counts = []
        for plan in (DraftPlan(batch, None), DraftPlan(0, None)):
            m.setattr(p.scheduler, "plan", lambda n, load=None, plan=plan: plan)
            spec = {r: d for r, d in zip(ids, drafts) if d}
            sampled = [[11] * (1 + len(d) // 2) for d in drafts]  # half of each block accepted
            with HostSyncCounter() as syncs:
                drafts, _ = runner.step(p, lengths, [1 + len(d) for d in drafts], sampled=sampled, spec=spec, seed=2)
            counts.append(len(syncs))
            lengths = [n + len(s) for n, s in zip(lengths, sampled)]
        return counts[0], counts[1]


def test_host_syncs_per_step_do_not_grow_with_batch_size(monkeypatch):
    """A drafted step waits for the device twice (draft tokens, confidence logits) and a gated
    step never, for 1, 4 or 16 requests: no per-request reads of device values."""
    for batch in (1, 4, 16):
        drafted, gated = _decode_syncs(monkeypatch, batch)
        assert (batch, drafted, gated) == (batch, 2, 0)


def _shut_gate(p) -> None:
    p.scheduler.gate.prior = np.full(p.block_size, 0.01)  # hopeless drafts: no length can pay
    p.scheduler.gate.timer.observe(NUM_REQS, 1000.0)
    p.scheduler.gate.timer.observe(1, 1000.0)


def test_prefix_hit_drafts_from_the_cached_prefix(monkeypatch):
    """A request that starts at position 32 on blocks another request wrote (a prefix-cache hit)
    drafts exactly as if it had computed the whole prefix itself, even though the writer's
    context was still queued (gate shut) when the hit arrived."""
    from dspark_vllm.scheduler.draft_gate import DraftPlan

    p = make_proposer(monkeypatch, prefix_caching=True)
    runner = StubRunner(["a"])
    p.attach(runner)
    p.bind_kv_cache(runner)
    _shut_gate(p)
    _, aux_a = runner.step(p, [0], [40], seed=1)  # writer: 40 prompt tokens, queued, not drafted
    assert p.context.pending_tokens(p.requests["a"].key) == 40
    runner.set_batch(["a", "b"])
    runner.blocks["b"] = runner.blocks["a"][:2]  # b's first 32 positions hit a's two blocks
    seen = []
    monkeypatch.setattr(p.scheduler, "plan", lambda n, load=None: DraftPlan(n, None))
    real = p.drafter.propose
    monkeypatch.setattr(p.drafter, "propose", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    drafts, aux_b = runner.step(p, [40, 32], [1, 6], seed=2)
    args, kwargs = seen[-1]
    anchor, view = args[0], args[1]
    assert view.positions.tolist() == [38, 41]  # shortest context first: b (32 + 6), then a
    # the same block from a dense cache holding b's whole context: a's first 32 tokens + b's 6
    feats_a, feats_b = torch.cat(aux_a, -1), torch.cat(aux_b, -1)[1:]
    dense = p.drafter.new_cache(1)
    p.drafter.add_context(dense, torch.cat([feats_a[:32], feats_b])[None], torch.tensor([38]))
    want = p.drafter.forward_block(anchor[:1], dense)
    got = p.drafter.forward_block(anchor, view)[:1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_departed_requests_write_their_queue_only_with_prefix_caching(monkeypatch):
    for caching in (False, True):
        p = make_proposer(monkeypatch, prefix_caching=caching)
        runner = StubRunner(["a", "b"])
        p.attach(runner)
        p.bind_kv_cache(runner)
        _shut_gate(p)
        runner.step(p, [0, 0], [20, 3])
        runner.set_batch(["b"])  # a finished
        runner.step(p, [3], [1])
        assert "a" not in p.requests and p.context.pending_tokens(p.requests["b"].key) == 4
        assert bool(pool_rows(p, runner, "a", 20).abs().sum(dim=(1, 2)).gt(0).all()) == caching


def test_drafting_requests_per_step_are_capped_by_the_workspace(proposer, monkeypatch):
    """The proposer lets only as many requests draft in one step as the reserved workspace holds
    (workspace.py), seeded ones first; the cap follows from the KV memory vLLM allocated."""
    from dspark_vllm.scheduler.draft_gate import DraftPlan
    from dspark_vllm.vllm_plugin.workspace import bytes_per_request, max_drafting_requests, workspace_reservation

    p, runner = proposer
    per = bytes_per_request(p.block_size, p.drafter.config.vocab_size)
    assert max_drafting_requests(2**40, 8, p.block_size, p.drafter.config.vocab_size) == 8  # bounded by max_num_seqs
    assert max_drafting_requests(0, 8, p.block_size, p.drafter.config.vocab_size) == 1  # always one
    share = 0.08
    assert max_drafting_requests(int(3 * per * (1 - share) / share) + 1, 8, p.block_size,
                                 p.drafter.config.vocab_size, share) == 3
    assert workspace_reservation(10**12, 8, p.block_size, p.drafter.config.vocab_size) == 8 * per  # all requests
    assert workspace_reservation(10**6, 8, p.block_size, p.drafter.config.vocab_size, share) == int(10**6 * share)
    monkeypatch.setattr(p.scheduler, "plan", lambda n, load=None: DraftPlan(n, None))
    run_step(p, runner, [0] * NUM_REQS, [5, 6, 7, 8])
    p.max_drafting = 2
    drafts = run_step(p, runner, [5, 6, 7, 8], [1] * NUM_REQS)
    assert sum(1 for d in drafts if d) == 2


def test_a_steps_ingestion_time_adds_up_its_flushes(monkeypatch):
    """A step can write context twice (departing requests, then the drafting ones): the step's
    ``ingest_ms`` (the trace's figure) is their sum; the gate's timer gets each flush alone."""
    from dspark_vllm.vllm_plugin import request_contexts

    timed = []
    contexts = request_contexts.RequestContexts(drafter=None, prefix_caching=True,
                                                on_ingest=lambda n, ms: timed.append((n, ms)))
    contexts.queue = types.SimpleNamespace(flush=lambda keys: 10 * len(keys))
    clock = iter([0.0, 0.001, 5.0, 5.003])
    monkeypatch.setattr(request_contexts.time, "perf_counter", lambda: next(clock))
    contexts._flush([1])
    contexts._flush([2, 3])
    assert timed == [(10, pytest.approx(1.0)), (20, pytest.approx(3.0))]
    assert contexts.ingest_ms == pytest.approx(4.0)
