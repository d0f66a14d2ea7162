"""The model-runner patches: steps without drafts skip vLLM's rejection sampler."""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from dspark_vllm.vllm_plugin import patches  # noqa: E402
from dspark_vllm.vllm_plugin.patches import _plain_sampling_suffices  # noqa: E402
from dspark_vllm.vllm_plugin.proposer import DSparkV1Proposer  # noqa: E402


def sampling(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"max_num_logprobs": None, "logprob_token_ids": None,
                              "thinking_budget_state_holder": None, **kw})


def test_plain_sampling_only_when_no_request_has_drafts_and_no_logprobs():
    none = SimpleNamespace(num_draft_tokens=[0, 0, 0])
    assert _plain_sampling_suffices(none, sampling())
    assert not _plain_sampling_suffices(SimpleNamespace(num_draft_tokens=[0, 2, 0]), sampling())
    assert not _plain_sampling_suffices(none, sampling(max_num_logprobs=0))
    assert not _plain_sampling_suffices(none, sampling(logprob_token_ids={0: [5]}))
    tracked = SimpleNamespace(has_tracked_requests=lambda: True)
    assert not _plain_sampling_suffices(none, sampling(thinking_budget_state_holder=tracked))
    idle = SimpleNamespace(has_tracked_requests=lambda: False)
    assert _plain_sampling_suffices(none, sampling(thinking_budget_state_holder=idle))


class Recorder:
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def __call__(self, *args, **kwargs):
        self.calls.append(self.name)
        return self.name


def fake_runner(ours: bool, calls: list, **sampling_kw) -> SimpleNamespace:
    drafter = object.__new__(DSparkV1Proposer) if ours else object()
    return SimpleNamespace(
        drafter=drafter, use_async_scheduling=False, _draft_token_req_ids=None,
        input_batch=SimpleNamespace(sampling_metadata=sampling(**sampling_kw),
                                    update_async_output_token_ids=lambda: None),
        sampler=Recorder("sampler", calls), rejection_sampler=Recorder("rejection", calls),
        _get_spec_decode_draft_probs=lambda metadata: None)


@pytest.mark.parametrize("ours,drafts,logprobs,expected", [
    (True, [0, 0], None, "sampler"),       # the gate's plain steps: one token each, plain sampler
    (True, [0, 3], None, "rejection"),     # any draft in the batch: verification
    (True, [0, 0], 2, "rejection"),        # logprobs are laid out by the rejection path
    (False, [0, 0], None, "rejection"),    # other proposers are left alone
])
def test_runner_sample_routes_zero_draft_steps_to_the_plain_sampler(ours, drafts, logprobs, expected):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    patches.install()
    calls: list = []
    runner = fake_runner(ours, calls, max_num_logprobs=logprobs)
    metadata = SimpleNamespace(num_draft_tokens=drafts)
    assert GPUModelRunner._sample(runner, logits=object(), spec_decode_metadata=metadata) == expected
    assert calls == [expected]


def test_drafts_ride_on_the_step_output_and_post_step_skips_the_rpc():
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds, ModelRunnerOutput

    patches.install()
    drafts = DraftTokenIds(["a"], [[5, 6]])
    runner = SimpleNamespace(take_draft_token_ids=lambda: drafts)
    out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0})
    patches.attach_draft_token_ids(out, runner)
    assert getattr(out, patches.DRAFTS_ATTR) is drafts
    patches.attach_draft_token_ids(EMPTY_MODEL_RUNNER_OUTPUT, runner)  # vLLM's shared empty output
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, patches.DRAFTS_ATTR)

    calls: list = []
    scheduler = SimpleNamespace(_dspark_drafts_delivered=True, update_draft_token_ids=Recorder("update", calls))
    core = SimpleNamespace(scheduler=scheduler, check_for_draft_tokens=True, async_scheduling=False,
                           model_executor=SimpleNamespace(take_draft_token_ids=Recorder("rpc", calls)))
    EngineCore.post_step(core, True)  # drafts came with the output: no RPC, flag consumed
    assert calls == [] and scheduler._dspark_drafts_delivered is False
    EngineCore.post_step(core, True)  # an output without them: vLLM's own RPC path
    assert calls == ["rpc", "update"]


