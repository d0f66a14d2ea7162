"""``dspark-vllm`` command line: demo and drafter utilities.

    dspark-vllm demo              speculative decoding on SmolLM2-135M-Instruct, with figures
    dspark-vllm build-drafter     write a random-weight DeepSpec drafter for any HF target
    dspark-vllm calibrate         fit STS temperatures on held-out prompts (+ reliability PNG)
    dspark-vllm compare-policies  run every verify-length policy on the same prompts
    dspark-vllm bench scheduler   policy latency and expected throughput vs load
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the sum of a list of numbers.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]


def _demo_drafter_path(target_path: Path, target_model) -> Path:
    """The demo drafter, built once by the project and stored in DeepSpec format."""
    from .checkpoint import build_random_drafter, save_checkpoint
    from .targets import cache_root

    out = cache_root() / "drafters" / f"{target_path.name}-dspark-random-b7"
    if not (out / "model.safetensors").exists():
        drafter = build_random_drafter(target_model, num_layers=1, block_size=7, markov_rank=64, seed=0)
        save_checkpoint(drafter, out)
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from .prompts import encode_chat
    from .proposers import DSparkProposer
    from .reference_decoder import ReferenceDecoder
    from .target import HFTarget

    tok, model, drafter, drafter_path = _load_pair(args)
    print(f"[dspark-vllm] target: {model.name_or_path}")
    print(f"[dspark-vllm] drafter: {drafter_path} (block {drafter.block_size}, "
          f"{drafter.config.markov_head_type} head r={drafter.config.markov_rank}, "
          f"layers {drafter.config.target_layer_ids})")
    prompts = [encode_chat(tok, p) for p in DEMO_PROMPTS]
    sampling = _sampling(args, tok, temperature=0.0)
    spec = ReferenceDecoder(HFTarget(model, drafter.config.target_layer_ids), DSparkProposer(drafter))
    plain = ReferenceDecoder(HFTarget(model, []), None)
    total_spec = total_plain = None
    for text, ids in zip(DEMO_PROMPTS, prompts):
        out_spec, st_spec = spec.generate([ids], sampling)
        out_plain, st_plain = plain.generate([ids], sampling)
        same = out_spec == out_plain
        print(f"\n>>> {text}\n{tok.decode(out_spec[0], skip_special_tokens=True).strip()}")
        print(f"    DSpark: {st_spec.summary()}\n    plain : tok/s={st_plain.tokens_per_second:.2f}  "
              f"identical to plain greedy: {same}")
        if not same:
            print("ERROR: speculative output differs from the target's greedy output", file=sys.stderr)
            return 1
        if total_spec is None:
            total_spec, total_plain = st_spec, st_plain
        else:
            total_spec.merge(st_spec)
            total_plain.merge(st_plain)
    assert total_spec is not None and total_plain is not None
    print(f"\n[dspark-vllm] acceptance length tau = {total_spec.tau:.3f} (DeepSpec definition, bonus included)")
    print(f"[dspark-vllm] tokens/s: DSpark {total_spec.tokens_per_second:.2f} vs plain "
          f"{total_plain.tokens_per_second:.2f} -> speed-up {total_spec.tokens_per_second / total_plain.tokens_per_second:.2f}x")
    if not args.drafter:
        print("[dspark-vllm] note: the default drafter has random weights (no trained drafter ships yet), "
              "so tau ~ 1 and speculation costs time; outputs stay identical.")
    return 0


def _load_pair(args: argparse.Namespace):
    """(tokenizer, target model, drafter, drafter folder) from --target / --drafter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import load_checkpoint
    from .targets import smollm2_path

    torch.set_num_threads(args.threads)
    target_path = Path(args.target) if args.target else smollm2_path()
    tok = AutoTokenizer.from_pretrained(target_path)
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    drafter_path = Path(args.drafter) if args.drafter else _demo_drafter_path(target_path, model)
    drafter = load_checkpoint(drafter_path, target=model, block_size=getattr(args, "block_size", None))
    return tok, model, drafter, drafter_path


