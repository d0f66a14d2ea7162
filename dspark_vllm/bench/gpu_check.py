"""The GPU path in one script: kernel correctness, kernel speed, and the drafter step at real sizes.

    python -m dspark_vllm.bench.gpu_check            # on a CUDA machine: real sizes
    python -m dspark_vllm.bench.gpu_check --small    # anywhere (CPU: Triton under TRITON_INTERPRET=1)

Needs only torch, triton and transformers (no vLLM, nothing downloaded). Three sections:

1. **Kernel correctness**: the fused Markov-sampling kernel against its PyTorch reference for
   every combination of dtype (fp32, bf16), vocabulary (151,936 and 262,144), rank (256, 512) and
   batch (1, 8, 64, 256), block 7, mixed greedy/sampled rows: tokens identical (greedy and seeded
   Gumbel sampling), lse and confidence logits within tolerance. Exit status 1 if any fails.
2. **Kernel speed**: kernel vs reference time and the kernel's share of peak HBM bandwidth (bytes:
   W2 and the base logits once per position, as ``bench/markov_kernel.py`` counts them).
3. **Drafter step at Qwen3-8B sizes** (random weights, bf16: hidden 4096, vocab 151,936, 5 fused
   target layers, rank 256, block 7, ``--draft-layers`` draft layers, a paged context of
   ``--context`` tokens per request): context ingestion of one decode step (2 tokens per
   request), block forward, Markov sampling with the confidence head, the whole step and its
   host syncs, per batch size; beside it, for batches 1 and 64, a Qwen3-8B-shaped target forward
   verifying 8 tokens per request over the same context, so the drafter's share of an engine
   step is a ratio from one run.

4. **Routed MoE (DeepSeek-V4-Flash sizes)**: the grouped expert kernel (``kernels/moe_grouped.py``)
   with MXFP4 and bf16 experts (256 experts, hidden 4096, intermediate 2048, top-6) against the
   dense PyTorch path, per token count: max relative error (fails above 3e-2) and both times.

``--small`` shrinks every size so the script runs on a CPU in a few minutes (correctness of the
same code paths; the timings then mean nothing). ``--json PATH`` writes every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..sampling import SEED_LIMIT

FULL = dict(vocabs=(151936, 262144), ranks=(256, 512), batches=(1, 8, 64, 256), block=7, hidden=4096,
            step_batches=(1, 4, 16, 64, 256), target_batches=(1, 64), target_layers=36, context=1024,
            heads=32, kv_heads=8, head_dim=128, intermediate=12288,
            moe=dict(experts=256, hidden=4096, inter=2048, top_k=6, tokens=(8, 64, 512)))
SMALL = dict(vocabs=(1000, 777), ranks=(16, 64), batches=(1, 17), block=3, hidden=64,
             step_batches=(1, 4), target_batches=(1, 4), target_layers=6, context=48,
             heads=4, kv_heads=2, head_dim=16, intermediate=128,
             moe=dict(experts=8, hidden=64, inter=32, top_k=2, tokens=(5, 33)))
MOE_TOLERANCE = 3e-2
PAGE = 16  # KV block size of the paged draft context in section 3


def timed_ms(fn, device: torch.device, repeats: int = 10) -> float:
    """Median wall time of fn() in ms, the device drained before and after each call."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(samples))


