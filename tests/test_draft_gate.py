"""The pre-draft gate: skip drafting exactly when no verify length can pay for the draft."""

import statistics

import numpy as np
import pytest

from dspark_vllm.scheduler import CostProfile, StepLoad, VerifyLengthScheduler
from dspark_vllm.scheduler.draft_gate import DraftGate, DraftTimer
from dspark_vllm.settings import settings_from_dict


def flat_then_linear(base_ms=40.0, flat=8, slope=5.0, upto=512):
    grid = list(range(1, upto + 1))
    return CostProfile(tokens=grid, step_ms=[base_ms + slope * max(0, t - flat) for t in grid])


def test_timer_recovers_a_linear_draft_cost():
    timer = DraftTimer(decay=1.0)
    assert timer.predict(4) == 0.0  # nothing measured: optimistic
    for r in (1, 2, 4, 8, 16):
        timer.observe(r, 3.0 + 2.0 * r)
    assert timer.predict(32) == pytest.approx(67.0)
    one = DraftTimer()
    one.observe(4, 20.0)  # a single batch size: proportional
    assert one.predict(8) == pytest.approx(40.0)


def test_timer_predicts_arrays_like_scalars():
    timer = DraftTimer()
    sizes = np.array([1, 7, 16, 112])
    assert np.array_equal(timer.predict(sizes), np.zeros(4))
    timer.observe(16, 20.0)  # proportional model
    assert timer.predict(sizes) == pytest.approx([timer.predict(int(n)) for n in sizes])
    timer.observe(112, 60.0)  # a line through two sizes, floored at 0 below its intercept
    assert timer.predict(sizes) == pytest.approx([timer.predict(int(n)) for n in sizes])
    assert isinstance(timer.predict(7), float)


def test_gains_per_depth_match_a_direct_search():
    """The vectorised gains equal max over k <= R*D of (R + top-k survivals) / (t(base+R+k)*premium
    + d(R*D)) / (R / t(base+R)), computed here one depth and one k at a time."""
    cost = flat_then_linear(base_ms=30.0, flat=4, slope=2.0, upto=64)  # k beyond the grid extrapolates
    gate = DraftGate(cost, block_size=5)
    gate.cost.learned.verify_premium = 1.1
    gate.observe(np.array([[0.9, 0.7, 0.6, 0.5, 0.4]]), draft_ms=6.0)
    gate.observe(np.array([[0.8, 0.6]] * 3), draft_ms=9.0)
    gate.observe_ingest(4, 1.5)
    gate.observe_ingest(40, 6.0)
    for r, load in ((1, StepLoad()), (6, StepLoad(base_tokens=10)), (16, StepLoad(base_tokens=3, max_num_tokens=40))):
        surv = np.cumprod(gate.prior)
        room = max(0, (load.max_num_tokens or 1 << 30) - load.base_tokens - r)
        plain = r / cost.step_time_ms(load.base_tokens + r)
        want = []
        for depth in range(1, 6):
            best = 0.0
            tokens = sorted(np.repeat(surv[:depth], r), reverse=True)[:room]
            for k in range(1, len(tokens) + 1):
                tau = r + sum(tokens[:k])
                ms = (cost.step_time_ms(load.base_tokens + r + k) * 1.1 + gate.timer.predict(r * depth)
                      + gate.ingest.predict(tau))
                best = max(best, tau / ms)
            want.append(best / plain)
        assert gate.gains(r, load) == pytest.approx(want)


