"""Fused Markov sampling kernel vs its PyTorch reference on a GPU.

    python -m dspark_vllm.bench.markov_kernel [--vocab 151936 --rank 256 --block 7]

For batch 1, 32 and 128 (bf16), prints kernel time, PyTorch reference time, their ratio, and the
kernel's achieved memory bandwidth as a fraction of the device's peak. Bytes counted are the
unavoidable ones per call: B x (W2 [V, r] + U [N, V]) plus small per-request vectors. Needs a
CUDA device (timings with CUDA events, median of 20 after warm-up); on CPU it says so and exits.
"""

from __future__ import annotations

import argparse
import sys

import torch

PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L40S": 0.864e12, "B200": 8.0e12}


def peak_bandwidth(name: str) -> float | None:
    for key, value in PEAK_BYTES_PER_S.items():
        if key in name:
            return value
    return None


def kernel_bytes(batch: int, block: int, vocab: int, rank: int, hidden: int, itemsize: int = 2) -> int:
    """Bytes one call must move: per position W2 [V, r] and the base logits [N, V], plus the
    per-request hidden states and W1 rows."""
    return block * (vocab * rank + batch * vocab) * itemsize + batch * block * (hidden + rank) * itemsize


def time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    samples.sort()
    return samples[len(samples) // 2]


def main(argv: list[str] | None = None) -> int:
    from ..kernels.markov_sampling import markov_sample

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--block", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here: run this benchmark on a GPU machine (the CPU CI checks correctness "
              "under TRITON_INTERPRET=1 instead)")
        return 0
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = peak_bandwidth(name)
    v, r, b, h = args.vocab, args.rank, args.block, args.hidden
    dt = torch.bfloat16
    print(f"device: {name}; V={v} r={r} B={b} H={h} {dt}, temperature {args.temperature}")
    print(f"{'batch':>6} {'kernel ms':>10} {'torch ms':>10} {'speed-up':>9} {'GB/s':>8} {'% peak':>7} {'tokens ==':>9}")
    w1 = torch.randn(v, r, device=dev, dtype=dt)
    w2 = torch.randn(v, r, device=dev, dtype=dt) * 0.05
    cw = torch.randn(h + r, device=dev, dtype=dt)
    cb = torch.randn(1, device=dev, dtype=dt)
    for n in (int(x) for x in args.batches.split(",")):
        u = torch.randn(n, b, v, device=dev, dtype=dt)
        hid = torch.randn(n, b, h, device=dev, dtype=dt)
        anchor = torch.randint(0, v, (n,), device=dev)
        temp = torch.full((n,), args.temperature, device=dev)
        seeds = torch.arange(n, device=dev)
        call = dict(base_logits=u, w1=w1, w2=w2, anchor=anchor, temperature=temp, seeds=seeds,
                    hidden=hid, conf_weight=cw, conf_bias=cb)
        kern = time_ms(lambda: markov_sample(**call, backend="triton"))
        ref = time_ms(lambda: markov_sample(**call, backend="torch"))
        same = torch.equal(markov_sample(**call, backend="triton")[0], markov_sample(**call, backend="torch")[0])
        nbytes = kernel_bytes(n, b, v, r, h)
        gbs = nbytes / (kern * 1e-3) / 1e9
        pct = f"{100 * gbs * 1e9 / peak:6.1f}%" if peak else "    n/a"
        print(f"{n:>6} {kern:>10.3f} {ref:>10.3f} {ref / kern:>8.2f}x {gbs:>8.0f} {pct:>7} {str(same):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
