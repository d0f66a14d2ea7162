"""Fused Markov sampling kernel vs its PyTorch reference (Triton interpreter on CPU in CI)."""

import os

import pytest
import torch

from dspark_vllm.kernels.markov_reference import gumbel_noise, markov_draft_probs, markov_sample_reference
from dspark_vllm.kernels.markov_sampling import markov_sample
from stats_util import chi_square_pvalue

# (batch, block, vocab, rank, dtype): vocabularies that are and are not tile multiples (128),
# ranks below and above the 16-wide dot minimum, all input dtypes.
SHAPES = [
    (1, 3, 1000, 8, torch.float32),
    (3, 2, 777, 16, torch.bfloat16),
    (5, 4, 300, 20, torch.float16),
    (2, 2, 512, 64, torch.float32),
    (17, 2, 129, 12, torch.bfloat16),
]


def inputs(batch, block, vocab, rank, dtype, hidden=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        base_logits=(torch.randn(batch, block, vocab, generator=g) * 2).to(dtype),
        w1=torch.randn(vocab, rank, generator=g).to(dtype),
        w2=(torch.randn(vocab, rank, generator=g) * 0.3).to(dtype),
        anchor=torch.randint(0, vocab, (batch,), generator=g),
        temperature=torch.tensor([0.0, 1.0, 0.6] * batch)[:batch],
        seeds=torch.randint(0, 2**31 - 1, (batch,), generator=g),
        hidden=torch.randn(batch, block, hidden, generator=g).to(dtype),
        conf_weight=torch.randn(hidden + rank, generator=g).to(dtype),
        conf_bias=torch.randn(1, generator=g).to(dtype),
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-B{s[1]}-V{s[2]}-r{s[3]}-{str(s[4])[6:]}")
def test_triton_matches_reference(shape):
    args = inputs(*shape)
    ref_tokens, ref_lse, ref_conf = markov_sample(**args, backend="torch")
    tri_tokens, tri_lse, tri_conf = markov_sample(**args, backend="triton")
    # Greedy and sampled rows: same tokens (same Gumbel noise from the per-request seed).
    assert torch.equal(tri_tokens, ref_tokens)
    torch.testing.assert_close(tri_lse, ref_lse, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(tri_conf, ref_conf, atol=2e-4, rtol=1e-5)


def test_without_confidence_head():
    args = inputs(2, 2, 200, 8, torch.float32)
    args.update(hidden=None, conf_weight=None, conf_bias=None)
    tokens, lse, conf = markov_sample(**args, backend="triton")
    assert conf is None and torch.equal(tokens, markov_sample(**args, backend="torch")[0])


def test_results_do_not_depend_on_batch_composition():
    args = inputs(4, 3, 300, 8, torch.float32)
    full = markov_sample(**args, backend="triton")[0]
    single = {k: (v[2:3] if k in ("base_logits", "anchor", "temperature", "seeds", "hidden") else v)
              for k, v in args.items()}
    assert torch.equal(markov_sample(**single, backend="triton")[0], full[2:3])


def test_reference_greedy_matches_heads_module():
    from dspark_vllm.heads import build_markov_head
    from dspark_vllm.sampling import sample_block

    torch.manual_seed(0)
    head = build_markov_head("vanilla", 64, 8, 16)
    base, hidden, anchor = torch.randn(3, 4, 64), torch.randn(3, 4, 16), torch.tensor([1, 2, 3])
    block = sample_block(base, hidden, anchor, torch.zeros(3), head, None, False)
    tokens, _, _ = markov_sample_reference(base, head.markov_w1.weight, head.markov_w2.weight, anchor,
                                           torch.zeros(3), torch.zeros(3, dtype=torch.long))
    assert torch.equal(tokens, block.tokens)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gumbel_sampling_follows_softmax(backend):
    """Over many seeds, the first draft token is distributed as softmax((U + W2 W1[anchor]) / T)."""
    n, vocab, t = 3000, 6, 0.8
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 1, vocab, generator=g).expand(n, 1, vocab).contiguous()
    w1, w2 = torch.randn(vocab, 4, generator=g), torch.randn(vocab, 4, generator=g)
    anchor = torch.zeros(n, dtype=torch.long)
    temp = torch.full((n,), t)
    tokens, lse, _ = markov_sample(base, w1, w2, anchor, temp, torch.arange(n), backend=backend)
    q = markov_draft_probs(base[:1], w1, w2, anchor[:1], tokens[:1], temp[:1])[0, 0]
    assert chi_square_pvalue(tokens[:, 0].tolist(), {i: float(q[i]) for i in range(vocab)}) > 1e-3
    z = base[0, 0] + w1[0] @ w2.T
    torch.testing.assert_close(lse[0, 0], torch.logsumexp(z / t, -1), atol=1e-5, rtol=1e-5)


def test_noise_is_a_pure_function_of_seed_and_position():
    a = gumbel_noise(torch.tensor([7]), 2, 50)
    assert torch.equal(a, gumbel_noise(torch.tensor([7]), 2, 50))
    assert not torch.equal(a, gumbel_noise(torch.tensor([8]), 2, 50))
    assert not torch.equal(a, gumbel_noise(torch.tensor([7]), 3, 50))


def test_fused_drafter_path_keeps_greedy_output(tiny_qwen3):
    from dspark_vllm.checkpoint import build_random_drafter
    from dspark_vllm.reference_proposers import DSparkProposer
    from dspark_vllm.reference_decoder import ReferenceDecoder, SamplingConfig
    from dspark_vllm.hf_target import HFTarget

    drafter = build_random_drafter(tiny_qwen3, num_layers=1, block_size=4, markov_rank=8)
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    runs = []
    for fused in (False, True):
        dec = ReferenceDecoder(HFTarget(tiny_qwen3, drafter.config.target_layer_ids), DSparkProposer(drafter, fused))
        runs.append(dec.generate(prompts, SamplingConfig(max_new_tokens=12))[0])
    assert runs[0] == runs[1]


def test_interpreter_env_is_what_ci_uses():
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_seeded_drafts_are_the_same_on_the_fused_and_the_loop_path(tiny_qwen3):
    """A seeded request's draft depends on its seed only: the fused kernel and the PyTorch loop
    draw the same Gumbel noise, and a different batch neighbour does not change it."""
    from dspark_vllm.checkpoint import build_random_drafter

    drafter = build_random_drafter(tiny_qwen3, num_layers=1, block_size=4, markov_rank=8)
    torch.manual_seed(3)
    cache = drafter.new_cache(2)
    drafter.add_context(cache, torch.randn(2, 6, drafter.context_width), torch.tensor([6, 5]))
    anchor, temp = torch.tensor([5, 9]), torch.tensor([1.0, 0.8])
    loop = drafter.propose(anchor, cache, temp, fused=False, seeds=torch.tensor([11, 12])).tokens
    fused = drafter.propose(anchor, cache, temp, fused=True, seeds=torch.tensor([11, 12])).tokens
    other_neighbour = drafter.propose(anchor, cache, temp, fused=False, seeds=torch.tensor([11, 99])).tokens
    assert torch.equal(loop, fused)
    assert torch.equal(loop[0], other_neighbour[0])
    assert not torch.equal(loop, drafter.propose(anchor, cache, temp, fused=False, seeds=torch.tensor([13, 14])).tokens)