def test_gate_charges_the_context_each_drafted_step_ingests():
    """A drafted step projects what it emits into the drafter's cache first; a gate blind to
    that opens on a gain the ingestion eats (16 requests, numbers of the 2-core CPU: 28 ms to
    draft one position each, ~0.25 ms per ingested token)."""
    def gate_for(ingest_ms_per_token: float) -> DraftGate:
        gate = DraftGate(flat_then_linear(base_ms=116.0, flat=16, slope=3.4), block_size=4)
        gate.observe(np.tile([0.85, 0.6, 0.5, 0.4], (16, 1)), draft_ms=None)
        gate.timer.observe(16, 28.0)
        gate.timer.observe(64, 100.0)
        if ingest_ms_per_token:
            gate.observe_ingest(16, 16 * ingest_ms_per_token)
            gate.observe_ingest(64, 64 * ingest_ms_per_token)
        return gate

    blind, charged = gate_for(0.0), gate_for(0.25)
    assert blind.gain(16) > blind.min_gain and (blind.plan(16).requests > 0)
    assert charged.gain(16) < charged.min_gain and not (charged.plan(16).requests > 0)
    tau = 16 + 16 * 0.85  # one position each, all admitted
    assert charged.gains(16)[0] == pytest.approx(tau / ((116.0 + 3.4 * 16) + 28.0 + 0.25 * tau) / (16 / 116.0))
    assert charged.gain(1) > charged.min_gain  # one request: ingesting ~2 tokens is noise


def test_gate_drafts_when_verification_is_nearly_free():
    gate = DraftGate(flat_then_linear(), block_size=4)
    assert (gate.plan(1).requests > 0)  # no confidences seen yet: draft to learn them
    gate.observe(np.full((2, 4), 0.8), draft_ms=4.0)  # 2 requests in 4 ms: 2 ms for one
    assert (gate.plan(1).requests > 0)
    # expected best: 1 + 0.8 + 0.64 + 0.512 + 0.41 tokens for ~40 + 2 ms
    assert gate.gain(1) == pytest.approx((1 + 0.8 + 0.64 + 0.512 + 0.4096) / 42.0 * 40.0, rel=1e-6)


def test_gate_closes_under_load_and_for_poor_drafts():
    gate = DraftGate(flat_then_linear(), block_size=4)
    gate.observe(np.full((1, 4), 0.8), draft_ms=2.0)
    # 64 requests: every draft token costs 5 ms against a ~320 ms step; survival 0.8 cannot beat
    # the draft time plus the marginal token cost when the step is already compute bound
    for _ in range(20):
        gate.timer.observe(64, 64 * 2.0)
    assert not any((gate.plan(64).requests > 0) for _ in range(gate.probe_every))
    poor = DraftGate(flat_then_linear(), block_size=4)
    poor.observe(np.full((1, 4), 0.01), draft_ms=10.0)
    assert not (poor.plan(1).requests > 0)
    assert poor.gain(1) < 1.0


def test_closed_gate_probes_and_reopens_when_the_estimate_improves():
    gate = DraftGate(flat_then_linear(), block_size=4, probe_every=3, max_probe_every=12)
    gate.observe(np.full((1, 4), 0.01), draft_ms=10.0)  # an unlucky first block closes the gate
    # probes after 3 skipped steps, then 6, 12, 12: each probe that changes nothing backs off
    decisions = [gate.plan(5).requests for _ in range(3 + 1 + 6 + 1 + 12 + 1 + 12 + 1)]
    assert [i for i, n in enumerate(decisions) if n] == [3, 10, 23, 36]
    assert set(decisions) == {0, 1}  # a probe drafts one request
    for _ in range(40):  # the probes see good blocks drafted quickly
        gate.observe(np.full((1, 4), 0.9), draft_ms=1.0)
    assert all((gate.plan(1).requests > 0) for _ in range(5))
    assert gate.probe_wait == 3  # an open gate resets the back-off


def test_gate_counts_other_work_in_the_step():
    gate = DraftGate(flat_then_linear(flat=16), block_size=4)
    gate.observe(np.full((1, 4), 0.7), draft_ms=1.0)
    assert (gate.plan(2).requests > 0)
    assert not (gate.plan(2, StepLoad(base_tokens=100, max_num_tokens=102)).requests > 0)  # no room for drafts
    cliff = DraftGate(CostProfile(tokens=[1, 8, 9], step_ms=[40.0, 40.0, 400.0]), block_size=4)
    cliff.observe(np.full((1, 4), 0.9), draft_ms=1.0)
    assert (cliff.plan(2).requests > 0) and not (cliff.plan(2, StepLoad(base_tokens=6)).requests > 0)


