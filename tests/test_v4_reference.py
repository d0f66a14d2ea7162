"""The V4 drafter in the reference decoder against a tiny transformers DeepSeek-V4 target:
lossless greedy, oracle acceptance, exact stop at a corrupted draft, exact T=1 distribution."""

import pytest
import torch
from stats_util import chi_square_pvalue
from v4_fixtures import BLOCK, TARGET_LAYERS, VOCAB, random_v4_drafter, tiny_v4_target

from dspark_vllm.reference_decoder import ReferenceDecoder, SamplingConfig
from dspark_vllm.reference_proposers import DSparkProposer, OracleProposer
from dspark_vllm.v4.target import V4Target

PROMPTS = [[5, 9, 17, 33, 2, 64, 7, 81, 12, 40, 3, 99, 21, 8, 55, 60, 70, 11],
           [4, 8, 15, 16, 23, 42, 19, 27, 90, 14]]


@pytest.fixture(scope="module")
def v4():
    model = tiny_v4_target(scale=0.3)
    return model, random_v4_drafter(model)


def plain(model, prompts, n):
    out, _ = ReferenceDecoder(V4Target(model, TARGET_LAYERS), None).generate(prompts, SamplingConfig(max_new_tokens=n))
    return out


def test_greedy_output_equals_plain_greedy_and_replay_keeps_the_cache_exact(v4):
    model, drafter = v4
    reference = plain(model, PROMPTS, 30)
    # plain greedy by full forwards, no cache at all: the replayed caches are exact
    for prompt, out in zip(PROMPTS, reference):
        seq = list(prompt)
        for _ in range(len(out)):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(prompt):] == out
    dec = ReferenceDecoder(V4Target(model, TARGET_LAYERS), DSparkProposer(drafter))
    out, stats = dec.generate(PROMPTS, SamplingConfig(max_new_tokens=30))
    assert out == reference and stats.rounds > 0


def test_oracle_drafts_are_all_accepted_and_a_corrupted_one_stops_acceptance(v4):
    model, _ = v4
    reference = plain(model, PROMPTS, 24)
    seqs = [p + o for p, o in zip(PROMPTS, reference)]
    out, stats = ReferenceDecoder(V4Target(model, TARGET_LAYERS), OracleProposer(seqs, BLOCK, VOCAB)).generate(
        PROMPTS, SamplingConfig(max_new_tokens=24))
    assert out == reference and stats.tau == pytest.approx(BLOCK + 1, abs=0.6)
    assert stats.accept_rate()[:BLOCK - 1] == [1.0] * (BLOCK - 1)
    out, stats = ReferenceDecoder(V4Target(model, TARGET_LAYERS), OracleProposer(seqs, BLOCK, VOCAB, corrupt_position=2)
                                  ).generate(PROMPTS, SamplingConfig(max_new_tokens=24))
    assert out == reference
    assert stats.accept_rate()[:2] == [1.0, 1.0] and stats.accept_rate()[2] == 0.0


V_SMALL, SAMPLES = 8, 600
SMALL_PROMPT = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def small_v4():
    model = tiny_v4_target(seed=3, scale=0.3, vocab=V_SMALL, logit_scale=4.0)
    return model, random_v4_drafter(model, scale=0.2)


def exact_two_tokens(model) -> dict:
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([SMALL_PROMPT])).logits[0, -1].float(), -1)
        p2 = torch.softmax(model(torch.tensor([SMALL_PROMPT + [a] for a in range(V_SMALL)])).logits[:, -1].float(), -1)
    return {(a, b): float(p1[a] * p2[a, b]) for a in range(V_SMALL) for b in range(V_SMALL)}


def sample_two_tokens(model, drafter):
    dec = ReferenceDecoder(V4Target(model, TARGET_LAYERS), DSparkProposer(drafter))
    out, stats = dec.generate([SMALL_PROMPT] * SAMPLES, SamplingConfig(max_new_tokens=2, temperature=1.0, seed=0))
    return [tuple(o[:2]) for o in out], stats


def test_sampled_output_follows_the_target_distribution(small_v4):
    """T=1: the joint distribution of the first two generated tokens (64 outcomes, exact from
    the target's softmax) by Pearson's chi-square; drafts are both accepted and rejected."""
    model, drafter = small_v4
    samples, stats = sample_two_tokens(model, drafter)
    assert chi_square_pvalue(samples, exact_two_tokens(model)) > 1e-3
    assert 0.05 < stats.accepted_tokens / stats.draft_tokens < 0.95


def test_the_distribution_test_rejects_a_lossy_verifier(small_v4, monkeypatch):
    """Negative control: accepting every draft (the drafter's distribution, not the target's)
    must fail the same test."""
    import dspark_vllm.reference_decoder as rd
    from dspark_vllm.verification import verify

    def accept_all_drafts(draft_tokens, draft_probs, draft_lens, target_logits, *args):
        result = verify(draft_tokens, draft_probs, draft_lens, target_logits, *args)
        n = draft_lens.long()
        rows = torch.arange(draft_tokens.shape[0])
        out = torch.full_like(result.output_tokens, -1)
        out[:, : draft_tokens.shape[1]] = draft_tokens
        out[rows, n] = target_logits[rows, n].argmax(-1)
        result.num_accepted, result.output_tokens = n, out
        return result

    monkeypatch.setattr(rd, "verify", accept_all_drafts)
    model, drafter = small_v4
    samples, _ = sample_two_tokens(model, drafter)
    assert chi_square_pvalue(samples, exact_two_tokens(model)) < 1e-6
