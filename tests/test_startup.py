"""Start-up without an engine: validation errors, routing, and the worker's one settings object."""

import os
import shutil
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from dspark_vllm.drafters import SMOLLM2_DRAFTER  # noqa: E402
from dspark_vllm.scheduler import CostProfile, STSCalibrator  # noqa: E402
from dspark_vllm.settings import CONFIGS_DIR  # noqa: E402
from dspark_vllm.vllm_plugin import startup  # noqa: E402


def spec(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"model": str(SMOLLM2_DRAFTER), "num_speculative_tokens": None,
                              "target_model_config": None, "method": "dspark", **kw})


def test_a_valid_config_is_routed_and_hands_the_worker_one_object(monkeypatch):
    monkeypatch.setenv(startup.ENV_CONFIG, "llama-smollm2")
    monkeypatch.delenv(startup.ENV_WORKER, raising=False)
    s = spec()
    startup.prepare_speculative_config(s)
    assert (s.method, s.model, s.num_speculative_tokens) == ("custom_class", startup.PROPOSER_PATH, 7)
    worker = startup.WorkerSettings.from_env()
    assert worker.checkpoint == str(SMOLLM2_DRAFTER.resolve())
    assert worker.settings_source == str(CONFIGS_DIR / "llama-smollm2.yaml")
    settings = worker.dspark_settings()  # no YAML read in the worker: rebuilt from the object
    assert settings.scheduler.policy == "causal_greedy"
    stored = CostProfile.load(settings.resolve(settings.scheduler.cost_profile))
    assert worker.cost_profile == stored.to_dict()  # the contents travel, not the path


def test_a_worker_on_another_node_needs_only_the_checkpoint(tmp_path, monkeypatch):
    """The head node's settings folder (YAML, calibration, cost profile) is gone when the worker
    builds its scheduler, as on a second node: everything but the checkpoint was carried."""
    head = tmp_path / "head"
    head.mkdir()
    CostProfile([1, 64, 128], [10.0, 11.0, 15.0], "head-node", 128).save(head / "profile.json")
    STSCalibrator([1.5] * 7).save(head / "cal.json")
    (head / "dspark.yaml").write_text("scheduler:\n  policy: causal_greedy\n  cost_profile: profile.json\n"
                                      "  profile_at_startup: false\ncalibration:\n  file: cal.json\n")
    monkeypatch.setenv(startup.ENV_CONFIG, str(head / "dspark.yaml"))
    monkeypatch.delenv(startup.RAY_PREFIXES, raising=False)
    startup.prepare_speculative_config(spec())
    shutil.rmtree(head)
    monkeypatch.chdir(tmp_path)
    scheduler = startup.WorkerSettings.from_env().scheduler(7)
    assert scheduler.calibrator.temperatures == [1.5] * 7
    assert scheduler.step_cost.served.profile.device == "head-node"
    assert scheduler.step_cost.served.profile.step_ms == [10.0, 11.0, 15.0]


def test_ray_workers_are_handed_every_dspark_variable(monkeypatch):
    """vLLM's own Ray env list (what a Ray actor on another node receives) names our variables,
    and a user's own extra prefixes stay."""
    from vllm.ray.ray_env import get_env_vars_to_copy

    monkeypatch.setenv(startup.RAY_PREFIXES, "MY_TEAM_")
    monkeypatch.setenv(startup.ENV_CONFIG, "llama-smollm2")
    monkeypatch.setenv("DSPARK_VLLM_METRICS_DIR", "/dev/shm/x")
    monkeypatch.setenv("MY_TEAM_FLAG", "1")
    startup.prepare_speculative_config(spec())
    startup.prepare_speculative_config(spec())  # idempotent
    assert os.environ[startup.RAY_PREFIXES] == "MY_TEAM_,DSPARK_VLLM_"
    copied = get_env_vars_to_copy()
    assert {startup.ENV_WORKER, startup.ENV_CONFIG, "DSPARK_VLLM_METRICS_DIR", "MY_TEAM_FLAG"} <= copied


def test_wrong_block_size_and_missing_handover_are_explained(monkeypatch):
    monkeypatch.setenv(startup.ENV_CONFIG, "llama-smollm2")
    with pytest.raises(startup.DSparkStartupError, match="num_speculative_tokens is 3 .* block_size 7"):
        startup.prepare_speculative_config(spec(num_speculative_tokens=3))
    monkeypatch.setenv(startup.ENV_CONFIG, "no-such-settings")
    with pytest.raises(startup.DSparkStartupError, match="neither a file nor one of"):
        startup.prepare_speculative_config(spec())
    monkeypatch.delenv(startup.ENV_WORKER, raising=False)
    with pytest.raises(RuntimeError, match="DSPARK_VLLM_WORKER is not set"):
        startup.WorkerSettings.from_env()


