"""DeepSpec checkpoint round trip and every target-mismatch error."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dspark_vllm.checkpoint import (
    CheckpointMismatchError,
    build_drafter_config,
    build_random_drafter,
    load_checkpoint,
    save_checkpoint,
    validate_against_target,
)
from dspark_vllm.drafter_config import DSparkConfig, DSparkConfigError
from conftest import make_tiny_qwen3


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, tiny_qwen3, head_type, dtype):
    drafter = build_random_drafter(tiny_qwen3, num_layers=2, block_size=5, markov_rank=8,
                                   markov_head_type=head_type, dtype=dtype)
    save_checkpoint(drafter, tmp_path)
    loaded = load_checkpoint(tmp_path, target=tiny_qwen3)
    a, b = drafter.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert loaded.config.raw == json.loads(json.dumps(drafter.config.raw))
    assert loaded.markov_head.head_type == head_type


def test_tensor_names_follow_deepspec(tmp_path, tiny_qwen3):
    drafter = build_random_drafter(tiny_qwen3, num_layers=1, markov_rank=8, markov_head_type="rnn")
    save_checkpoint(drafter, tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    h, v, r = 64, 128, 8
    m = len(drafter.config.target_layer_ids)
    shapes = {
        "embed_tokens.weight": (v, h), "fc.weight": (h, m * h), "hidden_norm.weight": (h,),
        "norm.weight": (h,), "lm_head.weight": (v, h),
        "markov_head.markov_w1.weight": (v, r), "markov_head.markov_w2.weight": (v, r),
        "markov_head.joint_proj.weight": (3 * r, 2 * r + h), "markov_head.joint_proj.bias": (3 * r,),
        "confidence_head.proj.weight": (1, h + r), "confidence_head.proj.bias": (1,),
        "layers.0.self_attn.q_proj.weight": (4 * 16, h), "layers.0.self_attn.k_proj.weight": (2 * 16, h),
        "layers.0.self_attn.q_norm.weight": (16,), "layers.0.mlp.gate_proj.weight": (128, h),
    }
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name, shape in shapes.items():
        assert name in names, name
        assert tuple(tensors[name].shape) == shape, name
    assert not any("rotary" in n for n in names)


def test_embeddings_are_copied_from_target(tiny_qwen3):
    drafter = build_random_drafter(tiny_qwen3, markov_rank=8)
    assert torch.equal(drafter.embed_tokens.weight, tiny_qwen3.model.embed_tokens.weight)
    assert torch.equal(drafter.lm_head.weight, tiny_qwen3.lm_head.weight)


@pytest.fixture
def saved(tmp_path, tiny_qwen3):
    drafter = build_random_drafter(tiny_qwen3, num_layers=1, block_size=7, markov_rank=8,
                                   target_layer_ids=[0, 1])
    save_checkpoint(drafter, tmp_path)
    return tmp_path


def test_vocab_mismatch(saved):
    other = make_tiny_qwen3(vocab_size=256)
    with pytest.raises(CheckpointMismatchError, match=r"vocab_size is 128 in the drafter checkpoint but 256 in the target"):
        load_checkpoint(saved, target=other)


def test_hidden_size_mismatch(saved, tiny_qwen3):
    cfg = tiny_qwen3.config.to_dict() | {"hidden_size": 96}
    with pytest.raises(CheckpointMismatchError, match=r"hidden_size is 64 in the drafter checkpoint but 96 in the target"):
        load_checkpoint(saved, target=cfg)


def test_layer_ids_outside_target_depth(saved):
    shallow = make_tiny_qwen3(layers=2)
    with pytest.raises(CheckpointMismatchError, match=r"target_layer_ids \[0, 1\] contains \[1\].*-1\.\.0"):
        load_checkpoint(saved, target=shallow)


def test_num_target_layers_mismatch(saved):
    deeper = make_tiny_qwen3(layers=6)
    with pytest.raises(CheckpointMismatchError, match=r"num_target_layers is 4 in the drafter checkpoint but 6"):
        load_checkpoint(saved, target=deeper)


def test_block_size_mismatch(saved, tiny_qwen3):
    with pytest.raises(CheckpointMismatchError, match=r"num_speculative_tokens is 5 but the drafter was trained with block_size 7.*set num_speculative_tokens to 7"):
        load_checkpoint(saved, target=tiny_qwen3, block_size=5)
    assert load_checkpoint(saved, target=tiny_qwen3, block_size=7).block_size == 7


def test_unknown_head_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["markov_head_type"] = "lstm"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DSparkConfigError, match=r"markov_head_type is 'lstm'; supported: vanilla, gated, rnn"):
        load_checkpoint(saved)


def test_head_type_that_disagrees_with_tensors(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["markov_head_type"] = "gated"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"missing \['markov_head.gate_proj.bias', 'markov_head.gate_proj.weight'\]"):
        load_checkpoint(saved)


def test_unsupported_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    with pytest.raises(DSparkConfigError, match="architectures\\[0\\] is 'LlamaForCausalLM'"):
        DSparkConfig(cfg)


def test_missing_key_named():
    with pytest.raises(DSparkConfigError, match="missing required key 'target_layer_ids'"):
        DSparkConfig({"vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1, "block_size": 2,
                      "mask_token_id": 1, "architectures": ["Qwen3DSparkModel"]})


def test_config_validates_on_build(tiny_qwen3):
    cfg = build_drafter_config(tiny_qwen3, target_layer_ids=[0, 2])
    validate_against_target(cfg, tiny_qwen3)
    with pytest.raises(CheckpointMismatchError):
        build_drafter_config(tiny_qwen3, target_layer_ids=[3])  # last layer is excluded


def test_drafter_mlp_width_is_stored_and_reloaded(tmp_path):
    from conftest import make_tiny_qwen3
    from dspark_vllm.checkpoint import build_random_drafter, load_checkpoint, load_config, save_checkpoint

    target = make_tiny_qwen3()
    drafter = build_random_drafter(target, num_layers=1, block_size=4, markov_rank=8, intermediate_size=48)
    assert drafter.layers[0].mlp.up_proj.out_features == 48
    save_checkpoint(drafter, tmp_path)
    assert load_config(tmp_path).raw["intermediate_size"] == 48
    assert load_checkpoint(tmp_path, target=target).layers[0].mlp.up_proj.out_features == 48
