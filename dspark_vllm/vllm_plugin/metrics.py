"""DSpark's own Prometheus metrics, exported on vLLM's ``/metrics``.

The proposer runs in the engine-core/worker process while ``/metrics`` is served by the API
server process, so the numbers cross the process boundary through small JSON snapshots:
the worker side (:class:`ProposerMetrics`) rewrites ``$DSPARK_VLLM_METRICS_DIR/<pid>.json`` at
most every ``flush_interval_s``; the API-server side (:class:`DSparkCollector`, registered in
prometheus_client's default registry by the plugin's ``register()``) sums every snapshot in that
folder at scrape time. ``register()`` creates the folder before vLLM starts the engine process,
which inherits the variable. The folder lives in RAM (``/dev/shm``) where there is one: the
worker rewrites its snapshot with a rename on the step's critical path, and a rename over a file
on a disk-backed ``/tmp`` can wait for the filesystem to flush it. (With several API servers
vLLM switches prometheus_client to multiprocess mode and these metrics are not exported.)

Exported series (position k = 0-based draft index):

Token counts are taken when vLLM verifies (drafts of a request that finished or was aborted
before its drafts were verified are not counted), and only TP rank 0 writes a snapshot, so each
server exports one series whatever its tensor-parallel size. A snapshot is also written once
the engine goes idle (a timer after the last step) and at exit.

* ``dspark:draft_steps_total`` steps in which DSpark drafted; ``dspark:drafted_tokens_total``
  block positions drafted for drafts that reached verification; ``dspark:admitted_draft_tokens_total``
  draft tokens vLLM verified (what the verify-length policy kept; equals vLLM's
  ``spec_decode_num_draft_tokens`` for DSpark's drafts); ``dspark:verified_drafts_per_request``
  their mean per request and verifying step;
  ``dspark:gated_steps_total`` steps the draft gate skipped (load too high for drafting to pay);
  ``dspark:served_cost_scale`` the learned ratio of served step time to the profiled forward
  (multiplies the cost curve; see ``scheduler/step_cost.py``); ``dspark:verify_step_premium``
  the learned extra cost of a step that verifies drafts over a plain one (the draft gate
  charges it; 1.0 until learned); ``dspark:step_faults_total`` steps whose drafting failed inside
  DSpark and ran without drafts (the log names the first fault of each kind).
* ``dspark:position_reached_total{position}`` drafts at k verified after an accepted prefix,
  ``dspark:position_accepted_total{position}`` those accepted, and
  ``dspark:conditional_acceptance{position}`` = accepted / reached (paper Fig. 2).
* ``dspark:mean_confidence{position}`` mean calibrated confidence c_k over the same reached
  drafts, to read against ``conditional_acceptance`` (a calibrated head makes them equal).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ..acceptance_stats import PositionCounts

ENV_METRICS_DIR = "DSPARK_VLLM_METRICS_DIR"
ENV_FLUSH_S = "DSPARK_VLLM_METRICS_FLUSH_S"  # snapshot interval, default 0.5 s
RAM_DIR = Path("/dev/shm")
PREFIX = "dspark:"


def snapshot_parent(ram_dir: Path = RAM_DIR) -> str | None:
    """Where the snapshot folder is made: ``ram_dir`` if it is a writable folder (Linux tmpfs),
    else None (the system temp folder). See the module docstring for why."""
    return str(ram_dir) if ram_dir.is_dir() and os.access(ram_dir, os.W_OK | os.X_OK) else None


class ProposerMetrics:
    """Worker-side counters of the vLLM proposer; cheap to update every step."""

    def __init__(self, block_size: int, flush_interval_s: float | None = None) -> None:
        self.block_size = block_size
        self.steps = 0
        self.gated = 0
        self.faults = 0
        self.cost_scale = 1.0
        self.verify_premium = 1.0
        self.drafted = 0
        self.admitted = 0
        self.verifying_requests = 0  # (request, step) pairs that verified at least one draft
        self.positions = PositionCounts(block_size)
        self.confidence_sum = [0.0] * block_size
        self.context_pool_bytes = 0
        self.flush_interval_s = (float(os.environ.get(ENV_FLUSH_S, 0.5)) if flush_interval_s is None
                                 else flush_interval_s)
        self._last_flush = 0.0
        self._idle_flush: threading.Timer | None = None
        folder = os.environ.get(ENV_METRICS_DIR)
        self.path = Path(folder) / f"{os.getpid()}.json" if folder and is_reporting_rank() else None
        if self.path is not None:
            atexit.register(self.maybe_flush, force=True)

    @property
    def reached(self) -> list[int]:
        return self.positions.reached

    @property
    def accepted(self) -> list[int]:
        return self.positions.accepted

    def record_step(self) -> None:
        """A step in which DSpark drafted."""
        self.steps += 1

    def record_verified(self, drafted: int, verified: int) -> None:
        """One request's drafts verified by vLLM: ``verified`` tokens, out of a block drafted
        ``drafted`` positions deep."""
        self.drafted += drafted
        self.admitted += verified
        self.verifying_requests += 1

    def record_gated(self) -> None:
        self.gated += 1

    def record_fault(self) -> None:
        self.faults += 1

    def record_learned(self, cost_scale: float | None, verify_premium: float | None) -> None:
        """The scheduler's learned step-cost factors (1.0 while unknown)."""
        self.cost_scale = 1.0 if cost_scale is None else cost_scale
        self.verify_premium = 1.0 if verify_premium is None else verify_premium

    def record_verified_step(self, pending: dict, req_ids: list[str], num_spec, sampled: list[list[int]],
                             rows: list[int]) -> None:
        """The drafts each row had verified in the step that just ended: ``pending`` maps request
        id -> (confidences handed out, depth drafted), popped here; ``num_spec`` [R] is what vLLM
        scheduled for verification, ``sampled`` [R] what the step emitted."""
        for row in rows:
            handed = pending.pop(req_ids[row], None)
            verified = int(num_spec[row])
            if handed and verified:
                confidences, depth = handed
                self.record_outcome(confidences[:verified], len(sampled[row]) - 1)
                self.record_verified(depth, verified)

    def record_outcome(self, confidences: list[float], num_accepted: int) -> None:
        """One request's verified drafts (one confidence each): positions 0..num_accepted-1
        accepted, and position num_accepted reached but rejected when some draft was."""
        self.positions.record(len(confidences), num_accepted)
        for k in range(min(num_accepted + 1, len(confidences), self.block_size)):
            self.confidence_sum[k] += float(confidences[k])

    def snapshot(self) -> dict:
        return {"block_size": self.block_size, "steps": self.steps, "gated": self.gated, "faults": self.faults,
                "drafted": self.drafted, "verifying_requests": self.verifying_requests,
                "cost_scale": self.cost_scale, "verify_premium": self.verify_premium,
                "admitted": self.admitted, "reached": self.reached, "accepted": self.accepted,
                "confidence_sum": self.confidence_sum, "context_pool_bytes": self.context_pool_bytes}

    def maybe_flush(self, force: bool = False) -> None:
        """Write the snapshot if ``flush_interval_s`` has passed (or ``force``); otherwise make
        sure a timer writes it then, so the last steps before the engine goes idle show."""
        if self.path is None:
            return
        now = time.monotonic()
        wait = self.flush_interval_s - (now - self._last_flush)
        if not force and wait > 0:
            if self._idle_flush is None:
                self._idle_flush = threading.Timer(wait, self._flush_from_timer)
                self._idle_flush.daemon = True
                self._idle_flush.start()
            return
        self._last_flush = now
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            tmp.replace(self.path)
        except (OSError, ValueError, RuntimeError):  # metrics must never break serving
            pass

    def _flush_from_timer(self) -> None:
        self._idle_flush = None
        self.maybe_flush(force=True)


