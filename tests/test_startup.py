"""Start-up without an engine: validation errors, routing, and the worker's one settings object."""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from dspark_vllm.drafters import SMOLLM2_DRAFTER  # noqa: E402
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
    assert settings.resolve(settings.scheduler.cost_profile).exists()  # relative paths still resolve


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
