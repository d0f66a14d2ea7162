"""The drafter that ships in the package: loads against SmolLM2, stays lossless, and drafts
tokens the target accepts (a regression guard for the artifact, not a speed test)."""

import pytest
import torch

from dspark_vllm.checkpoint import load_checkpoint
from dspark_vllm.drafters import SMOLLM2_DRAFTER, default_drafter_path

pytestmark = pytest.mark.slow


def test_shipped_drafter_is_small_and_found():
    assert default_drafter_path() == SMOLLM2_DRAFTER
    size = sum(f.stat().st_size for f in SMOLLM2_DRAFTER.iterdir())
    assert size <= 25_000_000
    for name in ("config.json", "model.safetensors", "calibration.json", "training_log.jsonl", "TRAINING.md"):
        assert (SMOLLM2_DRAFTER / name).exists(), name


def test_shipped_drafter_accelerates_acceptance_on_held_out_prompts(smollm2):
    from dspark_vllm.prompts import encode_chat
    from dspark_vllm.reference_proposers import DSparkProposer
    from dspark_vllm.reference_decoder import ReferenceDecoder, SamplingConfig
    from dspark_vllm.hf_target import HFTarget

    model, tok = smollm2
    drafter = load_checkpoint(SMOLLM2_DRAFTER, target=model, dtype=torch.float32)
    torch.testing.assert_close(drafter.lm_head.weight, model.lm_head.weight)  # bound from the target
    prompts = [encode_chat(tok, p) for p in _held_out()]
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.0, stop_token_ids=(tok.eos_token_id,))
    spec = ReferenceDecoder(HFTarget(model, drafter.config.target_layer_ids), DSparkProposer(drafter))
    plain = ReferenceDecoder(HFTarget(model, []), None)
    out_spec, stats = spec.generate(prompts, sampling)
    out_plain, _ = plain.generate(prompts, sampling)
    assert out_spec == out_plain
    assert stats.tau > 1.4, stats.summary()  # a random drafter gives ~1.0


def _held_out() -> list[str]:
    return ["Tom has 3 boxes with 12 pencils each. He gives away 10 pencils. How many pencils does he have left?\n"
            "Please reason step by step, and put your final answer within \\boxed{}.",
            "Write a python function to count the vowels in a string."]
