"""DSpark's Prometheus metrics: worker snapshots, cross-process merge, exposition."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from dspark_vllm.vllm_plugin.metrics import DSparkCollector, ProposerMetrics, merge_snapshots


def test_outcomes_count_reached_and_accepted_positions(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_VLLM_METRICS_DIR", str(tmp_path))
    stats = ProposerMetrics(block_size=4, flush_interval_s=0.0)
    stats.record_step()
    stats.record_verified(drafted=4, verified=3)
    stats.record_verified(drafted=4, verified=2)
    stats.record_outcome([0.9, 0.8, 0.7], num_accepted=1)  # position 0 accepted, 1 rejected, 2 not reached
    stats.record_outcome([0.6, 0.5], num_accepted=2)      # both verified drafts accepted
    assert stats.reached == [2, 2, 0, 0]
    assert stats.accepted == [2, 1, 0, 0]
    assert [round(x, 9) for x in stats.confidence_sum] == [1.5, 1.3, 0.0, 0.0]
    stats.maybe_flush()
    # a second engine process writes its own snapshot; the collector sums them
    other = {"block_size": 4, "steps": 3, "drafted": 12, "admitted": 5, "verifying_requests": 3, "reached": [1, 0, 0, 0],
             "accepted": [0, 0, 0, 0], "confidence_sum": [0.25, 0, 0, 0]}
    import json

    (tmp_path / "999999.json").write_text(json.dumps(other))
    merged = merge_snapshots(tmp_path)
    assert merged["steps"] == 4 and merged["admitted"] == 10 and merged["reached"][0] == 3

    registry = CollectorRegistry()
    registry.register(DSparkCollector(tmp_path))
    text = generate_latest(registry).decode()
    assert "dspark:admitted_draft_tokens_total 10.0" in text
    assert "dspark:verified_drafts_per_request 2.0" in text  # 10 verified over 5 request-steps
    assert 'dspark:conditional_acceptance{position="0"} 0.6666666666666666' in text
    assert 'dspark:conditional_acceptance{position="1"} 0.5' in text
    assert 'dspark:mean_confidence{position="0"} 0.58333' in text
    assert 'dspark:conditional_acceptance{position="2"}' not in text  # never reached: no ratio


def test_flush_is_throttled_and_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_VLLM_METRICS_DIR", str(tmp_path / "missing-folder"))
    stats = ProposerMetrics(block_size=2, flush_interval_s=3600)
    stats.maybe_flush()  # folder does not exist: swallowed
    stats.maybe_flush(force=True)
    assert merge_snapshots(tmp_path / "missing-folder") is None


def test_snapshot_folder_goes_to_ram_when_there_is_one(tmp_path):
    """The worker renames its snapshot on the step's critical path: a RAM folder when one exists
    (ext4-backed /tmp made that rename ~8 ms in served runs), the system temp folder otherwise."""
    from dspark_vllm.vllm_plugin.metrics import snapshot_parent

    assert snapshot_parent(tmp_path) == str(tmp_path)
    assert snapshot_parent(tmp_path / "absent") is None
    (tmp_path / "a-file").write_text("")
    assert snapshot_parent(tmp_path / "a-file") is None


def test_snapshot_folder_is_removed_only_by_the_process_that_made_it(tmp_path):
    import os

    from dspark_vllm.vllm_plugin.metrics import remove_snapshot_folder

    folder = tmp_path / "dspark-metrics-x"
    folder.mkdir()
    (folder / "123.json").write_text("{}")
    remove_snapshot_folder(str(folder), owner_pid=os.getpid() + 1)  # a forked child exiting
    assert folder.exists()
    remove_snapshot_folder(str(folder), owner_pid=os.getpid())
    assert not folder.exists()


def test_a_snapshot_is_written_once_the_engine_goes_idle(tmp_path, monkeypatch):
    """Steps inside the flush interval are not lost when no step follows: a timer writes them."""
    import time

    monkeypatch.setenv("DSPARK_VLLM_METRICS_DIR", str(tmp_path))
    stats = ProposerMetrics(block_size=2, flush_interval_s=0.2)
    stats.record_step()
    stats.maybe_flush()  # first call writes
    stats.record_verified(drafted=2, verified=2)
    stats.maybe_flush()  # inside the interval: deferred to the timer
    assert merge_snapshots(tmp_path)["admitted"] == 0
    time.sleep(0.6)
    assert merge_snapshots(tmp_path)["admitted"] == 2


def test_only_tensor_parallel_rank_0_writes_a_snapshot(tmp_path, monkeypatch):
    from dspark_vllm.vllm_plugin import metrics

    monkeypatch.setenv("DSPARK_VLLM_METRICS_DIR", str(tmp_path))
    assert metrics.is_reporting_rank()  # no distributed state: a plain process reports
    monkeypatch.setattr(metrics, "is_reporting_rank", lambda: False)
    stats = ProposerMetrics(block_size=2, flush_interval_s=0.0)
    stats.record_step()
    stats.maybe_flush(force=True)
    assert merge_snapshots(tmp_path) is None
