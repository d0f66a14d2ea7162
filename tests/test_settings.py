from pathlib import Path

import pytest
import torch

from dspark_vllm.scheduler import VerifyLengthScheduler
from dspark_vllm.sampling import DraftBlock
from dspark_vllm.settings import SettingsError, load_settings, settings_from_dict

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    settings = load_settings(path)
    block = settings.num_speculative_tokens or 7
    sched = VerifyLengthScheduler.from_settings(settings, block_size=block)
    lens = sched(DraftBlock(tokens=torch.zeros(2, block, dtype=torch.long), probs=None,
                            confidence_logits=torch.full((2, block), 2.0)))
    assert lens.shape == (2,) and (lens >= 0).all() and (lens <= block).all()


def test_default_and_family_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "qwen3.yaml", "gemma4.yaml", "deepseek_v4.yaml", "llama-smollm2.yaml"} <= names


def test_bad_policy_names_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("scheduler:\n  policy: fastest\n")
    with pytest.raises(SettingsError, match=r"bad.yaml: invalid DSpark settings: scheduler.policy: unknown policy"):
        load_settings(f)


def test_unknown_key_and_range(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("scheduler:\n  polcy: fixed\n")
    with pytest.raises(SettingsError, match=r"scheduler.polcy: Extra inputs are not permitted"):
        load_settings(f)
    with pytest.raises(SettingsError, match=r"scheduler.threshold: Input should be less than or equal to 1"):
        settings_from_dict({"scheduler": {"threshold": 3}})
    with pytest.raises(SettingsError, match=r"scheduler.threshold must be > 0 when scheduler.policy is 'threshold'"):
        settings_from_dict({"scheduler": {"policy": "threshold"}})


def test_invalid_yaml_and_missing_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("scheduler: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(f)
    with pytest.raises(SettingsError, match="cannot read DSpark settings"):
        load_settings(tmp_path / "nope.yaml")
    g = tmp_path / "list.yaml"
    g.write_text("- a\n")
    with pytest.raises(SettingsError, match="expected a mapping"):
        load_settings(g)


def test_relative_paths_resolve_against_file(tmp_path):
    from dspark_vllm.scheduler import CostProfile

    CostProfile(tokens=[1, 8], step_ms=[5.0, 6.0]).save(tmp_path / "cost.json")
    f = tmp_path / "s.yaml"
    f.write_text("scheduler:\n  policy: causal_greedy\n  cost_profile: cost.json\n")
    sched = VerifyLengthScheduler.from_settings(load_settings(f), block_size=4)
    assert sched.policy.cost.profile.tokens == [1, 8]


def test_policy_without_confidence_head_is_explained():
    sched = VerifyLengthScheduler.from_settings(settings_from_dict({}), block_size=4)
    with pytest.raises(ValueError, match="needs the drafter.s confidence head.*policy: fixed"):
        sched(DraftBlock(tokens=torch.zeros(1, 4, dtype=torch.long), probs=None))
