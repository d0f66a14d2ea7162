"""Child process for :func:`dspark_vllm.training.data.regenerate`: greedy answers from vLLM.

Usage: python vllm_generate.py PAYLOAD.json  (writes PAYLOAD.out.json)."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def main() -> None:
    payload = Path(sys.argv[1])
    args = json.loads(payload.read_text())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(p) for p in args["prompts"]) + args["max_tokens"]
    llm = LLM(args["target"], dtype="float32", enforce_eager=True, max_model_len=max(longest, 256),
              max_num_seqs=64, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"])
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in args["prompts"]], params, use_tqdm=True)
    payload.with_suffix(".out.json").write_text(json.dumps([list(r.outputs[0].token_ids) for r in results]))


if __name__ == "__main__":
    main()
