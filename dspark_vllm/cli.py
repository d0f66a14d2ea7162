"""``dspark-vllm`` command line: demo and drafter utilities.

    dspark-vllm demo            speculative decoding on SmolLM2-135M-Instruct, with figures
    dspark-vllm build-drafter   write a random-weight DeepSpec drafter for any HF target
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import load_checkpoint
    from .prompts import encode_chat
    from .proposers import DSparkProposer
    from .reference_decoder import ReferenceDecoder, SamplingConfig
    from .target import HFTarget
    from .targets import smollm2_path

    torch.set_num_threads(args.threads)
    target_path = Path(args.target) if args.target else smollm2_path()
    print(f"[dspark-vllm] target: {target_path}")
    tok = AutoTokenizer.from_pretrained(target_path)
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    drafter_path = Path(args.drafter) if args.drafter else _demo_drafter_path(target_path, model)
    drafter = load_checkpoint(drafter_path, target=model, block_size=args.block_size)
    print(f"[dspark-vllm] drafter: {drafter_path} (block {drafter.block_size}, "
          f"{drafter.config.markov_head_type} head r={drafter.config.markov_rank}, "
          f"layers {drafter.config.target_layer_ids})")
    prompts = [encode_chat(tok, p) for p in DEMO_PROMPTS]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0,
                              stop_token_ids=(tok.eos_token_id,))
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
