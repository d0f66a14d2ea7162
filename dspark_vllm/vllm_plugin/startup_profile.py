"""``scheduler.profile_at_startup``: measure the target's step cost with vLLM before serving.

The load-aware policies need step time vs tokens for *this* engine on *this* machine. When the
option is on, the plugin (in the API-server process, before vLLM starts the engine) runs a
short-lived plain vLLM engine in a child process, times forwards of N tokens (an N-token
prefill with one output token, median of a few repeats) over a grid up to
``profile_max_tokens``, adds what the prefill leaves out (see :func:`with_logits_for_every_token`),
and caches the profile under ``$DSPARK_VLLM_CACHE/profiles`` keyed by target, vLLM version and
host; later starts reuse it. Run as a script it is that child.

The child keeps vLLM's multiprocessing executor on (as ``vllm serve`` does): on CPU that worker
process is pinned to its own cores with its own OpenMP thread count, and an in-process engine
would time a different machine (more threads, a cheaper per-token slope) than the one serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# Part of the cache key: profiles measured by an older recipe are measured again.
PROFILE_RECIPE = "prefill+logits-mp-worker-v3"


def cached_profile_path(target: str, max_tokens: int) -> Path:
    from ..pypi_models import cache_root
    from . import vllm_version

    key = json.dumps([str(Path(target).resolve()), vllm_version(), platform.node(), os.cpu_count(), max_tokens,
                      PROFILE_RECIPE])
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
    # Multiprocessing on: time the pinned worker ``vllm serve`` uses. Pickle allowed in this
    # child only, so ``apply_model`` can ship the logits timer to that worker.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    subprocess.run([sys.executable, __file__, target, str(max_tokens), str(out), dtype], check=True, env=env)
    return out


def _child(target: str, max_tokens: int, out: str, dtype: str) -> None:
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from dspark_vllm.scheduler import profile_grid, profile_step_times

    llm = LLM(target, dtype=dtype, enforce_eager=True, enable_prefix_caching=False, max_model_len=max(max_tokens + 8, 64),
              max_num_batched_tokens=max(max_tokens, 256), seed=0)
    vocab = llm.get_tokenizer().vocab_size
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def forward(n: int) -> None:
        ids = rng.integers(100, vocab - 1, size=n).tolist()
        llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)

    grid = profile_grid(max_tokens)
    prof = profile_step_times(forward, grid, repeats=3)
    # imported by its package name (this file runs as __main__), so the worker can unpickle it
    from dspark_vllm.vllm_plugin.startup_profile import LogitsTimer

    logits_ms = llm.apply_model(LogitsTimer(grid, repeats=5))[0]
    prof = with_logits_for_every_token(prof, logits_ms)
    prof.device = f"vllm {platform.machine()} {os.cpu_count()} cpus: {target} ({PROFILE_RECIPE})"
    prof.save(out)


def with_logits_for_every_token(prefill, logits_ms: list[float]):
    """The step-cost curve of a verification step from a prefill profile.

    A prefill of N tokens computes logits for its last position only; a step that verifies
    drafts (or decodes N requests) computes them for all N positions. On a CPU that difference
    is most of the marginal cost of a verified token: a small model's LM head (SmolLM2: 49,152 x 576) is a
    fifth of its weights. Left out, the served cost scale (learned on decode steps) stretched
    the 1-logit curve's slope instead, and the draft gate priced a verified token at about half
    of what it cost. ``logits_ms[i]`` is the time to compute logits for ``prefill.tokens[i]``
    rows; the result adds logits_ms[i] - logits_ms[at 1 row] to every point."""
    from dspark_vllm.scheduler import CostProfile

    if len(logits_ms) != len(prefill.tokens) or prefill.tokens[0] != 1:
        raise ValueError("logits times must cover the profile's token grid, starting at 1 token")
    one = logits_ms[0]
    return CostProfile(tokens=list(prefill.tokens), step_ms=[ms + max(lg - one, 0.0) for ms, lg in
                                                            zip(prefill.step_ms, logits_ms)],
                       device=prefill.device)


class LogitsTimer:
    """Handed to ``LLM.apply_model``: median ms of ``model.compute_logits`` on n rows of random
    hidden states for each n in ``grid`` (the LM head and vLLM's logits processor), timed by the
    same loop as the forward profile. A module-level class, so the engine can pickle it to a
    worker process."""

    def __init__(self, grid: list[int], repeats: int) -> None:
        self.grid, self.repeats = list(grid), repeats

    def __call__(self, model) -> list[float]:
        import torch

        from dspark_vllm.scheduler import profile_step_times

        weight = next(model.parameters())
        rows = {n: torch.randn(n, model.config.hidden_size, dtype=weight.dtype, device=weight.device)
                for n in self.grid}
        sync = torch.cuda.synchronize if weight.is_cuda else None
        with torch.no_grad():
            timed = profile_step_times(lambda n: model.compute_logits(rows[n]), self.grid, repeats=self.repeats,
                                       progress=False, sync=sync)
        return list(timed.step_ms)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
