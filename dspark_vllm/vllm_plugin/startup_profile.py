"""``scheduler.profile_at_startup``: measure the target's step cost with vLLM before serving.

The load-aware policies need step time vs tokens for *this* engine on *this* machine. When the
option is on, the plugin (in the API-server process, before vLLM starts the engine) runs a
short-lived plain vLLM engine in a child process, times forwards of N tokens (an N-token
prefill with one output token, median of a few repeats) over a grid up to
``profile_max_tokens``, and caches the profile under ``$DSPARK_VLLM_CACHE/profiles`` keyed by
target, vLLM version and host; later starts reuse it. Run as a script it is that child.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ENV_COST_PROFILE = "DSPARK_VLLM_COST_PROFILE"
GRID = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def cached_profile_path(target: str, max_tokens: int) -> Path:
    from ..targets import cache_root
    from . import vllm_version

    key = json.dumps([str(Path(target).resolve()), vllm_version(), platform.node(), os.cpu_count(), max_tokens])
    name = f"{Path(target).name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"
    return cache_root() / "profiles" / name


def ensure_startup_profile(target: str, max_tokens: int, dtype: str = "auto") -> Path:
    """Profile once per (target, vLLM, host) and return the JSON path."""
    out = cached_profile_path(target, max_tokens)
    if not out.exists():
        measure_profile(target, max_tokens, out, dtype)
    return out


def measure_profile(target: str, max_tokens: int, out: Path, dtype: str = "auto") -> Path:
    """Run the profiling child (a plain vLLM engine in its own process) and write ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, __file__, target, str(max_tokens), str(out), dtype], check=True,
                   env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    return out


def _child(target: str, max_tokens: int, out: str, dtype: str) -> None:
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from dspark_vllm.scheduler import profile_step_times

    llm = LLM(target, dtype=dtype, enforce_eager=True, enable_prefix_caching=False, max_model_len=max(max_tokens + 8, 64),
              max_num_batched_tokens=max(max_tokens, 256), seed=0)
    vocab = llm.get_tokenizer().vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def forward(n: int) -> None:
        ids = rng.integers(100, vocab - 1, size=n).tolist()
        llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)

    prof = profile_step_times(forward, [t for t in GRID if t <= max_tokens], repeats=3)
    prof.device = f"vllm {platform.machine()} {os.cpu_count()} cpus: {target}"
    prof.save(out)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