@pytest.mark.parametrize("policy,gated", [("causal_greedy", True), ("async_topk", True), ("fixed", False),
                                          ("threshold", False)])
def test_scheduler_builds_the_gate_for_cost_aware_policies(policy, gated):
    chosen = {"policy": policy, "threshold": 0.5}
    sched = VerifyLengthScheduler.from_settings(settings_from_dict({"scheduler": chosen}), block_size=4)
    assert (sched.gate is not None) == gated
    off = VerifyLengthScheduler.from_settings(settings_from_dict({"scheduler": {**chosen, "draft_gate": False}}), 4)
    assert off.gate is None and (off.plan(1000).requests > 0)


def test_prior_is_the_plain_mean_of_the_first_blocks():
    """Bias-corrected EMA: one odd first block (a short warm-up request) must not dominate."""
    gate = DraftGate(flat_then_linear(), block_size=4, momentum=0.9)
    gate.observe(np.full((1, 4), 0.0))
    for _ in range(3):
        gate.observe(np.full((1, 4), 0.8))
    assert gate.prior == pytest.approx(np.full(4, 0.6))  # (0 + 3 * 0.8) / 4
    for _ in range(60):  # later blocks: exponential forgetting
        gate.observe(np.full((1, 4), 0.5))
    assert gate.prior == pytest.approx(np.full(4, 0.5), abs=1e-2)


def test_step_cost_scale_is_learned_and_multiplies_every_lookup():
    from dspark_vllm.scheduler.step_cost import StepCostEstimator

    est = StepCostEstimator(flat_then_linear(), window=8, min_samples=4)
    cost = est.served  # the view policies and the gate read
    for n in (1, 2, 3):
        est.observe(n, 100.0)  # served steps take 2.5x the 40 ms forward
    assert cost.scale == 1.0  # too few samples yet
    est.observe(12, 150.0)  # 2.5 x (40 + 5 * 4)
    assert cost.scale == pytest.approx(2.5)
    assert cost.step_time_ms(1) == pytest.approx(100.0) and cost.step_time_ms(12) == pytest.approx(150.0)
    assert cost.forward_ms(12) == pytest.approx(60.0)  # the profile itself is untouched
    est.observe(5, 5000.0)  # an idle gap between requests: the median ignores it
    est.observe(10_000, 9000.0)  # beyond the profile (a long prefill): not a sample
    assert cost.scale == pytest.approx(2.5)
    for _ in range(8):  # the machine got faster: the window forgets
        est.observe(1, 48.0)
    assert cost.scale == pytest.approx(1.2)


def test_step_cost_scale_keeps_the_curve_shape():
    """Unlike an additive overhead, a scale keeps what an extra token costs relative to a step:
    at 16 requests the same slow steps must not make verifying more tokens look cheap."""
    from dspark_vllm.scheduler.step_cost import StepCostEstimator

    est = StepCostEstimator(flat_then_linear(), min_samples=2)
    cost = est.served
    for _ in range(4):
        est.observe(16, 3.0 * (40.0 + 5.0 * 8))
    assert cost.step_time_ms(32) / cost.step_time_ms(16) == pytest.approx(cost.forward_ms(32) / cost.forward_ms(16))


