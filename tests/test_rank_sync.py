"""One exchange per step between tensor-parallel ranks: rank 0's clocks, any fault, a digest."""

import pytest
import torch.distributed as dist

from dspark_vllm.vllm_plugin.rank_sync import RankDivergence, RankSync


class Group:
    world_size, cpu_group = 2, object()


class Recorder:
    def __init__(self):
        self.calls = []

    def observe_step(self, *args):
        self.calls.append(("observe_step", args))


def exchange(monkeypatch, other_rank):
    """all_gather_object where this process is rank 0 and ``other_rank`` is what rank 1 sends."""
    def all_gather_object(out, obj, group=None):
        out[0], out[1] = obj, other_rank
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)


def test_one_rank_applies_at_once_and_exchanges_nothing():
    sync, target = RankSync(None), Recorder()
    sync.observe(target, "observe_step", 4, 10.0, 0)
    assert target.calls == [("observe_step", (4, 10.0, 0))] and not sync.shared
    assert sync.end_step(target, faulted=True, tokens=[[1]]) is True


def test_every_rank_replays_rank_0s_clocks_and_shares_faults(monkeypatch):
    sync, target = RankSync(Group(), check=False), Recorder()
    sync.observe(target, "observe_step", 4, 10.0, 0)
    assert target.calls == []  # journaled until the step ends
    exchange(monkeypatch, ([("observe_step", (4, 99.0, 0))], True, None))
    assert sync.end_step(target, faulted=False, tokens=[[1, 2]]) is True  # rank 1 faulted
    assert target.calls == [("observe_step", (4, 10.0, 0))]  # rank 0's clock, not rank 1's


def test_check_mode_raises_on_the_first_divergent_step(monkeypatch):
    sync, target = RankSync(Group(), check=True), Recorder()
    from dspark_vllm.vllm_plugin.rank_sync import _digest

    exchange(monkeypatch, ([], False, _digest([[1, 2]])))
    assert sync.end_step(target, faulted=False, tokens=[[1, 2]]) is False
    exchange(monkeypatch, ([], False, _digest([[1]])))
    with pytest.raises(RankDivergence, match="ranks drafted differently at step 2"):
        sync.end_step(target, faulted=False, tokens=[[1, 2]])