def is_reporting_rank() -> bool:
    """Whether this worker writes DSpark's snapshot: tensor-parallel rank 0 (every rank drafts
    the same, so one series per server), or any process outside a TP group."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # noqa: BLE001 - no distributed state (tests, tools): report
        return True


def merge_snapshots(folder: Path) -> dict | None:
    """Sum every worker snapshot in ``folder`` (None when there is none yet)."""
    total: dict | None = None
    for f in sorted(folder.glob("*.json")):
        try:
            snap = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if total is None:
            total = snap
            continue
        for key in ("steps", "gated", "faults", "drafted", "admitted", "verifying_requests", "context_pool_bytes"):
            total[key] = total.get(key, 0) + snap.get(key, 0)
        total["cost_scale"] = max(total.get("cost_scale", 1.0), snap.get("cost_scale", 1.0))
        total["verify_premium"] = max(total.get("verify_premium", 1.0), snap.get("verify_premium", 1.0))
        for key in ("reached", "accepted", "confidence_sum"):
            total[key] = [a + b for a, b in zip(total[key], snap[key])]
    return total


class DSparkCollector:
    """prometheus_client collector reading the snapshots at scrape time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = merge_snapshots(self.folder)
        if snap is None:
            return
        for name, key, doc in (("draft_steps", "steps", "steps in which DSpark drafted"),
                               ("gated_steps", "gated", "steps the draft gate skipped (drafting could not pay)"),
                               ("step_faults", "faults", "steps whose drafting failed inside DSpark (served "
                                "without drafts)"),
                               ("drafted_tokens", "drafted", "block positions drafted for drafts that reached "
                                "verification"),
                               ("admitted_draft_tokens", "admitted", "draft tokens vLLM verified (kept by the "
                                "verify-length policy)")):
            yield CounterMetricFamily(PREFIX + name, doc, value=snap.get(key, 0))
        per_request = GaugeMetricFamily(PREFIX + "verified_drafts_per_request", "mean draft tokens vLLM verified per "
                                        "request and verifying step")
        verifying = snap.get("verifying_requests", 0)
        per_request.add_metric([], snap["admitted"] / verifying if verifying else 0.0)
        yield per_request
        scale = GaugeMetricFamily(PREFIX + "served_cost_scale", "learned served engine step time / profiled "
                                  "forward time (multiplies the cost curve)")
        scale.add_metric([], float(snap.get("cost_scale", 1.0)))
        yield scale
        premium = GaugeMetricFamily(PREFIX + "verify_step_premium", "learned served cost of a step verifying drafts / "
                                    "of a plain step (charged by the draft gate; 1.0 until learned)")
        premium.add_metric([], float(snap.get("verify_premium", 1.0)))
        yield premium
        pool = GaugeMetricFamily(PREFIX + "context_pool_bytes", "memory of the drafter's context K/V pool "
                                 "(one slot per target KV slot, taken from vLLM's KV cache budget)")
        pool.add_metric([], float(snap.get("context_pool_bytes", 0)))
        yield pool
        reached = CounterMetricFamily(PREFIX + "position_reached", "drafts at position k verified after an accepted prefix",
                                      labels=["position"])
        accepted = CounterMetricFamily(PREFIX + "position_accepted", "drafts at position k accepted", labels=["position"])
        cond = GaugeMetricFamily(PREFIX + "conditional_acceptance", "P(draft k accepted | prefix accepted)",
                                 labels=["position"])
        conf = GaugeMetricFamily(PREFIX + "mean_confidence", "mean calibrated confidence of reached drafts at k",
                                 labels=["position"])
        for k in range(snap["block_size"]):
            pos = [str(k)]
            r, a = snap["reached"][k], snap["accepted"][k]
            reached.add_metric(pos, r)
            accepted.add_metric(pos, a)
            if r:
                cond.add_metric(pos, a / r)
                conf.add_metric(pos, snap["confidence_sum"][k] / r)
        yield from (reached, accepted, cond, conf)


_COLLECTOR: DSparkCollector | None = None


def remove_snapshot_folder(folder: str, owner_pid: int) -> None:
    """At exit of the process that made the folder (not of a forked child): snapshots live in
    RAM, so a folder left by every server start would add up."""
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


def install_collector() -> None:
    """Create the snapshot folder (inherited by the engine process) and register the collector
    once per process."""
    global _COLLECTOR
    if _COLLECTOR is not None:
        return
    folder = os.environ.get(ENV_METRICS_DIR)
    if not folder:
        folder = tempfile.mkdtemp(prefix="dspark-metrics-", dir=snapshot_parent())
        os.environ[ENV_METRICS_DIR] = folder
        atexit.register(remove_snapshot_folder, folder, os.getpid())
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    _COLLECTOR = DSparkCollector(Path(folder))
    REGISTRY.register(_COLLECTOR)