def test_verify_premium_is_learned_from_drafted_vs_plain_steps_and_closes_a_marginal_gate():
    """Steps that verify drafts are timed apart from plain ones: the plain median sets the scale,
    drafted / plain (neighbouring steps) is the premium, and the gate charges it to drafted steps
    only, so a gain predicted at 1.1 on the plain scale falls below the margin when drafted steps
    cost 25% more."""
    from dspark_vllm.scheduler.step_cost import StepCostEstimator

    est = StepCostEstimator(flat_then_linear(), window=16, min_samples=4)
    cost = est.served
    for _ in range(4):
        est.observe(16, 2.0 * cost.forward_ms(16), verified_drafts=16)  # drafted steps only so far
    assert cost.scale == pytest.approx(2.0) and cost.verify_premium is None  # all steps set the scale
    for _ in range(4):  # then the kind alternates (an open gate exploring): each switch is a pair
        est.observe(16, 1.6 * cost.forward_ms(16))  # plain steps: 1.6x the profile
        est.observe(16, 2.0 * cost.forward_ms(16), verified_drafts=16)
    assert cost.scale == pytest.approx(1.6) and cost.verify_premium == pytest.approx(1.25)
    est.observe(16, 100 * cost.forward_ms(16), verified_drafts=3)  # one outlier moves no median
    assert cost.verify_premium == pytest.approx(1.25)

    gate = DraftGate(flat_then_linear(slope=0.5), block_size=4, min_gain=1.05)
    gate.observe(np.full((1, 4), 0.8), draft_ms=8.0)
    gate.cost.learned.scale = 1.6
    open_gain = gate.gain(16)
    assert open_gain == pytest.approx(1.1, abs=0.01)
    gate.cost.learned.verify_premium = 1.25
    assert gate.gain(16) < 1.05 < open_gain
    assert gate.plan(16).requests == 0


def test_verify_premium_compares_neighbouring_steps_while_the_machine_speeds_up():
    """An open gate makes a plain step only every 16th step, so the plain window reaches back
    hundreds of steps: while the machine speeds up (served/profiled 2.0 -> 1.2) the ratio of the
    two windows' medians read a discount (< 1) on drafted steps that truly cost 10% more. The
    neighbouring pairs see the true 1.1; a steady discount is held at 1 (never charged below
    a plain step)."""
    from dspark_vllm.scheduler.step_cost import StepCostEstimator

    est = StepCostEstimator(flat_then_linear())
    cost = est.served
    speed = lambda step: 2.0 - 0.8 * min(step / 600, 1.0)  # noqa: E731
    for step in range(64):  # a closed gate: plain steps on the slow machine
        est.observe(16, speed(step) * cost.forward_ms(16))
    for step in range(64, 700):  # open: 15 drafted steps, then one plain (exploration)
        drafted = step % 16 != 0
        est.observe(32 if drafted else 16, speed(step) * cost.forward_ms(32 if drafted else 16) * (1.1 if drafted else 1.0),
                    verified_drafts=16 if drafted else 0)
    windows = statistics.median(est.verify_samples) / statistics.median(est.samples)
    assert windows < 1.0  # what the window medians say
    assert cost.verify_premium == pytest.approx(1.1, abs=0.02)

    steady = StepCostEstimator(flat_then_linear(), min_samples=4)
    for _ in range(8):
        steady.observe(16, 2.0 * 60.0)
        steady.observe(16, 0.9 * 2.0 * 60.0, verified_drafts=4)
    assert steady.learned_premium == 1.0


def test_an_open_gate_with_a_marginal_gain_explores_plain_steps():
    """With no plain steps the premium would go stale: below ``explore_below`` every
    ``explore_every``-th step is plain (every 4th until a premium is known); a clear gain never
    explores."""
    gate = DraftGate(flat_then_linear(), block_size=4, min_gain=1.0, explore_every=8, explore_below=10.0)
    gate.observe(np.full((1, 4), 0.9), draft_ms=8.0)
    plans = [gate.plan(4).requests for _ in range(16)]
    assert plans.count(0) == 4 and plans[3] == 0  # premium unknown: every 4th step
    gate.cost.learned.verify_premium = 1.0
    plans = [gate.plan(4).requests for _ in range(16)]
    assert plans.count(0) == 2
    gate.explore_below = 1.0  # the gain is clear of it: no exploration
    assert all(gate.plan(4).requests == 4 for _ in range(32))


