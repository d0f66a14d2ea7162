import numpy as np
import pytest

from dspark_vllm.scheduler import CostProfile, profile_step_times


def test_step_function_monotone_and_extrapolation(tmp_path):
    prof = CostProfile(tokens=[8, 16, 32], step_ms=[10.0, 9.0, 20.0])  # noisy dip at 16
    assert prof.step_time_ms(1) == 10.0 and prof.step_time_ms(8) == 10.0
    assert prof.step_time_ms(9) == 10.0  # padded to bucket 16, monotone-cleaned to 10
    assert prof.step_time_ms(17) == 20.0
    assert prof.step_time_ms(48) == pytest.approx(20.0 + 10.0 / 16 * 16)  # linear beyond the grid
    t = prof.step_time_ms(np.arange(1, 100))
    assert (np.diff(t) >= 0).all()
    assert prof.sps(8) == pytest.approx(100.0)
    prof.save(tmp_path / "p.json")
    again = CostProfile.load(tmp_path / "p.json")
    assert np.array_equal(again.step_time_ms(np.arange(1, 64)), prof.step_time_ms(np.arange(1, 64)))


def test_profiles_with_the_retired_empty_draft_table_still_load(tmp_path):
    (tmp_path / "old.json").write_text('{"tokens": [4], "step_ms": [10.0], "draft_requests": [], "draft_ms": []}')
    assert CostProfile.load(tmp_path / "old.json").sps(4) == pytest.approx(100.0)
    (tmp_path / "filled.json").write_text('{"tokens": [4], "step_ms": [10.0], "draft_requests": [1], "draft_ms": [2]}')
    with pytest.raises(ValueError, match="unknown keys"):
        CostProfile.load(tmp_path / "filled.json")


def test_profile_grid_is_shared_and_bounded():
    from dspark_vllm.scheduler import profile_grid

    assert profile_grid(16) == [1, 2, 4, 8, 12, 16]
    assert profile_grid(512)[-1] == 512 and profile_grid(10_000)[-1] == 1024


def test_bad_profiles_are_named(tmp_path):
    with pytest.raises(ValueError, match="equally long"):
        CostProfile(tokens=[1, 2], step_ms=[1.0])
    (tmp_path / "x.json").write_text('{"tokens": [1], "step_ms": [1.0], "steps": 3}')
    with pytest.raises(ValueError, match="unknown keys \\['steps'\\]"):
        CostProfile.load(tmp_path / "x.json")


def test_profiler_times_forward():
    calls = []
    prof = profile_step_times(lambda n: calls.append(n), [4, 1, 2, 4], repeats=2, warmup=1, progress=False)
    assert prof.tokens == [1, 2, 4]
    assert calls.count(4) == 3  # warmup + 2 repeats


def test_vllm_profile_adds_logits_for_every_verified_token():
    """A prefill profile computes one row of logits; a verify step computes one per token. The
    added cost is the logits time at n rows minus at 1 row, so the 1-token point is unchanged
    and the slope grows by the per-row logits cost."""
    import pytest

    from dspark_vllm.scheduler import CostProfile
    from dspark_vllm.vllm_plugin.startup_profile import with_logits_for_every_token

    prefill = CostProfile(tokens=[1, 16, 32], step_ms=[40.0, 60.0, 80.0], device="x")
    decode = with_logits_for_every_token(prefill, [5.0, 35.0, 65.0])
    assert decode.tokens == [1, 16, 32] and decode.step_ms == [40.0, 90.0, 140.0]
    assert decode.forward_ms(32) - decode.forward_ms(16) == 50.0  # was 20: plus 30 ms of logits for 16 rows
    with pytest.raises(ValueError, match="token grid"):
        with_logits_for_every_token(prefill, [5.0, 35.0])


def test_logits_timer_times_compute_logits_at_every_grid_size():
    """The function handed to ``LLM.apply_model`` calls the model's ``compute_logits`` on n rows
    of its hidden size for each grid size (warm-up + repeats) and returns one time per size."""
    import torch

    from dspark_vllm.vllm_plugin.startup_profile import LogitsTimer

    class TinyLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(8, 32, bias=False)
            self.config = type("Config", (), {"hidden_size": 8})()
            self.rows_seen: list[int] = []

        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            self.rows_seen.append(hidden.shape[0])
            return self.head(hidden)

    model = TinyLM()
    times = LogitsTimer([1, 4, 16], repeats=3)(model)
    assert len(times) == 3 and all(ms > 0 for ms in times)
    assert model.rows_seen == [1] * 4 + [4] * 4 + [16] * 4  # one warm-up and three timed calls each


def test_profile_child_times_the_served_worker_process(tmp_path, monkeypatch):
    """``vllm serve`` runs the model in a pinned worker process; the profiling child must too
    (an in-process engine times a machine with more threads). Its logits timer must survive
    the trip to that worker: the child allows pickling, and the timer pickles."""
    import pickle
    import subprocess

    from dspark_vllm.vllm_plugin import startup_profile

    seen = {}
    monkeypatch.setattr(subprocess, "run", lambda cmd, check, env: seen.update(cmd=cmd, env=env))
    startup_profile.measure_profile("/models/t", 64, tmp_path / "p.json")
    assert seen["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert seen["env"]["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    assert seen["cmd"][1:] == [startup_profile.__file__, "/models/t", "64", str(tmp_path / "p.json"), "auto"]
    timer = pickle.loads(pickle.dumps(startup_profile.LogitsTimer([1, 8], repeats=2)))
    assert (timer.grid, timer.repeats) == ([1, 8], 2)