def kernel_inputs(n: int, block: int, vocab: int, rank: int, dtype: torch.dtype, hidden: int,
                  device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return dict(base_logits=rand(n, block, vocab, scale=2.0), w1=rand(vocab, rank), w2=rand(vocab, rank, scale=0.05),
                anchor=torch.randint(0, vocab, (n,), generator=g).to(device),
                temperature=torch.tensor([0.0, 1.0, 0.6] * n)[:n].to(device),
                seeds=torch.randint(0, SEED_LIMIT, (n,), generator=g).to(device),
                hidden=rand(n, block, hidden), conf_weight=rand(hidden + rank), conf_bias=rand(1))


def check_kernels(sizes: dict, device: torch.device) -> list[dict]:
    from ..kernels.markov_sampling import markov_sample

    rows = []
    print("\n1. fused Markov sampling vs PyTorch reference")
    print(f"{'dtype':>9} {'vocab':>7} {'rank':>5} {'batch':>6} {'tokens ==':>10} {'lse err':>9} {'conf err':>9}  result")
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in sizes["vocabs"]:
            for rank in sizes["ranks"]:
                for n in sizes["batches"]:
                    args = kernel_inputs(n, sizes["block"], vocab, rank, dtype, sizes["hidden"], device)
                    ref = markov_sample(**args, backend="torch")
                    tri = markov_sample(**args, backend="triton")
                    same = bool(torch.equal(ref[0], tri[0]))
                    lse = float((ref[1] - tri[1]).abs().max())
                    conf = float((ref[2] - tri[2]).abs().max())
                    ok = same and lse <= 2e-3 and conf <= 2e-3
                    rows.append(dict(dtype=str(dtype)[6:], vocab=vocab, rank=rank, batch=n, tokens_equal=same,
                                     lse_err=lse, conf_err=conf, ok=ok))
                    print(f"{str(dtype)[6:]:>9} {vocab:>7} {rank:>5} {n:>6} {str(same):>10} {lse:>9.1e} {conf:>9.1e}  "
                          f"{'PASS' if ok else 'FAIL'}")
    return rows


def time_kernels(sizes: dict, device: torch.device) -> list[dict]:
    from ..kernels.markov_sampling import markov_sample
    from .markov_kernel import kernel_bytes, peak_bandwidth

    vocab, rank, block, hidden = sizes["vocabs"][0], sizes["ranks"][0], sizes["block"], sizes["hidden"]
    dtype = torch.bfloat16
    peak = peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    print(f"\n2. kernel speed (V={vocab}, r={rank}, B={block}, bf16, greedy)")
    print(f"{'batch':>6} {'kernel ms':>10} {'torch ms':>10} {'speed-up':>9} {'GB/s':>8} {'% peak':>7}")
    rows = []
    for n in sizes["batches"]:
        args = kernel_inputs(n, block, vocab, rank, dtype, hidden, device)
        args["temperature"] = torch.zeros(n, device=device)
        kern = timed_ms(lambda: markov_sample(**args, backend="triton"), device)
        ref = timed_ms(lambda: markov_sample(**args, backend="torch"), device)
        nbytes = kernel_bytes(n, block, vocab, rank, hidden)
        gbs = nbytes / (kern * 1e-3) / 1e9
        pct = 100 * gbs * 1e9 / peak if peak else None
        rows.append(dict(batch=n, kernel_ms=kern, torch_ms=ref, speedup=ref / kern, gb_s=gbs, pct_peak=pct))
        print(f"{n:>6} {kern:>10.3f} {ref:>10.3f} {ref / kern:>8.2f}x {gbs:>8.0f} "
              f"{(f'{pct:6.1f}%' if pct is not None else '    n/a'):>7}")
    return rows


@dataclass
class StepSetup:
    drafter: object
    pool: object
    table: torch.Tensor
    ends: np.ndarray
    anchor: torch.Tensor
    temperature: torch.Tensor


def qwen3_config(sizes: dict):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=sizes["vocabs"][0], hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
                       num_hidden_layers=sizes["target_layers"], num_attention_heads=sizes["heads"],
                       num_key_value_heads=sizes["kv_heads"], head_dim=sizes["head_dim"],
                       max_position_embeddings=32768, tie_word_embeddings=False)


def build_drafter(sizes: dict, draft_layers: int, device: torch.device):
    from ..checkpoint import build_random_drafter

    depth = sizes["target_layers"]
    layer_ids = sorted({int(round(x)) for x in np.linspace(1, depth - 2, 5)})  # 5 fused layers, never the last
    with torch.device(device):
        d = build_random_drafter(qwen3_config(sizes), num_layers=draft_layers, block_size=sizes["block"],
                                 markov_rank=sizes["ranks"][0], target_layer_ids=layer_ids, dtype=torch.bfloat16)
    return d.to(device)


