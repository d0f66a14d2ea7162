"""Temperature 1: the joint distribution of the first 3 generated tokens equals the target's.

Target: a tiny random Qwen3 with an 8-token vocabulary, so the exact distribution of
(t1, t2, t3) over all 512 outcomes is computable from 1 + 8 + 64 forwards. Each configuration
draws 4000 samples (one batch of identical prompts) and applies Pearson's chi-square test; with
P_VALUE_FLOOR = 1e-3 each configuration fails falsely with probability 0.1% (seeds are fixed,
so a run is deterministic). A negative control shows the test rejects a lossy verifier.
"""

import pytest
import torch

import dspark_vllm.reference_decoder as rd
from dspark_vllm.checkpoint import build_random_drafter
from dspark_vllm.reference_proposers import DSparkProposer
from dspark_vllm.reference_decoder import ReferenceDecoder, SamplingConfig
from dspark_vllm.hf_target import HFTarget
from dspark_vllm.verification import target_probs, verify
from conftest import make_tiny_qwen3
from stats_util import chi_square_pvalue

V, BLOCK, SAMPLES, P_VALUE_FLOOR = 8, 4, 4000, 1e-3
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def target():
    return make_tiny_qwen3(vocab_size=V, layers=3, seed=3, logit_scale=4.0)


def exact_three_token_distribution(model, top_k: int = 0) -> dict:
    with torch.no_grad():
        def probs(seqs):
            logits = model(torch.tensor(seqs)).logits[:, -1:]
            n = len(seqs)
            return target_probs(logits, torch.ones(n), torch.full((n,), top_k))[:, 0]

        p1 = probs([PROMPT])[0]
        p2 = probs([PROMPT + [a] for a in range(V)])
        p3 = probs([PROMPT + [a, b] for a in range(V) for b in range(V)])
    return {(a, b, c): float(p1[a] * p2[a, b] * p3[a * V + b, c])
            for a in range(V) for b in range(V) for c in range(V)}


def sample_three_tokens(model, head_type, lengths, top_k=0, seed=0, fused=False, draft_vocab=None):
    drafter = build_random_drafter(model, num_layers=1, block_size=BLOCK, markov_rank=8,
                                   markov_head_type=head_type, target_layer_ids=[0, 1], seed=seed)
    with torch.no_grad():  # a peaky drafter that disagrees with the target often
        drafter.lm_head.weight.mul_(3.0)
    drafter.set_draft_vocab(draft_vocab)
    dec = ReferenceDecoder(HFTarget(model, drafter.config.target_layer_ids), DSparkProposer(drafter, fused), lengths)
    out, stats = dec.generate([PROMPT] * SAMPLES, SamplingConfig(max_new_tokens=3, temperature=1.0,
                                                                 top_k=top_k, seed=seed))
    return [tuple(o) for o in out], stats


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("length", list(range(BLOCK + 1)))
def test_fixed_draft_length_is_lossless(target, head_type, length):
    samples, stats = sample_three_tokens(target, head_type, length)
    assert all(len(s) == 3 for s in samples)
    assert chi_square_pvalue(samples, exact_three_token_distribution(target)) > P_VALUE_FLOOR
    if length:
        rate = stats.accepted_tokens / stats.draft_tokens
        assert 0.05 < rate < 0.95  # both accept and reject paths are exercised


def test_fused_kernel_sampler_is_lossless(target):
    """The fused sampling path (its PyTorch reference on CPU; test_kernels checks the Triton kernel
    against it): Gumbel-max drafts with q recomputed from the tokens for verification."""
    samples, stats = sample_three_tokens(target, "vanilla", BLOCK, fused=True)
    assert chi_square_pvalue(samples, exact_three_token_distribution(target)) > P_VALUE_FLOOR
    assert 0.05 < stats.accepted_tokens / stats.draft_tokens < 0.95


@pytest.mark.parametrize("fused", [False, True])
def test_draft_vocabulary_subset_is_lossless(target, fused):
    """Drafting from a subset of the vocabulary (q = 0 outside it) keeps the target distribution,
    and tokens outside the subset still come out (from residual sampling)."""
    subset = [5, 0, 3, 6]
    samples, stats = sample_three_tokens(target, "vanilla", BLOCK, fused=fused, draft_vocab=subset)
    assert chi_square_pvalue(samples, exact_three_token_distribution(target)) > P_VALUE_FLOOR
    assert 0.05 < stats.accepted_tokens / stats.draft_tokens < 0.95
    assert any(t not in subset for s in samples for t in s)


def test_random_per_request_lengths_with_top_k_are_lossless(target):
    gen = torch.Generator().manual_seed(7)
    lengths = lambda draft: torch.randint(0, BLOCK + 1, (draft.tokens.shape[0],), generator=gen)  # noqa: E731
    samples, _ = sample_three_tokens(target, "vanilla", lengths, top_k=3)
    exact = exact_three_token_distribution(target, top_k=3)
    assert chi_square_pvalue(samples, exact) > P_VALUE_FLOOR
    assert all(exact[s] > 0 for s in samples)  # never a token outside the target's top-k


def test_negative_control_lossy_verifier_is_detected(target, monkeypatch):
    def accept_all_drafts(draft_tokens, draft_probs, draft_lens, target_logits, *args):
        result = verify(draft_tokens, draft_probs, draft_lens, target_logits, *args)
        n = draft_lens.long()
        result.num_accepted = n
        rows = torch.arange(draft_tokens.shape[0])
        out = torch.full_like(result.output_tokens, -1)
        out[:, : draft_tokens.shape[1]] = draft_tokens
        out[rows, n] = target_logits[rows, n].argmax(-1)
        result.output_tokens = out
        return result

    monkeypatch.setattr(rd, "verify", accept_all_drafts)
    samples, _ = sample_three_tokens(target, "vanilla", BLOCK)
    assert chi_square_pvalue(samples, exact_three_token_distribution(target)) < 1e-6


@pytest.mark.parametrize("policy", ["threshold", "causal_greedy", "async_topk"])
def test_scheduled_lengths_are_lossless(target, policy):
    """Lengths chosen from the confidence head (which sees the sampled prefix) keep the target
    distribution: every policy admits d_k using only information available before d_k."""
    from dspark_vllm.scheduler import CostProfile, VerifyLengthScheduler
    from dspark_vllm.settings import settings_from_dict

    settings = settings_from_dict({"scheduler": {"policy": policy, "threshold": 0.5}})
    # 4000 requests share one step, so a cost curve that bends around that load makes the
    # policy trim some requests and not others.
    cost = CostProfile.synthetic(base_ms=20, flat_tokens=SAMPLES + 2000, slope_ms=0.01, max_tokens=40000, bucket=1)
    scheduler = VerifyLengthScheduler.from_settings(settings, block_size=BLOCK, cost=cost)
    chosen = []

    def lengths(draft):
        out = scheduler(draft)
        chosen.append(out)
        return out

    samples, _ = sample_three_tokens(target, "vanilla", lengths)
    all_lengths = torch.cat(chosen)
    assert len(set(all_lengths.tolist())) >= 2  # the policy really varies the verify length
    assert chi_square_pvalue(samples, exact_three_token_distribution(target)) > P_VALUE_FLOOR
