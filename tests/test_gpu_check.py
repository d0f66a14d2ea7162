"""The GPU check script runs end to end in its reduced size on CPU (Triton interpreter), so the
device session only has to run it: kernel checks pass, the drafter step makes two host syncs at
every batch size, and the target comparison produces a ratio."""

import json

from dspark_vllm.bench import gpu_check


def test_gpu_check_small_runs_and_reports(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--small", "--skip", "speed", "--draft-layers", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    kernels = rows["kernels"]
    assert len(kernels) == 2 * 2 * 2 * 2 and all(r["ok"] and r["tokens_equal"] for r in kernels)
    assert [r["host_syncs"] for r in rows["step_1_layers"]] == [2, 2]
    assert all(r["target_ms"] > 0 and r["ratio"] > 0 for r in rows["target_vs_1_layers"])
    moe = rows["moe"]  # grouped expert kernel (interpreter) vs the dense path, MXFP4 and bf16
    assert len(moe) == 4 and all(r["ok"] and r["backend"] == "triton" for r in moe)
