"""The sampling-fidelity bench's scoring: -log p of tokens 2..N under the target, bootstrap interval."""

import torch

from dspark_vllm.bench.sampling_fidelity import bootstrap_interval, mean_nll


def test_mean_nll_scores_tokens_after_the_first_under_the_target(tiny_qwen3):
    prompt, samples = [1, 2, 3], [[4, 5, 6], [7, 8, 9]]
    got = mean_nll(tiny_qwen3, prompt, samples)
    with torch.no_grad():
        logp = torch.log_softmax(tiny_qwen3(torch.tensor([prompt + samples[0]])).logits[0], -1)
    want = -(logp[3, 5] + logp[4, 6]) / 2  # tokens 2 and 3 of the first sample
    assert torch.allclose(got[0], want, atol=1e-5) and got.shape == (2,)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_samples():
    gen = torch.Generator().manual_seed(0)
    few = torch.randn(10, generator=gen) + 3
    many = torch.randn(1000, generator=gen) + 3
    low, high = bootstrap_interval(few)
    assert low < float(few.mean()) < high
    low_m, high_m = bootstrap_interval(many)
    assert high_m - low_m < (high - low) / 4 and low_m < 3 < high_m
