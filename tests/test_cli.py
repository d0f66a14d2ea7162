"""The README's main job (demo) and the tools run end to end on the real SmolLM2 target."""

import json

import pytest

from dspark_vllm.cli import main


@pytest.mark.slow
def test_demo_serves_with_vllm_and_prints_measured_figures(capsys):
    """The README's main command: two `vllm serve` runs, OpenAI client, figures from /metrics."""
    assert main(["demo", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert out.count("[identical to no speculation: True]") == 4
    assert "mean acceptance length" in out and "speed-up" in out
    assert "greedy answers identical to no speculation: True" in out


@pytest.mark.slow
def test_reference_demo_prints_measured_figures(capsys):
    assert main(["demo", "--engine", "reference", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "identical to plain greedy: True" in out
    assert "acceptance length tau = " in out and "speed-up" in out


@pytest.mark.slow
def test_calibrate_and_compare_policies(capsys, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"turns": [t]}) for t in ["Say hi.", "Count to three."]) + "\n")
    assert main(["calibrate", "--dataset", str(data), "--limit", "2", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "cal.json"), "--plot", str(tmp_path / "rel.png")]) == 0
    assert len(json.loads((tmp_path / "cal.json").read_text())["temperatures"]) == 7
    assert (tmp_path / "rel.png").stat().st_size > 0
    assert main(["compare-policies", "--dataset", str(data), "--limit", "2", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("identical=True") == 3
