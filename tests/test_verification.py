"""Rejection sampling: exact greedy semantics and the output distribution of one verify step."""

import pytest
import torch

from dspark_vllm.verification import apply_top_k_top_p, target_probs, verify
from stats_util import chi_square_pvalue

P_VALUE_FLOOR = 1e-3  # each statistical test fails falsely with probability 0.1% (fixed seed)


def test_greedy_accepts_matching_prefix_and_emits_argmax():
    v = 10
    logits = torch.full((2, 4, v), -5.0)
    target_next = [[3, 4, 5, 6], [1, 2, 3, 4]]
    for r in range(2):
        for k, t in enumerate(target_next[r]):
            logits[r, k, t] = 5.0
    drafts = torch.tensor([[3, 4, 9], [1, 7, 3]])
    res = verify(drafts, None, torch.tensor([3, 3]), logits, torch.zeros(2))
    assert res.num_accepted.tolist() == [2, 1]
    assert res.emitted(0) == [3, 4, 5]  # correction = target argmax at the mismatch
    assert res.emitted(1) == [1, 2]
    res = verify(torch.tensor([[3, 4, 5]]), None, torch.tensor([3]), logits[:1], torch.zeros(1))
    assert res.emitted(0) == [3, 4, 5, 6]  # all accepted + bonus


def test_draft_length_limits_acceptance():
    v = 10
    logits = torch.zeros(1, 4, v)
    logits[0, :, 2] = 9.0
    drafts = torch.tensor([[2, 2, 2]])
    for length in range(4):
        res = verify(drafts, None, torch.tensor([length]), logits, torch.zeros(1))
        assert int(res.num_accepted[0]) == length
        assert res.emitted(0) == [2] * (length + 1)


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    k2 = apply_top_k_top_p(logits, torch.tensor([2]), None)
    assert torch.isinf(k2[0, 0, 2:]).all() and torch.isfinite(k2[0, 0, :2]).all()
    p = apply_top_k_top_p(logits, None, torch.tensor([0.7]))
    assert torch.isfinite(p[0, 0, :2]).all() and torch.isinf(p[0, 0, 2:]).all()
    p_off = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([1.0]))
    assert torch.isfinite(p_off).all()
    probs = target_probs(logits, torch.tensor([1.0]), torch.tensor([2]), None)
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.625, 0.375, 0.0, 0.0]))


@pytest.mark.parametrize("greedy_draft", [False, True])
@pytest.mark.parametrize("top_k", [0, 3])
def test_first_token_distribution_is_target(greedy_draft, top_k):
    """One draft from q, verified against p: the emitted first token must follow p exactly."""
    torch.manual_seed(0)
    v, n = 6, 20000
    p_logits = torch.randn(v) * 1.5
    q = torch.softmax(torch.randn(v) * 1.5, -1)
    gen = torch.Generator().manual_seed(123)
    if greedy_draft:
        drafts = torch.full((n, 1), int(q.argmax()))
        probs = None
    else:
        drafts = torch.multinomial(q.expand(n, v), 1, replacement=True, generator=gen)
        probs = q.expand(n, 1, v)
    logits = p_logits.expand(n, 2, v)
    res = verify(drafts, probs, torch.ones(n, dtype=torch.long), logits, torch.ones(n),
                 torch.full((n,), top_k), None, gen)
    first = res.output_tokens[:, 0].tolist()
    exact = target_probs(p_logits.view(1, 1, v), torch.ones(1), torch.tensor([top_k]))[0, 0]
    assert chi_square_pvalue(first, {i: float(exact[i]) for i in range(v)}) > P_VALUE_FLOOR
    assert 0 < float(res.num_accepted.float().mean()) < 1  # both paths (accept, residual) exercised


def test_chi_square_detects_a_wrong_distribution():
    """Power check for the helper: samples from q are rejected when tested against p."""
    torch.manual_seed(0)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    samples = torch.multinomial(q, 20000, replacement=True).tolist()
    assert chi_square_pvalue(samples, {0: 0.35, 1: 0.3, 2: 0.2, 3: 0.15}) < 1e-6
