"""bench context_memory: the pool against a dense cache, and the drafter's bounded workspace."""

from dspark_vllm.bench.context_memory import main, workspace_report


def test_workspace_is_bounded_by_its_share_of_the_budget_and_caps_drafting(capsys):
    for max_num_seqs in (256, 1024):
        for row in workspace_report(max_num_seqs, None):
            assert row["reserved"] <= row["unbounded"] and row["reserved"] <= 0.08 * row["budget"] + 1
            assert 1 <= row["cap"] <= max_num_seqs
            assert row["cap"] == max_num_seqs or row["reserved"] < row["unbounded"]  # capped only when bounded
    qwen = workspace_report(1024, None)[1]
    assert qwen["unbounded"] > 12 * 2**30 and qwen["cap"] < 1024  # 1024 x 7 x 151,936 x 12 B would not fit
    assert main(["--max-num-seqs", "256"]) == 0
    assert "drafter workspace per step" in capsys.readouterr().out
