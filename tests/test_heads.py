import pytest
import torch

from dspark_vllm.heads import ConfidenceHead, build_markov_head
from dspark_vllm.sampling import sample_block, sample_logits

V, R, H = 32, 8, 16


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_block_bias_equals_step_loop(head_type):
    torch.manual_seed(0)
    head = build_markov_head(head_type, V, R, H)
    hidden = torch.randn(3, 5, H)
    prev = torch.randint(0, V, (3, 5))
    state = head.init_state(3, hidden.device, hidden.dtype)
    steps = []
    for k in range(5):
        bias, state = head.step_bias(hidden[:, k], prev[:, k], state)
        steps.append(bias)
    torch.testing.assert_close(head.block_bias(hidden, prev), torch.stack(steps, 1))


def test_vanilla_bias_is_w1_times_w2():
    torch.manual_seed(0)
    head = build_markov_head("vanilla", V, R, H)
    prev = torch.tensor([3, 7])
    bias, _ = head.step_bias(torch.zeros(2, H), prev, None)
    expected = head.markov_w1.weight[prev] @ head.markov_w2.weight.T  # W1[prev] W2 (W2 = weight^T)
    torch.testing.assert_close(bias, expected)


def test_rnn_recurrence_matches_paper_eq6():
    torch.manual_seed(0)
    head = build_markov_head("rnn", V, R, H)
    h = torch.randn(1, H)
    s = torch.randn(1, R)
    prev = torch.tensor([5])
    e = head.markov_w1.weight[prev]
    z = torch.cat([s, e, h], -1)
    a, c, o = (z @ head.joint_proj.weight.T + head.joint_proj.bias).chunk(3, -1)
    s_new = torch.sigmoid(a) * s + (1 - torch.sigmoid(a)) * torch.tanh(c)
    bias, state = head.step_bias(h, prev, s)
    torch.testing.assert_close(state, s_new)
    torch.testing.assert_close(bias, torch.tanh(o) @ head.markov_w2.weight.T)
    # the state actually carries history: a different earlier state changes the bias
    bias2, _ = head.step_bias(h, prev, torch.zeros(1, R))
    assert not torch.allclose(bias, bias2)


def test_rank_zero_builds_no_head():
    assert build_markov_head("vanilla", V, 0, H) is None
    with pytest.raises(ValueError, match="unknown markov_head_type"):
        build_markov_head("lstm", V, R, H)


def test_confidence_uses_prev_embedding_not_current_token():
    torch.manual_seed(0)
    head = build_markov_head("vanilla", V, R, H)
    conf = ConfidenceHead(H + R)
    base = torch.randn(2, 4, V)
    hidden = torch.randn(2, 4, H)
    anchor = torch.tensor([1, 2])
    block = sample_block(base, hidden, anchor, torch.zeros(2), head, conf, True)
    prev = torch.cat([anchor[:, None], block.tokens[:, :-1]], 1)
    expected = (torch.cat([hidden, head.markov_w1.weight[prev]], -1) @ conf.proj.weight.T + conf.proj.bias).squeeze(-1)
    torch.testing.assert_close(block.confidence_logits, expected)
    assert block.confidence_logits.dtype == torch.float32


def test_greedy_block_applies_markov_bias_left_to_right():
    torch.manual_seed(0)
    head = build_markov_head("vanilla", V, R, H)
    base = torch.randn(1, 3, V)
    hidden = torch.randn(1, 3, H)
    block = sample_block(base, hidden, torch.tensor([4]), torch.zeros(1), head, None, False)
    prev = 4
    for k in range(3):
        z = base[0, k] + head.markov_w1.weight[prev] @ head.markov_w2.weight.T
        assert int(block.tokens[0, k]) == int(z.argmax())
        prev = int(z.argmax())
    assert block.probs is None  # greedy drafts: one-hot q, not materialised


def test_sample_logits_mixed_batch_returns_exact_q():
    torch.manual_seed(0)
    logits = torch.randn(2, V)
    temp = torch.tensor([0.0, 0.7])
    tokens, probs = sample_logits(logits, temp, torch.Generator().manual_seed(1))
    assert int(tokens[0]) == int(logits[0].argmax())
    assert probs[0, tokens[0]] == 1.0 and probs[0].sum() == 1.0
    torch.testing.assert_close(probs[1], torch.softmax(logits[1] / 0.7, -1))


def test_seeded_draws_are_a_function_of_the_seed_and_follow_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, V).repeat(4000, 1)
    temp = torch.full((4000,), 0.9)
    seeds = torch.arange(4000)
    tokens, probs = sample_logits(logits, temp, seeds=seeds, position=3)
    again, _ = sample_logits(logits, temp, seeds=seeds, position=3)
    assert torch.equal(tokens, again)
    assert not torch.equal(tokens, sample_logits(logits, temp, seeds=seeds, position=4)[0])  # position matters
    freq = torch.bincount(tokens, minlength=V).float() / 4000
    assert (freq - probs[0]).abs().max() < 0.03  # 4,000 draws: a few standard errors of the largest cell


def test_derive_seed_spreads_seed_and_position_over_the_int32_range():
    from dspark_vllm.sampling import SEED_LIMIT, derive_seed

    values = {derive_seed(seed, pos) for seed in range(50) for pos in range(50)}
    assert len(values) == 2500 and all(0 <= v < SEED_LIMIT for v in values)
    assert derive_seed(42, 17) == derive_seed(42, 17)
