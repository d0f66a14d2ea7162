"""Scheduler benchmark: policy latency on CPU and expected throughput as load grows.

    python -m dspark_vllm.bench.scheduler [--plot scheduler.png]

Part 1 times each policy's ``lengths()`` for 1, 32, 256, 512 requests x B = 7 (median of many
calls). Part 2 uses a synthetic GPU-like cost curve (flat while memory bound, then linear) and
confidences drawn per request, and reports for each policy the expected emitted tokens per step
and the expected throughput tau * SPS(tokens) as the number of concurrent requests grows.
Figures are printed (and plotted), never asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..scheduler import (
    AsyncTopKPolicy,
    CausalGreedyPolicy,
    CostProfile,
    FixedPolicy,
    ThresholdPolicy,
    expected_tokens,
)

BLOCK = 7


def draw_confidences(rng: np.random.Generator, requests: int) -> np.ndarray:
    """Per-request difficulty times a decaying per-position profile, clipped to (0, 1)."""
    difficulty = rng.beta(5, 1.5, size=(requests, 1))
    position = np.linspace(1.0, 0.8, BLOCK)[None, :]
    noise = rng.normal(0, 0.05, size=(requests, BLOCK))
    return np.clip(difficulty * position + noise, 0.01, 0.99)


def policies(cost: CostProfile) -> dict:
    return {"fixed": FixedPolicy(), "threshold@0.6": ThresholdPolicy(0.6),
            "causal_raw": CausalGreedyPolicy(cost, smooth=False), "causal_greedy": CausalGreedyPolicy(cost),
            "async_topk": AsyncTopKPolicy(cost)}


def call(policy, conf, stale):
    if isinstance(policy, AsyncTopKPolicy):
        return policy.lengths(conf, stale_confidence=stale)
    return policy.lengths(conf)


def latency_table(cost: CostProfile, rng: np.random.Generator) -> None:
    print(f"Policy latency (CPU, B={BLOCK}), microseconds per call (median)")
    names = list(policies(cost))
    print(f"{'requests':>9} " + " ".join(f"{n:>14}" for n in names))
    for r in (1, 32, 256, 512):
        conf, stale = draw_confidences(rng, r), draw_confidences(rng, r)
        row = []
        for pol in policies(cost).values():
            reps = 200 if r <= 32 else 50
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                call(pol, conf, stale)
                samples.append(time.perf_counter() - t0)
            row.append(np.median(samples) * 1e6)
        print(f"{r:>9} " + " ".join(f"{v:>14.1f}" for v in row))


def load_sweep(cost: CostProfile, rng: np.random.Generator, plot: str | None) -> None:
    loads = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    names = list(policies(cost))
    tokens = {n: [] for n in names}
    theta = {n: [] for n in names}
    verified = {n: [] for n in names}
    for r in loads:
        conf, stale = draw_confidences(rng, r), draw_confidences(rng, r)
        for name, pol in policies(cost).items():
            lens = call(pol, conf, stale)
            tau = expected_tokens(conf, lens)
            tokens[name].append(tau)
            verified[name].append(float(lens.mean()))
            theta[name].append(tau * cost.sps(r + int(lens.sum())))
    print(f"\nExpected throughput vs load (synthetic cost: {cost.step_ms[0]:.0f} ms flat to "
          f"64 tokens, then +{cost.step_ms[-1] - cost.step_ms[-2]:.3f} ms/token per 8 tokens)")
    print(f"{'requests':>9} " + " ".join(f"{n + ' tok/step':>24} {'tok/s':>9} {'L':>4}" for n in names))
    for i, r in enumerate(loads):
        print(f"{r:>9} " + " ".join(f"{tokens[n][i]:>24.1f} {theta[n][i]:>9.0f} {verified[n][i]:>4.1f}" for n in names))
    print("\nThroughput relative to fixed (verify all B):")
    for n in names:
        ratios = " ".join(f"{theta[n][i] / theta['fixed'][i]:.2f}" for i in range(len(loads)))
        print(f"  {n:>14}: {ratios}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for n in names:
            axes[0].plot(loads, theta[n], marker="o", label=n)
            axes[1].plot(loads, verified[n], marker="o", label=n)
        for ax, title in zip(axes, ["expected tokens/s", "mean verified drafts per request"]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"\nplot written to {plot}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", default="scheduler_load_sweep.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    cost = CostProfile.synthetic(base_ms=20.0, flat_tokens=64, slope_ms=0.05, max_tokens=8192, bucket=8)
    latency_table(cost, rng)
    load_sweep(cost, rng, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
