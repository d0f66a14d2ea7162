"""The acceptance benchmark's suite: held-out windows of every shared prompt set, one table."""

import json

import pytest

from dspark_vllm.bench.acceptance import main, suite_table
from dspark_vllm.prompts import TRAIN_WINDOWS, held_out_specs


def write_set(folder, name: str, n: int) -> None:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps({"turns": [f"{name} question {i}?"]}) + "\n"
                                                  for i in range(n)))


def test_held_out_windows_cover_every_set_and_never_touch_training(tmp_path):
    write_set(tmp_path, "gsm8k", 600)  # trains on 0-519
    write_set(tmp_path, "chat", 20)     # no training window
    specs = held_out_specs(tmp_path, 12)
    assert specs == [f"{tmp_path}/chat.jsonl:8:20", f"{tmp_path}/gsm8k.jsonl:588:600"]
    assert 588 >= TRAIN_WINDOWS["gsm8k"][1]


def test_a_window_overlapping_training_is_refused(tmp_path):
    (tmp_path / "mbpp.jsonl").write_text("".join(json.dumps({"turns": [f"q{i}"]}) + "\n" for i in range(205)))
    with pytest.raises(ValueError, match="overlap the training window"):
        held_out_specs(tmp_path, 12)


def test_suite_table_lists_every_dataset_and_the_worst():
    rows = [{"dataset": d, "drafter": "dspark", "temperature": t, "tau": tau}
            for d, t, tau in (("gsm8k", 0.0, 3.1), ("chat", 0.0, 1.4), ("gsm8k", 1.0, 2.5), ("chat", 1.0, 1.2))]
    table = suite_table(rows).splitlines()
    assert "dspark T=0" in table[2] and "dspark T=1" in table[2]
    assert table[-1].split() == ["min", "1.400", "1.200"]


@pytest.mark.slow
def test_suite_runs_the_shipped_drafter_on_every_set(tmp_path, capsys):
    from dspark_vllm.drafters import SMOLLM2_DRAFTER

    sets = tmp_path / "sets"
    sets.mkdir()
    for name in ("chat", "math"):
        write_set(sets, name, 5)
    out = tmp_path / "suite.json"
    main(["--drafter", f"dspark={SMOLLM2_DRAFTER}", "--suite", "--suite-size", "1", "--datasets-dir", str(sets),
          "--max-new-tokens", "6", "--temperatures", "0", "1", "--json", str(out), "--plot", str(tmp_path / "s.png")])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["dataset"], r["temperature"]) for r in rows} == {(d, t) for d in ("chat", "math") for t in (0.0, 1.0)}
    assert all(r["tau"] >= 1.0 for r in rows) and all(r["identical_to_plain"] for r in rows if r["temperature"] == 0)
    assert (tmp_path / "s.png").exists() and "held-out windows" in capsys.readouterr().out


def test_prompt_sets_come_from_the_flag_or_the_variable_never_a_guess(tmp_path, monkeypatch):
    from dspark_vllm.prompts import ENV_DATASETS, DatasetsNotFound, datasets_dir, resolve_spec

    monkeypatch.delenv(ENV_DATASETS, raising=False)
    with pytest.raises(DatasetsNotFound, match="pass --datasets-dir DIR or set DSPARK_VLLM_DATASETS"):
        datasets_dir()
    with pytest.raises(DatasetsNotFound, match="holds no \\*.jsonl prompt sets"):
        datasets_dir(tmp_path)
    (tmp_path / "gsm8k.jsonl").write_text('{"turns": ["q"]}\n')
    assert datasets_dir(tmp_path) == tmp_path
    monkeypatch.setenv(ENV_DATASETS, str(tmp_path))
    assert resolve_spec("gsm8k.jsonl:0:1") == f"{tmp_path}/gsm8k.jsonl:0:1"
    existing = tmp_path / "gsm8k.jsonl"
    assert resolve_spec(f"{existing}:0:1", explicit_dir="/nowhere") == f"{existing}:0:1"


def test_ngram_lookup_proposes_what_followed_the_latest_match():
    from dspark_vllm.reference_proposers import NgramProposer

    p = NgramProposer(k=3, min_n=2, max_n=3, vocab_size=100)
    assert p.lookup([1, 2, 3, 4, 5, 9, 2, 3]) == [4, 5, 9]             # [2, 3] matched at 1
    assert p.lookup([7, 1, 2, 8, 0, 1, 2, 6, 6, 1, 2]) == [6, 6, 1]     # the latest of two matches
    assert p.lookup([5, 6, 7, 8]) == []                                # no earlier occurrence
    assert p.lookup([1, 2, 3, 9, 1, 2, 3]) == [9, 1, 2]                # the longest n first


@pytest.mark.slow
def test_ngram_peer_is_lossless_and_drafts_on_repetitive_text(tmp_path):
    """Through the reference decoder over the real SmolLM2 target: greedy output equal to plain
    decoding, and drafts accepted where the answer repeats the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from dspark_vllm.acceptance_stats import AcceptanceStats
    from dspark_vllm.bench.acceptance import found_lengths
    from dspark_vllm.hf_target import HFTarget
    from dspark_vllm.pypi_models import smollm2_path
    from dspark_vllm.reference_decoder import ReferenceDecoder, SamplingConfig
    from dspark_vllm.reference_proposers import NgramProposer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path()), dtype=torch.float32).eval()
    prompt = [[504, 2365, 282, 4649, 314, 7042, 30, 504, 2365, 282, 4649, 314, 7042, 30, 504, 2365]]
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.0)
    plain, _ = ReferenceDecoder(HFTarget(model, []), None).generate(prompt, sampling)
    proposer = NgramProposer(k=4, min_n=1, max_n=3, vocab_size=model.config.vocab_size)
    out, stats = ReferenceDecoder(HFTarget(model, []), proposer, verify_lengths=found_lengths).generate(prompt, sampling)
    assert out == plain
    assert isinstance(stats, AcceptanceStats) and stats.accepted_tokens > 0 and stats.tau > 1.0
