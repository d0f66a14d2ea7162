"""Temperature 0: speculative output == the target's own greedy output, token for token."""

import pytest
import torch

from dspark_vllm.checkpoint import build_random_drafter
from dspark_vllm.prompts import encode_chat
from dspark_vllm.reference_proposers import DSparkProposer, OracleProposer
from dspark_vllm.reference_decoder import ReferenceDecoder, SamplingConfig
from dspark_vllm.hf_target import HFTarget

TINY_PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18]]


def hf_greedy(model, prompt, max_new_tokens, eos=None):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
    return out[0, len(prompt):].tolist()


def run(model, proposer, prompts, max_new_tokens, layer_ids=(), stop=(), lengths=None):
    dec = ReferenceDecoder(HFTarget(model, list(layer_ids)), proposer, lengths)
    return dec.generate(prompts, SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop)))


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_qwen3_random_drafter_matches_greedy(tiny_qwen3, head_type, batch):
    drafter = build_random_drafter(tiny_qwen3, num_layers=1, block_size=4, markov_rank=8, markov_head_type=head_type)
    prompts = TINY_PROMPTS[:batch]
    out, stats = run(tiny_qwen3, DSparkProposer(drafter), prompts, 24, drafter.config.target_layer_ids)
    assert out == [hf_greedy(tiny_qwen3, p, 24) for p in prompts]
    assert stats.rounds >= 23 // 5 and stats.tau >= 1.0


@pytest.mark.parametrize("depth", [1, 2])
def test_shallow_drafts_keep_greedy_output(tiny_qwen3, depth):
    """Drafting only the first D block positions (what the draft gate does under load) changes
    how many tokens a round can gain, never which tokens come out."""
    drafter = build_random_drafter(tiny_qwen3, num_layers=1, block_size=4, markov_rank=8)
    proposer = DSparkProposer(drafter, depth=depth)
    assert proposer.block_size == depth
    out, stats = run(tiny_qwen3, proposer, TINY_PROMPTS, 24, drafter.config.target_layer_ids)
    assert out == [hf_greedy(tiny_qwen3, p, 24) for p in TINY_PROMPTS]
    assert 1.0 <= stats.tau <= depth + 1
    with pytest.raises(ValueError, match="draft depth"):
        DSparkProposer(drafter, depth=5)


def test_tiny_qwen3_oracle_accepts_everything_and_corruption_cuts_there(tiny_qwen3):
    expected = [hf_greedy(tiny_qwen3, p, 40) for p in TINY_PROMPTS]
    # the oracle knows a block past max length: DeepSpec's loop may run a round from the last token
    seqs = [p + hf_greedy(tiny_qwen3, p, 45) + [0] * 8 for p in TINY_PROMPTS]
    out, stats = run(tiny_qwen3, OracleProposer(seqs, 4, 128), TINY_PROMPTS, 40)
    assert out == expected
    assert stats.conditional_accept_rate() == [1.0] * 4
    assert stats.tau == pytest.approx(5.0, abs=0.5)  # B accepted + bonus, except the last rounds

    out, stats = run(tiny_qwen3, OracleProposer(seqs, 4, 128, corrupt_position=2), TINY_PROMPTS, 40)
    assert out == expected
    assert stats.accept_rate()[:2] == [1.0, 1.0] and stats.accept_rate()[2] == 0.0


def test_variable_lengths_per_request(tiny_qwen3):
    expected = [hf_greedy(tiny_qwen3, p, 20) for p in TINY_PROMPTS]
    seqs = [p + e + [0] * 8 for p, e in zip(TINY_PROMPTS, expected)]
    lengths = lambda draft: torch.tensor([0, 2, 4])  # noqa: E731
    out, stats = run(tiny_qwen3, OracleProposer(seqs, 4, 128), TINY_PROMPTS, 20, lengths=lengths)
    assert out == expected
    assert stats.positions.verified[0] > 0 and stats.positions.verified[2] < stats.positions.verified[0]


def test_stop_token_ends_request(tiny_qwen3):
    full = hf_greedy(tiny_qwen3, TINY_PROMPTS[0], 30)
    stop = full[6]
    drafter = build_random_drafter(tiny_qwen3, num_layers=1, block_size=4, markov_rank=8)
    out, _ = run(tiny_qwen3, DSparkProposer(drafter), TINY_PROMPTS[:1], 30, drafter.config.target_layer_ids, [stop])
    assert out[0] == full[: full.index(stop) + 1]


