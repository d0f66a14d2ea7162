"""Internal tuning constants of the draft gate, the step-cost estimator and the context queue.

Users tune through the YAML settings (``settings.py``); these are the numbers below them, named
in one place with the reason for each. Changing one changes behaviour everywhere it is used.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tuning:
    # draft gate (scheduler/draft_gate.py)
    gate_momentum: float = 0.9          # EMA weight of the per-position confidence prior: ~10 blocks of memory
    probe_every: int = 16               # gated steps before one request drafts as a probe (keeps the prior current)
    max_probe_every: int = 256          # probes back off to this under sustained load (a probe costs a verify)
    explore_every: int = 16             # an open gate decodes plainly every this many drafted steps (plain cost stays known)
    explore_every_learning: int = 4     # ... this often while the verify premium is still unknown
    explore_below: float = 1.5          # only when the predicted gain is marginal (below this)
    timer_decay: float = 0.98           # forgetting of the drafter/ingestion time fits (~50 samples of memory)
    # step-cost estimator (scheduler/step_cost.py)
    cost_window: int = 64               # recent steps whose median served/profiled ratio is the scale
    cost_min_samples: int = 8           # steps before the scale is trusted (1.0 until then)
    premium_neighbours: int = 4         # steps of a run compared with the first step of the next kind
    premium_pairs: int = 32             # drafted/plain pairs whose median is the verify premium
    # context queue (pending_context.py)
    queue_view_max_tokens: int = 64     # steps up to this size are queued as views, never copied
    queue_max_tokens: int = 512         # per request: a backlog this long is written at once (batches well)
    queue_max_bytes: int = 256 << 20    # all requests: small next to any KV budget, far above a decode backlog
    queue_refill_fraction: float = 0.75  # over max_bytes, the largest backlogs are written until the rest fit in this share
    # drafter workspace (vllm_plugin/workspace.py)
    workspace_share: float = 0.08       # at most this share of the KV budget holds the base logits and q of a step


TUNING = Tuning()