def test_every_dspark_config_is_claimed_and_a_folder_we_cannot_serve_is_explained(tmp_path, monkeypatch):
    assert startup.is_deepspec_checkpoint(str(SMOLLM2_DRAFTER))
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert not startup.is_deepspec_checkpoint(str(tmp_path))
    assert not startup.is_deepspec_checkpoint(None)
    assert startup.claims(spec(model=str(tmp_path))) and not startup.claims(spec(method="eagle3"))
    monkeypatch.setenv(startup.ENV_BACKEND, "upstream")
    assert not startup.claims(spec())
    monkeypatch.delenv(startup.ENV_BACKEND)
    with pytest.raises(startup.DSparkStartupError, match="is not a DSpark drafter checkpoint"):
        startup.prepare_speculative_config(spec(model=str(tmp_path)))
    with pytest.raises(startup.DSparkStartupError, match="drafter 'org/no-such-drafter' is not a local folder"):
        startup.prepare_speculative_config(spec(model="org/no-such-drafter"))


def test_missing_calibration_or_cost_profile_stops_start_up_with_the_path(tmp_path, monkeypatch):
    for key, value, expected in (("calibration:\n  file", "missing-cal.json", "cannot read calibration file .*missing-cal"),
                                 ("scheduler:\n  cost_profile", "missing-profile.json",
                                  "cannot read cost profile .*missing-profile")):
        yaml = tmp_path / "s.yaml"
        yaml.write_text(f"{key}: {value}\n")
        monkeypatch.setenv(startup.ENV_CONFIG, str(yaml))
        with pytest.raises(startup.DSparkStartupError, match=f"DSpark start-up failed: {expected}"):
            startup.prepare_speculative_config(spec())




def test_pipeline_parallelism_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv(startup.ENV_CONFIG, "llama-smollm2")
    parallel = SimpleNamespace(pipeline_parallel_size=2, tensor_parallel_size=1)
    with pytest.raises(startup.DSparkStartupError, match="pipeline_parallel_size is 2.*--tensor-parallel-size"):
        startup.prepare_speculative_config(spec(target_parallel_config=parallel))
    startup.prepare_speculative_config(spec(target_parallel_config=SimpleNamespace(pipeline_parallel_size=1)))


def test_startup_profile_is_skipped_under_tensor_parallelism_and_its_failure_is_explained(tmp_path, monkeypatch,
                                                                                          caplog):
    from dspark_vllm.vllm_plugin import startup_profile

    yaml = tmp_path / "s.yaml"
    yaml.write_text("scheduler:\n  policy: causal_greedy\n  profile_at_startup: true\n  profile_max_tokens: 16\n")
    monkeypatch.setenv(startup.ENV_CONFIG, str(yaml))
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("child engine exited with 1")

    monkeypatch.setattr(startup_profile, "ensure_startup_profile", failing)
    target = SimpleNamespace(model="/models/t", dtype="torch.float32", hf_config=None)
    tp2 = spec(target_model_config=target, target_parallel_config=SimpleNamespace(tensor_parallel_size=2,
                                                                                 pipeline_parallel_size=1))
    monkeypatch.setattr(startup, "_deepspec_block_size", lambda *a: 7)
    with caplog.at_level("WARNING"):
        startup.prepare_speculative_config(tp2)
    assert not calls and "profile_at_startup skipped" in caplog.text and "tensor_parallel_size 2" in caplog.text
    assert startup.WorkerSettings.from_env().cost_profile is None
    tp1 = spec(target_model_config=target, target_parallel_config=SimpleNamespace(tensor_parallel_size=1,
                                                                                 pipeline_parallel_size=1))
    with pytest.raises(startup.DSparkStartupError, match="could not profile /models/t .*profile_at_startup: false"):
        startup.prepare_speculative_config(tp1)
    assert len(calls) == 1


def test_the_v4_settings_do_not_profile_at_startup():
    from dspark_vllm.settings import load_settings

    assert not load_settings(CONFIGS_DIR / "deepseek_v4.yaml").scheduler.profile_at_startup