def _simulate_served_gate(learn_premium: bool, steps: int = 200) -> list[int]:
    """16 requests on a CPU-like target (50 + 4 ms per token) behind a gate that believes the
    synthetic roofline (flat to 64 tokens); drafts survive at 0.7 and cost 1.2 ms a position, so
    no depth pays (depth 1: 27.2 tokens per 197 ms against 16 per 114 ms). Returns the number
    of requests drafting in each step."""
    from dspark_vllm.scheduler.step_cost import StepCostEstimator

    est = StepCostEstimator(CostProfile.synthetic())
    gate = DraftGate(est.served, block_size=4, learn_premium=learn_premium)
    served = lambda tokens: 50.0 + 4.0 * tokens  # noqa: E731
    drafting = []
    for _ in range(steps):
        plan = gate.plan(16)
        drafting.append(plan.requests)
        if plan.requests:
            depth = plan.depth or 4
            gate.observe(np.full((plan.requests, depth), 0.7), draft_ms=1.2 * plan.requests * depth)
            drafts = plan.requests * depth
            est.observe(16 + drafts, served(16 + drafts), verified_drafts=drafts)
        else:
            est.observe(16, served(16))
    return drafting


def test_gate_learns_the_premium_before_trusting_a_wrong_cost_curve():
    """A flat profile makes verification look free, so the gate opens; without plain steps the
    scale is learned from drafted steps alone and it stays open for good. Exploring every 4th
    step until the premium is known closes it (probes only afterwards)."""
    blind = _simulate_served_gate(learn_premium=False)
    assert all(n == 16 for n in blind[100:])
    learning = _simulate_served_gate(learn_premium=True)
    assert sum(n == 0 for n in learning[:40]) >= 8  # plain samples for the premium
    assert sum(n > 0 for n in learning[100:]) <= 4  # then closed: at most a few one-request probes
    assert max(learning[100:]) <= 1


def test_a_slower_served_step_makes_a_closed_gate_open():
    """The drafter's time is measured, the target's is profiled: once served steps are known to
    be 2x the profile, the same drafts can pay."""
    gate = DraftGate(flat_then_linear(), block_size=4)
    gate.observe(np.full((1, 4), 0.2), draft_ms=48.0)  # 12 ms a position: 1.2 tokens for 52 ms vs 1 for 40
    assert gate.gain(1) < 1.0
    gate.cost.learned.scale = 2.0
    assert gate.gain(1) > 1.0


def test_scheduler_shares_one_cost_object_between_policy_gate_and_estimator():
    sched = VerifyLengthScheduler.from_settings(settings_from_dict({"scheduler": {"policy": "causal_greedy"}}), 4)
    assert sched.gate.cost is sched.policy.cost is sched.step_cost.served
    assert sched.gate.cost.learned is sched.step_cost.learned  # the estimator owns what is learned
    assert not hasattr(sched.step_cost.profile, "scale")  # the profile itself is static
    off = VerifyLengthScheduler.from_settings(
        settings_from_dict({"scheduler": {"policy": "causal_greedy", "learn_step_cost": False}}), 4)
    assert off.step_cost is None
    off.observe_step(4, 100.0)  # a no-op without the estimator
    assert off.policy.cost.scale == 1.0



def test_gate_needs_the_margin_to_open():
    gate = DraftGate(flat_then_linear(), block_size=4)
    gate.observe(np.full((1, 4), 0.7), draft_ms=5.0)
    g = gate.gain(4)
    assert g > 1.0
    below, above = (DraftGate(flat_then_linear(), block_size=4, min_gain=m) for m in (g - 0.01, g + 0.01))
    for gate_ in (below, above):
        gate_.observe(np.full((1, 4), 0.7), draft_ms=5.0)
    assert below.plan(4).requests == 4
    assert above.plan(4).requests == 0  # predicted gain g is inside the margin: plain decoding
    chosen = settings_from_dict({"scheduler": {"policy": "causal_greedy", "gate_min_gain": 1.2}})
    assert VerifyLengthScheduler.from_settings(chosen, 4).gate.min_gain == 1.2


