"""Run every sampling-parameter case of the matrix in one engine and print the results as JSON.

Usage: python tests/sampling_matrix_engine.py '{"target": ..., "drafter": ... or null}'
Each case is one ``generate`` call: the case's request followed by plain greedy requests, so
every parameter is verified inside a mixed batch. A case vLLM refuses is recorded with its error
and the next case runs on the same engine (it must still serve).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

QUESTION = "Write a short poem about the sea."
PLAIN = ["What is the capital of France?", "List three prime numbers.", "Name a famous painter."]
GREEDY = {"temperature": 0.0}
CASES = {  # name -> SamplingParams keywords (besides max_tokens)
    "greedy": GREEDY,
    "top_p": {"temperature": 0.8, "top_p": 0.5},
    "top_k": {"temperature": 0.8, "top_k": 5},
    "top_k + top_p": {"temperature": 0.8, "top_k": 5, "top_p": 0.5},
    "top_k=1 at T=1": {"temperature": 1.0, "top_k": 1},
    "min_p": {"temperature": 1.0, "min_p": 0.1},
    "penalties, greedy": {**GREEDY, "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    "penalties, T=0.8": {"temperature": 0.8, "presence_penalty": 0.5, "repetition_penalty": 1.2},
    "logit_bias": {**GREEDY, "logit_bias": {28: -100.0}},
    "min_tokens": {**GREEDY, "min_tokens": 20},
    "bad_words": {**GREEDY, "bad_words": ["sea"]},
    "stop": {**GREEDY, "stop": ["."]},
    "logprobs": {**GREEDY, "logprobs": 3},
    "n=2": {"temperature": 0.8, "n": 2},
    "structured output": {**GREEDY, "structured_outputs": {"choice": ["calm", "stormy", "endless"]}},
    "seed": {"temperature": 1.0, "seed": 7},
}


def main() -> None:
    args = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kwargs = {"speculative_config": {"method": "dspark", "model": args["drafter"]}} if args.get("drafter") else {}
    llm = LLM(args["target"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0, max_num_seqs=8,
              disable_log_stats=False,
              **kwargs)
    tok = llm.get_tokenizer()
    chat = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in [QUESTION, *PLAIN]]
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    results = {}
    for name, case in CASES.items():
        case = dict(case)
        if "structured_outputs" in case:
            case["structured_outputs"] = StructuredOutputsParams(**case["structured_outputs"])
        try:
            outs = llm.generate(chat, [SamplingParams(max_tokens=24, **case), plain, plain, plain], use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - a refused case is a result
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        first = outs[0].outputs
        logprobs = [[lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)] for o in first] if first[0].logprobs else None
        results[name] = {"case": [list(o.token_ids) for o in first], "text": [o.text for o in first],
                         "plain": [list(o.outputs[0].token_ids) for o in outs[1:]], "logprobs": logprobs}
    alive = llm.generate(chat[1:2], plain, use_tqdm=False)[0].outputs[0].token_ids
    print("RESULT " + json.dumps({"cases": results, "alive": list(alive),
                                  "drafts": next((m.value for m in llm.get_metrics()
                                                  if m.name == "vllm:spec_decode_num_drafts"), 0)}))


if __name__ == "__main__":
    main()