def test_draft_context_pool_takes_its_share_of_the_kv_budget():
    """Target T and drafter D bytes per token: the pool gets D / (T + D) of the budget, so vLLM's
    cache and the pool, one draft slot per target slot, fill the budget exactly."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    layer = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.float32)
    spec = {f"model.layers.{i}.self_attn.attn": layer for i in range(30)}  # SmolLM2: 46,080 B per token
    draft = 2 * 2 * 3 * 64 * 4  # 2 draft layers, K and V: 3,072 B per token
    worker = SimpleNamespace(model_runner=SimpleNamespace(
        get_kv_cache_spec=lambda: spec, drafter=SimpleNamespace(context_bytes_per_token=lambda: draft)))
    budget = 1 << 30
    share = patches.draft_context_share(worker, budget)
    assert share == budget // 16
    target_slots = (budget - share) // (30 * layer.page_size_bytes // 128)
    assert target_slots * draft <= share  # the pool for every target slot fits in its share


def test_install_wraps_the_kv_cache_hooks():
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    patches.install()
    patches.install()  # idempotent
    assert getattr(CPUWorker.determine_available_memory, "_dspark_wrapped", False)
    assert getattr(Worker.determine_available_memory, "_dspark_wrapped", False)
    assert GPUModelRunner.initialize_kv_cache.__wrapped__ is not None


def test_every_vllm_symbol_the_plugin_touches_exists():
    """The manifest of wrapped and read vLLM symbols resolves in the installed vLLM (a rename in
    a new vLLM release fails here, not in a served step)."""
    missing = []
    for patch in patches.PATCHES:
        assert patch.reason and patch.group
        try:
            patches.resolve_symbol(patch.symbol)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{patch.symbol}: {exc}")
    assert not missing, missing


def test_install_wraps_every_listed_symbol_once():
    patches.install()
    patches.install()
    for patch in patches.PATCHES:
        installed = patches.resolve_symbol(patch.symbol)
        if patch.wrapper is None:
            assert not getattr(installed, patches.WRAPPED, False), patch.symbol
            continue
        assert getattr(installed, patches.WRAPPED, False), patch.symbol
        assert not getattr(installed.__wrapped__, patches.WRAPPED, False), f"{patch.symbol} wrapped twice"


def test_a_required_patch_that_does_not_resolve_names_the_symbol(monkeypatch):
    broken = patches.Patch("vllm.v1.worker.gpu_model_runner.GPUModelRunner.no_such_method", patches.wrap_sample,
                           "test", "runner")
    monkeypatch.setattr(patches, "PATCHES", patches.PATCHES + (broken,))
    with pytest.raises(RuntimeError, match="cannot patch vLLM's runner.*no_such_method"):
        patches.install()
    optional = patches.Patch("vllm.no_such_module.Thing.method", patches.wrap_sample, "test", "elsewhere",
                             optional=True)
    monkeypatch.setattr(patches, "PATCHES", patches.PATCHES[:-1] + (optional,))
    patches.install()  # skipped with a debug line


def test_the_adapter_doc_lists_every_patched_symbol():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "vllm-adapter.md").read_text()
    missing = [p.symbol for p in patches.PATCHES if f"`{p.symbol.removeprefix('vllm.')}`" not in doc]
    assert not missing, f"docs/vllm-adapter.md does not list {missing}"
    unlisted = [w.name for w in patches.WRITES if f"`{w.name}`" not in doc]
    assert not unlisted, f"docs/vllm-adapter.md does not list the written attributes {unlisted}"


def test_every_attribute_the_plugin_writes_is_in_the_manifest():
    """Each setattr/assignment on a vLLM object in the adapter names an attribute of WRITES."""
    import re
    from pathlib import Path

    plugin = Path(patches.__file__).parent
    written = set()
    for path in plugin.glob("*.py"):
        text = path.read_text()
        written |= set(re.findall(r"\b(?:self|runner|output)\.(_dspark_\w+|_draft_prob\w*|use_aux_hidden_state_outputs)"
                                  r"\s*=", text))
        written |= {m for m in re.findall(r"setattr\(output, (\w+)", text)}
    names = {w.name for w in patches.WRITES} | {"DRAFTS_ATTR"}
    assert written and written <= names, f"written but not in patches.WRITES: {written - names}"