def test_gate_drafts_shallow_when_only_the_first_positions_can_pay():
    """Under load every verified token costs a slice of the step and the draft costs per position:
    the best plan is the first position for everyone, not a full block trimmed afterwards."""
    cost = flat_then_linear(base_ms=100.0, flat=8, slope=2.0)
    gate = DraftGate(cost, block_size=4, min_gain=1.0)
    gate.observe(np.full((1, 4), 0.9), draft_ms=4.0)  # 1 ms per drafted position
    one = gate.plan(1)
    assert one.requests == 1 and one.depth == 4  # verification is nearly free for one request
    busy = gate.plan(32)  # 32 requests: every extra token costs 2 ms (+1 to draft) of a 148 ms step
    assert busy.requests == 32 and busy.depth < 4
    gains = gate.gains(32)
    assert gains[busy.depth - 1] == pytest.approx(gate.gain(32)) and gains[-1] < gains[busy.depth - 1]
    fixed = DraftGate(cost, block_size=4, min_gain=1.0, adaptive_depth=False)
    fixed.observe(np.full((1, 4), 0.9), draft_ms=4.0)
    plan = fixed.plan(32)
    assert plan.depth == 4 and (plan.requests == 32) == (gains[-1] > 1.0)
    sched = VerifyLengthScheduler.from_settings(
        settings_from_dict({"scheduler": {"policy": "causal_greedy", "adaptive_depth": False}}), 4)
    assert sched.gate.adaptive_depth is False


def test_shallow_blocks_move_only_the_positions_they_reached():
    gate = DraftGate(flat_then_linear(), block_size=4, momentum=0.5)
    gate.observe(np.full((2, 4), 0.8), draft_ms=8.0)
    gate.observe(np.full((3, 2), 0.2), draft_ms=3.0)  # depth 2: positions 3 and 4 unseen
    assert gate.prior == pytest.approx([0.5, 0.5, 0.8, 0.8])  # plain mean of 2 blocks, then untouched
    assert gate.seen.tolist() == [2, 2, 1, 1]
    fresh = DraftGate(flat_then_linear(), block_size=4)
    fresh.observe(np.full((1, 1), 0.6), draft_ms=1.0)  # a first shallow block fills the rest from its last
    assert fresh.prior == pytest.approx([0.6] * 4)
    assert fresh.plan(1).depth >= 1 and DraftGate(flat_then_linear(), block_size=4).plan(3).depth == 4
    # the timer counts drafted positions: 8 in 8 ms, 6 in 3 ms
    assert gate.timer.predict(8) > gate.timer.predict(6)


def test_internal_constants_come_from_the_one_frozen_tuning_object():
    import dataclasses

    from dspark_vllm.pending_context import PendingContext
    from dspark_vllm.scheduler.step_cost import StepCostEstimator
    from dspark_vllm.scheduler.tuning import TUNING

    with pytest.raises(dataclasses.FrozenInstanceError):
        TUNING.probe_every = 1
    gate = DraftGate(CostProfile.synthetic(), 4)
    assert (gate.momentum, gate.probe_every, gate.explore_every, gate.timer.decay) == (
        TUNING.gate_momentum, TUNING.probe_every, TUNING.explore_every, TUNING.timer_decay)
    est = StepCostEstimator(CostProfile.synthetic())
    assert (est.samples.maxlen, est.min_samples) == (TUNING.cost_window, TUNING.cost_min_samples)
    assert PendingContext.MAX_TOKENS == TUNING.queue_max_tokens