def _sampling(args: argparse.Namespace, tok, temperature: float | None = None):
    from .reference_decoder import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature if temperature is None else temperature,
                          stop_token_ids=(tok.eos_token_id,))


def _dataset_prompts(args: argparse.Namespace, tok) -> list[list[int]]:
    from .prompts import encode_chat, load_prompts

    return [encode_chat(tok, p) for p in load_prompts(args.dataset, args.limit, args.offset)]


def cmd_calibrate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .proposers import DSparkProposer
    from .reference_decoder import ReferenceDecoder
    from .scheduler import CalibrationRecorder, STSCalibrator, reliability_diagram
    from .target import HFTarget

    tok, model, drafter, drafter_path = _load_pair(args)
    recorder = CalibrationRecorder()
    dec = ReferenceDecoder(HFTarget(model, drafter.config.target_layer_ids), DSparkProposer(drafter),
                           observer=recorder)
    sampling = _sampling(args, tok)
    for ids in tqdm(_dataset_prompts(args, tok), desc="collecting verification records", unit="prompt"):
        dec.generate([ids], sampling)
    records = recorder.records()
    cal = STSCalibrator.fit(records)
    out = Path(args.out) if args.out else drafter_path / "calibration.json"
    cal.save(out)
    print(f"STS temperatures: {[round(t, 3) for t in cal.temperatures]} -> {out}")
    print(f"{'pos':>3} {'n':>6} {'ECE raw':>8} {'ECE STS':>8} {'AUROC':>6} {'Brier raw':>9} {'Brier STS':>9}")
    for b, a in zip(cal.metrics["before"], cal.metrics["after"]):
        print(f"{b['position']:>3} {b['count']:>6} {b['ece']:>8.4f} {a['ece']:>8.4f} {a['auroc']:>6.3f} "
              f"{b['brier']:>9.4f} {a['brier']:>9.4f}")
    if args.plot:
        reliability_diagram(records, {"raw": STSCalibrator.identity(len(cal.temperatures)), "STS": cal}, args.plot)
        print(f"reliability diagram: {args.plot}")
    return 0