def test_plain_decoding_without_proposer(tiny_qwen3):
    out, stats = run(tiny_qwen3, None, TINY_PROMPTS, 12)
    assert out == [hf_greedy(tiny_qwen3, p, 12) for p in TINY_PROMPTS]
    assert stats.tau == 1.0


@pytest.mark.slow
def test_smollm2_random_and_oracle_drafters_match_greedy(smollm2):
    model, tok = smollm2
    prompts = [encode_chat(tok, "What is the capital of France?"),
               encode_chat(tok, "Write a Python function that adds two numbers.")]
    eos = tok.eos_token_id
    expected = [hf_greedy(model, p, 32, eos) for p in prompts]
    drafter = build_random_drafter(model, num_layers=1, block_size=7, markov_rank=32)
    out, _ = run(model, DSparkProposer(drafter), prompts, 32, drafter.config.target_layer_ids, [eos])
    assert out == expected
    seqs = [p + e + [0] * 8 for p, e in zip(prompts, expected)]
    out, stats = run(model, OracleProposer(seqs, 7, model.config.vocab_size), prompts, 32, (), [eos])
    assert out == expected
    assert stats.accept_rate()[0] == 1.0 and stats.tau > 4.0


@pytest.mark.parametrize("policy", ["fixed", "threshold", "causal_greedy", "async_topk"])
def test_every_policy_keeps_greedy_output(tiny_qwen3, policy):
    from dspark_vllm.scheduler import CalibrationRecorder, VerifyLengthScheduler
    from dspark_vllm.settings import settings_from_dict

    expected = [hf_greedy(tiny_qwen3, p, 20) for p in TINY_PROMPTS]
    drafter = build_random_drafter(tiny_qwen3, num_layers=1, block_size=4, markov_rank=8)
    sched = VerifyLengthScheduler.from_settings(
        settings_from_dict({"scheduler": {"policy": policy, "threshold": 0.5}}), drafter.block_size)
    recorder = CalibrationRecorder()
    dec = ReferenceDecoder(HFTarget(tiny_qwen3, drafter.config.target_layer_ids), DSparkProposer(drafter),
                           sched, observer=recorder)
    out, stats = dec.generate(TINY_PROMPTS, SamplingConfig(max_new_tokens=20))
    assert out == expected
    records = recorder.records()
    assert records.logits.shape[1] == 4 and len(records.verified) == stats.rounds
    assert (records.accepted <= records.verified).all()


def test_a_round_ending_at_max_length_is_followed_by_one_more_as_in_deepspec(tiny_qwen3):
    """DeepSpec's loop runs while the anchor sits before max length: with 7 new tokens and an
    oracle for 8, round 1 commits 6 (5 drafts + bonus) = 7 tokens, and a second round runs from
    the 7th, accepting the one draft the oracle still knows. DeepSpec's figures: tau (6 + 2) / 2
    = 4.0, accept_rate [1.0, 0.5, 0.5, 0.5, 0.5]; the output is still the 7 greedy tokens."""
    prompt = TINY_PROMPTS[0]
    ref = hf_greedy(tiny_qwen3, prompt, 8)
    wrong = next(t for t in range(128) if t not in ref)  # pads the oracle past its reference
    oracle = OracleProposer([prompt + ref + [wrong] * 8], 5, 128)
    out, stats = run(tiny_qwen3, oracle, [prompt], 7)
    assert out == [ref[:7]]
    assert stats.rounds == 2 and stats.tau == 4.0
    assert stats.accept_rate() == [1.0, 0.5, 0.5, 0.5, 0.5]


def test_a_stop_token_among_accepted_drafts_cuts_the_proposal_as_in_deepspec(tiny_qwen3):
    """An accepted draft that is a stop token ends the request there: no bonus token, and the
    round counts as proposing only up to it (DeepSpec's effective_proposal_length). Round 1: 5
    drafts + bonus; round 2 stops at its 4th draft: drafts per round (5 + 4) / 2 = 4.5, tau
    (6 + 4) / 2 = 5.0."""
    for prompt in ([1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13], [21, 22], [31, 32, 33, 34]):
        ref = hf_greedy(tiny_qwen3, prompt, 12)
        if ref[10] not in ref[:10]:
            break
    else:
        pytest.skip("no prompt whose 11th greedy token is new")  # the tiny model is fixed: never reached
    stop = ref[10]
    oracle = OracleProposer([prompt + ref + [0] * 8], 5, 128)
    out, stats = run(tiny_qwen3, oracle, [prompt], 30, stop=[stop])
    assert out == [ref[:11]]
    assert stats.rounds == 2 and stats.draft_tokens / stats.rounds == 4.5 and stats.tau == 5.0