def step_setup(d, n: int, context: int, device: torch.device, seed: int = 0) -> StepSetup:
    """A pool holding ``context`` tokens for each of n requests at scattered blocks."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    per_req = -(-(context + 64) // PAGE)
    blocks = (torch.randperm(n * per_req, generator=g) + 1).view(n, per_req)
    pool = d.new_pool((n * per_req + 1) * PAGE)
    width = d.fc.in_features
    for r in range(n):  # write each request's context once (setup, not timed)
        pos = torch.arange(context)
        slots = (blocks[r][pos // PAGE] * PAGE + pos % PAGE).to(device)
        feats = torch.randn(context, width, generator=g).to(device=device, dtype=d.dtype)
        pool.write(d.project_context(feats, pos.to(device)), slots)
    return StepSetup(d, pool, blocks.to(device=device, dtype=torch.int32), np.full(n, context, dtype=np.int64),
                     torch.randint(0, d.config.vocab_size, (n,), generator=g).to(device), torch.zeros(n, device=device))


def time_drafter_step(sizes: dict, d, device: torch.device) -> list[dict]:
    from ..paged_context import PagedContextView
    from ..pending_context import PendingContext
    from .host_syncs import HostSyncCounter

    block, context = sizes["block"], sizes["context"]
    shapes = "Qwen3-8B shapes" if sizes["hidden"] == FULL["hidden"] else "reduced shapes"
    print(f"\n3. drafter step, {shapes} ({len(d.layers)} draft layers, context {context} per request, "
          f"block {block}, bf16)")
    print(f"{'batch':>6} {'ingest ms':>10} {'forward ms':>11} {'sample ms':>10} {'step ms':>9} {'host syncs':>11}")
    rows = []
    for n in sizes["step_batches"]:
        s = step_setup(d, n, context, device)
        pending = PendingContext(d, s.pool)
        width = d.fc.in_features
        feats = torch.randn(2 * n, width, device=device, dtype=d.dtype)
        slot_rows = s.table.long()[:, context // PAGE] * PAGE + context % PAGE
        slots = torch.stack([slot_rows, slot_rows + 1], 1).flatten()  # 2 new tokens per request
        positions = torch.full((2 * n,), context, device=device) + torch.arange(2 * n, device=device) % 2

        def ingest():
            pending.push_step(list(range(n)), feats, [2] * n, slots, positions)
            pending.flush()

        def view():
            return PagedContextView(s.pool, s.table, PAGE, np.zeros(n, dtype=np.int64), s.ends)

        seeds = torch.arange(n, device=device)
        hidden = d.forward_block(s.anchor, view(), block)

        def sample():
            base = d.base_logits(hidden)
            return d._propose_fused(base, hidden, s.anchor, s.temperature, None, seeds, True)

        def step():
            ingest()
            out = d.propose(s.anchor, view(), s.temperature, fused=True, seeds=seeds, all_greedy=True)
            return out.tokens.tolist(), out.confidence_logits.float().numpy(force=True)

        t_ingest = timed_ms(ingest, device)
        t_forward = timed_ms(lambda: d.forward_block(s.anchor, view(), block), device)
        t_sample = timed_ms(sample, device)
        t_step = timed_ms(step, device)
        with HostSyncCounter() as syncs:
            step()
        rows.append(dict(batch=n, ingest_ms=t_ingest, forward_ms=t_forward, sample_ms=t_sample, step_ms=t_step,
                         host_syncs=len(syncs)))
        print(f"{n:>6} {t_ingest:>10.2f} {t_forward:>11.2f} {t_sample:>10.2f} {t_step:>9.2f} {len(syncs):>11}")
        del s, pending
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def time_target(sizes: dict, device: torch.device, step_rows: list[dict]) -> list[dict]:
    from transformers import DynamicCache, Qwen3ForCausalLM

    context, verify = sizes["context"], sizes["block"] + 1
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(qwen3_config(sizes)).eval()
    finally:
        torch.set_default_dtype(prev)
    shapes = "Qwen3-8B shapes" if sizes["hidden"] == FULL["hidden"] else "reduced shapes"
    print(f"\n   target: {shapes} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, "
          f"{sizes['target_layers']} layers), verifying {verify} tokens per request over the same context")
    print(f"{'batch':>6} {'target ms':>10} {'drafter step ms':>16} {'drafter / target':>17}")
    steps = {r["batch"]: r["step_ms"] for r in step_rows}
    rows = []
    for n in sizes["target_batches"]:
        cache = DynamicCache()
        with torch.no_grad():
            ids = torch.randint(0, model.config.vocab_size, (n, context), device=device)
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            new = torch.randint(0, model.config.vocab_size, (n, verify), device=device)
            pos = torch.arange(context, context + verify, device=device)[None].expand(n, -1)

            def forward():
                model(input_ids=new, position_ids=pos, past_key_values=cache, use_cache=True)
                cache.crop(-verify)

            t = timed_ms(forward, device)
        ratio = steps[n] / t if n in steps else None
        rows.append(dict(batch=n, target_ms=t, drafter_step_ms=steps.get(n), ratio=ratio))
        print(f"{n:>6} {t:>10.2f} {steps.get(n, float('nan')):>16.2f} "
              f"{(f'{ratio:16.3f}' if ratio is not None else '              -'):>17}")
        del cache
    del model
    return rows


def check_moe(sizes: dict, device: torch.device) -> list[dict]:
    """Grouped expert kernel vs the dense PyTorch path, MXFP4 and bf16 experts (section 4)."""
    from dspark_vllm.kernels.markov_sampling import triton_available
    from dspark_vllm.kernels.moe_grouped import grouped_experts
    from dspark_vllm.v4.experts import RoutedExperts

    m = sizes["moe"]
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for fp4 in (True, False):
        experts = RoutedExperts(m["experts"], m["hidden"], m["inter"], limit=10.0, fp4=fp4)
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                t = getattr(experts, name)
                if fp4:
                    t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
                    getattr(experts, f"{name}_scale").fill_(122)  # 2^-5: outputs of order one
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5)
        experts = experts.to(device=device, dtype=torch.bfloat16)
        for tokens in m["tokens"]:
            x = torch.randn(tokens, m["hidden"], generator=g).to(device, torch.bfloat16)
            chosen = torch.stack([torch.randperm(m["experts"], generator=g)[: m["top_k"]] for _ in range(tokens)]).to(device)
            weights = torch.rand(tokens, m["top_k"], generator=g).to(device)
            backend = "triton" if triton_available(device) else "torch"  # CPU: the interpreter when enabled
            ref = grouped_experts(experts, x, chosen, weights, backend="dense").float()
            got = grouped_experts(experts, x, chosen, weights, backend=backend).float()
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            row = dict(section="moe", experts="mxfp4" if fp4 else "bf16", tokens=tokens, backend=backend,
                       rel_err=err, ok=err < MOE_TOLERANCE,
                       grouped_ms=timed_ms(lambda: grouped_experts(experts, x, chosen, weights, backend=backend),
                                           device, repeats=3),
                       dense_ms=timed_ms(lambda: grouped_experts(experts, x, chosen, weights, backend="dense"),
                                         device, repeats=3))
            rows.append(row)
            print(f"moe {row['experts']:>5} tokens {tokens:>4}: {backend} vs dense rel err {err:.2e} "
                  f"({'ok' if row['ok'] else 'FAIL'}); {row['grouped_ms']:.2f} ms vs {row['dense_ms']:.2f} ms", flush=True)
    return rows


def map_kernels_folder() -> None:
    """From a checkout that was never pip-installed (a GPU machine without PyPI), make the
    repository's top-level ``kernels/`` importable as ``dspark_vllm.kernels``, as the installed
    package maps it."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("dspark_vllm.kernels") is not None:
        return
    folder = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location("dspark_vllm.kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dspark_vllm.kernels"] = module
    spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> int:
    map_kernels_folder()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="reduced sizes (CPU); default on a machine without CUDA")
    ap.add_argument("--draft-layers", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--context", type=int, default=None, help="context tokens per request in section 3")
    ap.add_argument("--skip", nargs="*", default=[], choices=["kernels", "speed", "step", "target", "moe"])
    ap.add_argument("--json", help="write all rows here")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = dict(SMALL if a.small or device.type != "cuda" else FULL)
    if a.context:
        sizes["context"] = a.context
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}; sizes: {'full' if sizes['hidden'] == FULL['hidden'] else 'small'}")
    out: dict = {"device": name, "sizes": sizes}
    if "kernels" not in a.skip:
        out["kernels"] = check_kernels(sizes, device)
    if "speed" not in a.skip:
        out["speed"] = time_kernels(sizes, device)
    for layers in a.draft_layers:
        if "step" in a.skip:
            break
        d = build_drafter(sizes, layers, device)
        out[f"step_{layers}_layers"] = rows = time_drafter_step(sizes, d, device)
        del d
        if "target" not in a.skip:
            out[f"target_vs_{layers}_layers"] = time_target(sizes, device, rows)
    if "moe" not in a.skip:
        out["moe"] = check_moe(sizes, device)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    checks = out.get("kernels", []) + out.get("moe", [])
    failed = [r for r in checks if not r["ok"]]
    print(f"\nkernel checks: {len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
