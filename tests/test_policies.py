"""Verification-length policies: paper Appendix A, properties, budgets, determinism."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_vllm.scheduler import (
    AsyncTopKPolicy,
    CausalGreedyPolicy,
    CostProfile,
    FixedPolicy,
    RetrospectivePolicy,
    StaleConfidences,
    StepLoad,
    ThresholdPolicy,
    expected_tokens,
    survival,
)
from dspark_vllm.scheduler.policies import sorted_candidates, throughput_path
from dspark_vllm.verification import verify
from stats_util import chi_square_pvalue

# ---- paper Appendix A ---------------------------------------------------------------------
# One request, gamma = 2, vocabulary {A, B}; target p = (0.7, 0.3), draft q = (0.5, 0.5), so the
# first draft survives with a_1 = 0.8. c_2 depends on the sampled x_1: 0.9 after A, 0 after B.
# SPS(1) = 1.0, SPS(2) = 0.5, SPS(3) = 0.45.
P_T, Q_D = np.array([0.7, 0.3]), np.array([0.5, 0.5])
APPENDIX_COST = CostProfile(tokens=[1, 2, 3], step_ms=[1000.0, 2000.0, 1000.0 / 0.45])


def appendix_confidence(x1: int) -> np.ndarray:
    return np.array([[0.8, 0.9 if x1 == 0 else 0.0]])


def exact_first_token(lengths_for) -> np.ndarray:
    """Exact P(first output token) when the scheduler picks lengths_for(x1) after x1 ~ q."""
    out = np.zeros(2)
    for x1 in (0, 1):
        if lengths_for(x1) >= 1:
            accept = min(1.0, P_T[x1] / Q_D[x1])
            residual = np.maximum(P_T - Q_D, 0)
            residual /= residual.sum()
            out += Q_D[x1] * (accept * np.eye(2)[x1] + (1 - accept) * residual)
        else:
            out += Q_D[x1] * P_T
    return out


def test_appendix_a_retrospective_scheduler_is_biased():
    policy = RetrospectivePolicy(APPENDIX_COST)
    assert policy.lengths(appendix_confidence(0))[0] == 2  # Theta_2 = 1.134 is the global max
    assert policy.lengths(appendix_confidence(1))[0] == 0
    np.testing.assert_allclose(exact_first_token(lambda x1: policy.lengths(appendix_confidence(x1))[0]),
                               [0.85, 0.15])


def test_appendix_a_causal_greedy_is_lossless():
    policy = CausalGreedyPolicy(APPENDIX_COST)
    for x1 in (0, 1):  # Theta_1 = 0.9 <= Theta_0 = 1.0: stop before looking at c_2
        assert policy.lengths(appendix_confidence(x1))[0] == 0
    np.testing.assert_allclose(exact_first_token(lambda x1: policy.lengths(appendix_confidence(x1))[0]), P_T)


def _simulate(policy_lengths, n=20000, seed=0):
    """Monte Carlo through the real verify(): draft x1 ~ q, schedule, verify against p."""
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.multinomial(torch.tensor(Q_D).float().expand(n, 2), 1, generator=gen)
    lens = torch.tensor([policy_lengths(int(x)) for x in x1[:, 0]]).clamp(max=1)
    logits = torch.log(torch.tensor(P_T).float()).expand(n, 2, 2)
    res = verify(x1, torch.tensor(Q_D).float().expand(n, 1, 2), lens, logits, torch.ones(n), generator=gen)
    return res.output_tokens[:, 0].tolist()


def test_appendix_a_monte_carlo_with_real_verifier():
    causal = CausalGreedyPolicy(APPENDIX_COST)
    retro = RetrospectivePolicy(APPENDIX_COST)
    target = {0: 0.7, 1: 0.3}
    assert chi_square_pvalue(_simulate(lambda x: causal.lengths(appendix_confidence(x))[0]), target) > 1e-3
    samples = _simulate(lambda x: retro.lengths(appendix_confidence(x))[0])
    assert abs(np.mean(np.array(samples) == 0) - 0.85) < 0.01
    assert chi_square_pvalue(samples, target) < 1e-6


@pytest.mark.parametrize("stale", [[0.8, 0.9], [0.8, 0.0], [1.0, 1.0], [0.1, 0.1]])
def test_async_topk_is_lossless_because_budget_is_stale(stale):
    policy = AsyncTopKPolicy(APPENDIX_COST)
    stale_conf = np.array([stale])
    chosen = {x1: policy.lengths(appendix_confidence(x1), stale_confidence=stale_conf)[0] for x1 in (0, 1)}
    # admission of x1 (length >= 1) is the same whichever x1 was drawn
    assert (chosen[0] >= 1) == (chosen[1] >= 1)
    np.testing.assert_allclose(exact_first_token(lambda x1: chosen[x1]), P_T)


# ---- properties ---------------------------------------------------------------------------
def confidences(max_r=12, max_b=7):
    return st.integers(1, max_r).flatmap(lambda r: st.integers(1, max_b).flatmap(
        lambda b: st.lists(st.lists(st.floats(0.0, 1.0), min_size=b, max_size=b), min_size=r, max_size=r)
    )).map(lambda rows: np.array(rows, dtype=np.float64))


COSTS = [CostProfile.synthetic(base_ms=20, flat_tokens=16, slope_ms=1.0, max_tokens=256, bucket=4),
         CostProfile.synthetic(base_ms=5, flat_tokens=4, slope_ms=2.0, max_tokens=256, bucket=1),
         CostProfile(tokens=[8, 16, 32, 64], step_ms=[10, 11, 25, 26])]


def all_policies(cost):
    return [FixedPolicy(), ThresholdPolicy(0.5), CausalGreedyPolicy(cost), RetrospectivePolicy(cost)]


@settings(max_examples=150, deadline=None)
@given(conf=confidences(), cost_idx=st.integers(0, 2), data=st.data())
def test_lengths_are_prefixes_within_budget(conf, cost_idx, data):
    r, b = conf.shape
    max_lens = np.array(data.draw(st.lists(st.integers(0, b), min_size=r, max_size=r)))
    budget = data.draw(st.integers(r, r + r * b + 2))
    load = StepLoad(base_tokens=0, max_num_tokens=budget)
    for policy in all_policies(COSTS[cost_idx]) + [AsyncTopKPolicy(COSTS[cost_idx])]:
        kwargs = {"stale_confidence": conf[::-1].copy()} if isinstance(policy, AsyncTopKPolicy) else {}
        lens = policy.lengths(conf, max_lens, load, **kwargs)
        assert lens.shape == (r,) and lens.dtype.kind == "i"
        assert (lens >= 0).all() and (lens <= max_lens).all(), policy.name
        assert r + lens.sum() <= budget, policy.name
        # determinism
        assert np.array_equal(lens, policy.lengths(conf, max_lens, load, **kwargs))


@settings(max_examples=150, deadline=None)
@given(conf=confidences(max_r=6, max_b=4), cost_idx=st.integers(0, 2))
def test_causal_greedy_is_optimal_when_theta_is_unimodal(conf, cost_idx):
    cost = COSTS[cost_idx]
    r, b = conf.shape
    order, surv = sorted_candidates(survival(conf), np.full(r, b))
    path = throughput_path(surv, r, cost)
    peak = int(np.argmax(path))
    unimodal = np.all(np.diff(path[: peak + 1]) > 0) and np.all(np.diff(path[peak:]) <= 0)
    lens = CausalGreedyPolicy(cost, smooth=False).lengths(conf)
    theta = expected_tokens(conf, lens) * cost.sps(r + lens.sum())
    if unimodal:
        assert theta == pytest.approx(path.max(), rel=1e-9)
    assert theta <= path.max() + 1e-9
    # The greedy path covers the optimum over *all* prefix allocations (brute force, small R, B).
    if r <= 4 and b <= 3:
        grids = np.array(np.meshgrid(*[np.arange(b + 1)] * r, indexing="ij")).reshape(r, -1).T
        best = max(expected_tokens(conf, g) * cost.sps(r + g.sum()) for g in grids)
        assert path.max() == pytest.approx(best, rel=1e-9)


def test_threshold_uses_first_low_position():
    conf = np.array([[0.9, 0.8, 0.3, 0.9], [0.2, 0.9, 0.9, 0.9], [0.9] * 4])
    assert ThresholdPolicy(0.5).lengths(conf).tolist() == [2, 0, 4]


def test_causal_greedy_trims_under_load():
    cost = CostProfile.synthetic(base_ms=20, flat_tokens=64, slope_ms=0.5, max_tokens=4096)
    conf = np.full((1, 7), 0.8)
    assert CausalGreedyPolicy(cost).lengths(conf)[0] == 7  # idle GPU: verify everything
    busy = np.full((256, 7), 0.8)
    lens = CausalGreedyPolicy(cost).lengths(busy)
    assert lens.mean() < 3  # saturated: only the most likely prefixes
    assert expected_tokens(busy, lens) * cost.sps(256 + lens.sum()) > \
        expected_tokens(busy, np.full(256, 7)) * cost.sps(256 * 8)


def test_stale_confidences_lag_two_steps():
    buf = StaleConfidences(block_size=2, lag=2)
    assert buf.stale(["a"]).tolist() == [[1.0, 1.0]]
    buf.push(["a"], np.array([[0.1, 0.2]]))
    assert buf.stale(["a"]).tolist() == [[1.0, 1.0]]
    buf.push(["a"], np.array([[0.3, 0.4]]))
    assert buf.stale(["a"]).tolist() == [[0.1, 0.2]]
    buf.push(["a"], np.array([[0.5, 0.6]]))
    assert buf.stale(["a"]).tolist() == [[0.3, 0.4]]
    buf.forget(["a"])
    assert buf.stale(["a"]).tolist() == [[1.0, 1.0]]


def test_shallow_drafts_extend_to_the_block_for_stale_budgets():
    from dspark_vllm.scheduler.policies import extend_to_block
    from dspark_vllm.scheduler import VerifyLengthScheduler
    from dspark_vllm.settings import settings_from_dict

    conf = np.array([[0.9, 0.5], [0.7, 0.2]])
    assert extend_to_block(conf, 4).tolist() == [[0.9, 0.5, 0.5, 0.5], [0.7, 0.2, 0.2, 0.2]]
    assert extend_to_block(conf, 2) is conf
    sched = VerifyLengthScheduler.from_settings(settings_from_dict({"scheduler": {"policy": "async_topk"}}), 4)
    for _ in range(3):  # shallow blocks go into the two-step-old history at full width
        lens = sched.lengths(conf, ["a", "b"])
        assert (np.asarray(lens) <= 2).all()
    assert sched.policy.history.stale(["a"]).shape == (1, 4)
    sched.forget(["a"])
    assert sched.policy.history.stale(["a"]).tolist() == [[1.0] * 4]


def test_a_registered_policy_is_selectable_by_name():
    """Adding a policy is one class: settings, the scheduler and start-up checks read the registry."""
    from dspark_vllm.scheduler import POLICIES, VerifyLengthScheduler, VerifyPolicy, register_policy
    from dspark_vllm.settings import SettingsError, settings_from_dict

    with pytest.raises(SettingsError, match="unknown policy 'first_only'"):
        settings_from_dict({"scheduler": {"policy": "first_only"}})

    class FirstOnly(VerifyPolicy):
        name = "first_only"

        def lengths(self, confidence, max_lens=None, load=None):
            return np.minimum(1, np.full(confidence.shape[0], confidence.shape[1]))

    register_policy(FirstOnly)
    try:
        sched = VerifyLengthScheduler.from_settings(settings_from_dict({"scheduler": {"policy": "first_only"}}), 4)
        assert sched.lengths(np.full((3, 4), 0.9), ["a", "b", "c"]).tolist() == [1, 1, 1]
        assert not sched.measures_draft_time  # not load-aware: no gate
        with pytest.raises(ValueError, match="needs the drafter's confidence head"):
            sched.check_drafter(False)
    finally:
        POLICIES.pop("first_only")
