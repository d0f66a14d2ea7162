"""Test-only DSpark proposer whose drafts are known continuations (not shipped in the package).

``tests/vllm_engine.py`` routes ``method: dspark`` here when ``DSPARK_VLLM_ORACLE`` names a JSON
file of full token sequences (prompt + continuation): a request whose history is a prefix of one
gets the next block as drafts, draft ``DSPARK_VLLM_ORACLE_CORRUPT`` changed. The real drafter
still runs (its cost and confidences are the product's); only its tokens are replaced, and every
ready request drafts the full block (the gate is bypassed), so the accept path is proven
independently of drafter quality.
"""

from __future__ import annotations

import os

from dspark_vllm.oracle import OracleDrafts
from dspark_vllm.scheduler import StepLoad
from dspark_vllm.vllm_plugin.proposer import DSparkV1Proposer
from dspark_vllm.vllm_plugin.request_contexts import RequestState
from dspark_vllm.vllm_plugin.runner_io import StepDrafts, StepInput

ENV_ORACLE = "DSPARK_VLLM_ORACLE"
ENV_ORACLE_CORRUPT = "DSPARK_VLLM_ORACLE_CORRUPT"
PATH = "oracle_proposer.OracleV1Proposer"  # what vLLM's custom_class hook imports


class OracleV1Proposer(DSparkV1Proposer):
    def __init__(self, vllm_config) -> None:
        super().__init__(vllm_config)
        corrupt = os.environ.get(ENV_ORACLE_CORRUPT)
        self.oracle = OracleDrafts.from_json(os.environ[ENV_ORACLE], self.block_size, self.drafter.config.vocab_size,
                                             int(corrupt) if corrupt not in (None, "") else None)

    def _pick(self, step: StepInput, rows: list[int], load: StepLoad) -> tuple[list[int], int]:
        return list(range(len(rows))), self.block_size

    def _draft(self, step: StepInput, rows: list[int], states: list[RequestState], depth: int, load: StepLoad,
               ready: int) -> StepDrafts:
        drafts = super()._draft(step, rows, states, depth, load, ready)
        for i, tokens in enumerate(drafts.tokens):
            known = self.oracle.after(step.history(i)) if tokens else None
            if known is not None:
                drafts.tokens[i] = known[: len(tokens)]
        return drafts
