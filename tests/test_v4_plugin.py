"""The vLLM plugin with a DeepSeek-V4 target: routing of a dspark config without a drafter path,
start-up validation, and the proposer drafting with the in-checkpoint drafter on a stub runner."""

import types

import pytest
import torch

pytest.importorskip("vllm")

from stub_runner import StubRunner  # noqa: E402
from v4_fixtures import BLOCK, tiny_v4_folder, tiny_v4_target  # noqa: E402

from dspark_vllm.settings import settings_from_dict  # noqa: E402
from dspark_vllm.v4 import DSparkV4Drafter  # noqa: E402
from dspark_vllm.v4.loader import load_v4_drafter  # noqa: E402
from dspark_vllm.vllm_plugin import startup  # noqa: E402
from dspark_vllm.vllm_plugin.proposer import DSparkV1Proposer  # noqa: E402

FIXED = {"scheduler": {"policy": "fixed"}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_v4_folder(tmp_path_factory.mktemp("v4"))


def v4_spec(folder, **kw):
    target = types.SimpleNamespace(model=str(folder), hf_config=tiny_v4_target().config, dtype=torch.float32)
    return types.SimpleNamespace(**{"model": None, "num_speculative_tokens": None, "target_model_config": target,
                                    "method": "dspark", **kw})


def test_a_v4_target_without_drafter_path_is_routed_to_its_mtp_stages(folder, monkeypatch, tmp_path):
    yaml = tmp_path / "fixed.yaml"
    yaml.write_text("scheduler:\n  policy: fixed\n")
    monkeypatch.setenv(startup.ENV_CONFIG, str(yaml))
    spec = v4_spec(folder)
    assert startup.claims(spec)
    startup.prepare_speculative_config(spec)
    assert (spec.method, spec.model, spec.num_speculative_tokens) == ("custom_class", startup.PROPOSER_PATH, BLOCK)
    worker = startup.WorkerSettings.from_env()
    assert worker.drafter_format == startup.IN_TARGET_V4 and worker.checkpoint == str(folder.resolve())


def test_v4_startup_errors_name_the_problem(folder, monkeypatch, tmp_path):
    import json
    import shutil

    monkeypatch.setenv(startup.ENV_CONFIG, "default")
    with pytest.raises(startup.DSparkStartupError, match="num_speculative_tokens is 3 .* dspark_block_size 4"):
        startup.prepare_speculative_config(v4_spec(folder, num_speculative_tokens=3))
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    index = json.loads((bare / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("mtp.")}
    (bare / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(startup.DSparkStartupError, match="ships no DSpark drafter"):
        startup.prepare_speculative_config(v4_spec(bare))
    other = v4_spec(folder)
    other.target_model_config.hf_config = types.SimpleNamespace(to_dict=lambda: {"model_type": "qwen3"})
    with pytest.raises(startup.DSparkStartupError, match="needs the drafter's folder in 'model'"):
        startup.prepare_speculative_config(other)  # a non-V4 target without a drafter path


def test_the_proposer_drafts_with_the_v4_drafter_over_its_paged_context(folder, monkeypatch):
    """On a stub runner: the proposer builds the V4 drafter, binds the served target's embedding,
    and drafts from the paged context exactly the block a dense context gives."""
    worker = startup.WorkerSettings.for_checkpoint(folder, settings_from_dict(FIXED),
                                                   drafter_format=startup.IN_TARGET_V4)
    monkeypatch.setenv(startup.ENV_WORKER, worker.to_json())
    config = types.SimpleNamespace(model_config=types.SimpleNamespace(dtype=torch.float32),
                                   scheduler_config=types.SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=256),
                                   cache_config=types.SimpleNamespace(enable_prefix_caching=False))
    p = DSparkV1Proposer(config)
    assert isinstance(p.drafter, DSparkV4Drafter) and not p.drafter.embeddings_bound
    p.load_model(tiny_v4_target())  # the served target's embed_tokens / lm_head
    assert p.drafter.embeddings_bound
    runner = StubRunner(["a"])
    p.attach(runner)
    p.bind_kv_cache(runner)
    assert p.pool.keys[0].shape[1:] == (1, p.drafter.config.head_dim)  # one K=V head
    drafts, aux = runner.step(p, [0], [20], sampled=[[7]], seed=3)
    assert len(drafts[0]) == BLOCK
    reference = load_v4_drafter(folder)
    cache = reference.new_cache(1)
    reference.add_context(cache, torch.cat(aux, -1)[None], torch.tensor([20]))
    block = reference.propose(torch.tensor([7]), cache, torch.zeros(1))
    assert drafts[0] == block.tokens[0].tolist()
