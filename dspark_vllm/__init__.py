"""dspark-vllm: DSpark speculative decoding (parallel drafter + sequential heads + confidence-
scheduled verification) as plain PyTorch modules, with a thin vLLM plugin on top."""

__version__ = "0.1.0"
