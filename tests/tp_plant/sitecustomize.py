"""Negative control for the tensor-parallel digest check (test-only; on PYTHONPATH of one test).

Loaded at start-up by every process of the engine, vLLM's workers included: rank 1 drafts one
position shallower than the plan says, a deliberately rank-dependent decision that
``DSPARK_VLLM_TP_CHECK=1`` must catch.
"""

import os

if os.environ.get("DSPARK_TEST_RANK_DEPENDENT_DEPTH") == "1":
    from dspark_vllm.vllm_plugin import proposer as _proposer

    _pick = _proposer.DSparkV1Proposer._pick

    def _rank_dependent_pick(self, step, rows, load):
        picked, depth = _pick(self, step, rows, load)
        from vllm.distributed import get_tensor_model_parallel_rank

        if picked and get_tensor_model_parallel_rank() == 1 and depth > 1:
            depth -= 1
        return picked, depth

    _proposer.DSparkV1Proposer._pick = _rank_dependent_pick