def cmd_compare_policies(args: argparse.Namespace) -> int:
    from .proposers import DSparkProposer
    from .reference_decoder import ReferenceDecoder
    from .scheduler import VerifyLengthScheduler
    from .settings import load_settings, settings_from_dict
    from .target import HFTarget

    tok, model, drafter, drafter_path = _load_pair(args)
    prompts = _dataset_prompts(args, tok)
    base = load_settings(args.settings).model_dump() if args.settings else {}
    sampling = _sampling(args, tok)
    print(f"{len(prompts)} prompts from {args.dataset}, drafter {drafter_path}")
    reference = None
    for policy in ("fixed", "threshold", "causal_greedy", "async_topk"):
        cfg = base | {"scheduler": base.get("scheduler", {}) | {"policy": policy,
                                                                "threshold": args.threshold}}
        sched = VerifyLengthScheduler.from_settings(settings_from_dict(cfg, args.settings or "<dict>"),
                                                    drafter.block_size, drafter_path)
        dec = ReferenceDecoder(HFTarget(model, drafter.config.target_layer_ids), DSparkProposer(drafter), sched)
        outs, stats = dec.generate(prompts, sampling)
        same = "" if reference is None else f" identical={outs == reference}"
        reference = reference or outs
        print(f"{policy:>14}: {stats.summary()}{same}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure the target's verification step time vs tokens (on this machine) into a JSON profile."""
    import torch
    from transformers import AutoModelForCausalLM

    from .scheduler import profile_step_times
    from .targets import smollm2_path

    torch.set_num_threads(args.threads)
    target_path = Path(args.target) if args.target else smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    context = torch.randint(0, model.config.vocab_size, (1, args.context))
    with torch.no_grad():
        prefix = model(context, use_cache=True).past_key_values

    def forward(num_tokens: int) -> None:
        ids = torch.randint(0, model.config.vocab_size, (1, num_tokens))
        with torch.no_grad():
            model(ids, past_key_values=prefix, use_cache=True)
        prefix.crop(-num_tokens)  # back to the fixed context for the next call

    grid = [t for t in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256) if t <= args.max_tokens]
    prof = profile_step_times(forward, grid, repeats=args.repeats)
    prof.device = f"cpu x{args.threads} threads, context {args.context}"
    prof.save(args.out)
    for t, ms in zip(prof.tokens, prof.step_ms):
        print(f"{t:>5} tokens: {ms:8.2f} ms")
    print(f"cost profile written to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import scheduler

    return scheduler.main(args.rest)


def cmd_build_drafter(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from .checkpoint import build_random_drafter, save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32)
    ids = [int(i) for i in args.target_layer_ids.split(",")] if args.target_layer_ids else None
    drafter = build_random_drafter(model, num_layers=args.num_layers, block_size=args.block_size,
                                   markov_rank=args.markov_rank, markov_head_type=args.head_type,
                                   target_layer_ids=ids, seed=args.seed)
    print(save_checkpoint(drafter, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark-vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="speculative decoding on SmolLM2-135M-Instruct with figures")
    demo.add_argument("--target", help="HF target folder (default: SmolLM2-135M-Instruct from PyPI)")
    demo.add_argument("--drafter", help="DeepSpec drafter folder (default: project-built)")
    demo.add_argument("--block-size", type=int, default=None)
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--threads", type=int, default=1)
    demo.set_defaults(func=cmd_demo)
    build = sub.add_parser("build-drafter", help="write a random-weight DeepSpec drafter for a target")
    build.add_argument("--target", required=True)
    build.add_argument("--out", required=True)
    build.add_argument("--num-layers", type=int, default=1)
    build.add_argument("--block-size", type=int, default=7)
    build.add_argument("--markov-rank", type=int, default=64)
    build.add_argument("--head-type", default="vanilla", choices=["vanilla", "gated", "rnn"])
    build.add_argument("--target-layer-ids", default=None, help="comma-separated, e.g. 1,8,14")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=cmd_build_drafter)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", help="HF target folder (default: SmolLM2-135M-Instruct)")
        p.add_argument("--drafter", help="DeepSpec drafter folder (default: the demo drafter)")
        p.add_argument("--dataset", required=True, help="DeepSpec JSONL prompts")
        p.add_argument("--limit", type=int, default=20)
        p.add_argument("--offset", type=int, default=0, help="skip this many prompts (held-out split)")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--threads", type=int, default=1)

    cal = sub.add_parser("calibrate", help="fit STS temperatures for the confidence head")
    common(cal)
    cal.add_argument("--out", help="default: calibration.json in the drafter folder")
    cal.add_argument("--plot", default="reliability.png")
    cal.set_defaults(func=cmd_calibrate)
    cmp_ = sub.add_parser("compare-policies", help="every verify-length policy on the same prompts")
    common(cmp_)
    cmp_.add_argument("--settings", help="YAML settings to start from (configs/*.yaml)")
    cmp_.add_argument("--threshold", type=float, default=0.5)
    cmp_.set_defaults(func=cmd_compare_policies)
    prof = sub.add_parser("profile", help="measure the target's step cost vs tokens into a JSON profile")
    prof.add_argument("--target", help="HF target folder (default: SmolLM2-135M-Instruct)")
    prof.add_argument("--out", default="cost_profile.json")
    prof.add_argument("--context", type=int, default=256)
    prof.add_argument("--max-tokens", type=int, default=128)
    prof.add_argument("--repeats", type=int, default=3)
    prof.add_argument("--threads", type=int, default=1)
    prof.set_defaults(func=cmd_profile)
    bench = sub.add_parser("bench", help="benchmarks: `bench scheduler [--plot PNG]`")
    bench.add_argument("which", choices=["scheduler"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
