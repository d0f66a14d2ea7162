"""The README's main job: serve SmolLM2-135M-Instruct with DSpark through `vllm serve` and show it.

Starts an OpenAI-compatible vLLM server without speculation, sends the demo prompts, stops it;
starts one with ``--speculative-config '{"method": "dspark", "model": <drafter>}'``, sends the
same prompts; prints the answers, the mean acceptance length from the server's own metrics,
tokens/s of both and the speed-up, and checks the greedy answers are identical.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

DEMO_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nPlease reason step by step, and put your "
    "final answer within \\boxed{}.",
    "Write a python function to find the first repeated character in a given string.",
    "What is the capital of France? Answer in one sentence.",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?"
    "\nPlease reason step by step, and put your final answer within \\boxed{}.",
]


def _ask_all(port: int, prompts: list[str], max_tokens: int) -> tuple[list[str], int, float]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
    client.chat.completions.create(model="target", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                   temperature=0)  # warm-up
    answers, tokens = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        r = client.chat.completions.create(model="target", messages=[{"role": "user", "content": p}],
                                           temperature=0, max_tokens=max_tokens)
        answers.append(r.choices[0].message.content)
        tokens += r.usage.completion_tokens
    return answers, tokens, time.perf_counter() - t0


def run_demo(drafter: str | None = None, settings: str | None = None, max_tokens: int = 128) -> int:
    import os

    from .bench.serving import Server
    from .drafters import default_drafter_path
    from .settings import CONFIGS_DIR
    from .pypi_models import smollm2_path

    target = str(smollm2_path())
    drafter_path = Path(drafter) if drafter else default_drafter_path()
    settings_path = Path(settings) if settings else CONFIGS_DIR / "llama-smollm2.yaml"
    logs = Path(tempfile.mkdtemp(prefix="dspark-demo-"))
    print(f"[demo] target : {target}\n[demo] drafter: {drafter_path}\n[demo] settings: {settings_path}\n"
          f"[demo] server logs: {logs}")
    results = {}
    for name, spec in (("no speculation", None), ("DSpark", {"method": "dspark", "model": str(drafter_path)})):
        print(f"[demo] starting vllm serve ({name}) ...", flush=True)
        server = Server(target, spec, {"DSPARK_VLLM_CONFIG": str(settings_path)}, 4,
                        logs / f"{'dspark' if spec else 'plain'}.log")
        try:
            server.wait_healthy()
            before = server.metrics()
            answers, tokens, seconds = _ask_all(server.port, DEMO_PROMPTS, max_tokens)
            after = server.metrics()
        finally:
            server.stop()
        results[name] = (answers, tokens, seconds, before, after)
        print(f"[demo] {name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", flush=True)
    plain, spec = results["no speculation"], results["DSpark"]
    for prompt, answer, ref in zip(DEMO_PROMPTS, spec[0], plain[0]):
        print(f"\n>>> {prompt}\n{answer.strip()}\n    [identical to no speculation: {answer == ref}]")
    drafts = _delta(spec, "vllm:spec_decode_num_drafts_total")
    accepted = _delta(spec, "vllm:spec_decode_num_accepted_tokens_total")
    drafted = _delta(spec, "vllm:spec_decode_num_draft_tokens_total")
    tau = 1 + accepted / drafts if drafts else float("nan")
    speedup = (spec[1] / spec[2]) / (plain[1] / plain[2])
    print(f"\n[demo] mean acceptance length (accepted drafts + 1 per verification) = {tau:.2f} "
          f"({int(accepted)} of {int(drafted)} verified drafts accepted)")
    print(f"[demo] tokens/s: DSpark {spec[1] / spec[2]:.1f} vs no speculation {plain[1] / plain[2]:.1f} "
          f"-> speed-up {speedup:.2f}x")
    same = spec[0] == plain[0]
    print(f"[demo] greedy answers identical to no speculation: {same}")
    if os.environ.get("DSPARK_DEMO_STRICT", "1") == "1" and not same:
        return 1
    return 0


def _delta(result, key: str) -> float:
    before, after = result[3], result[4]
    return after.get(key, 0.0) - before.get(key, 0.0)
