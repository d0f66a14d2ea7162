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
