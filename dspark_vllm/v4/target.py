"""A transformers DeepSeek-V4 target for the reference decoder: exact rollback by replay.

V4's cache cannot be cropped: sliding-window layers drop old entries and the compressed layers
carry running compressor state. So each request keeps its own cache; before a verify forward
the caches are snapshotted, and on commit a request that rejected drafts is restored and fed
just the tokens it kept (one more forward), which leaves exactly the cache plain decoding would
have. Rows run one at a time (their caches differ in length).

Features for the drafter are each tapped layer's output, averaged over its ``hc_mult`` streams
(:class:`~dspark_vllm.layer_taps.LayerTaps`).
"""

from __future__ import annotations

import copy

import torch

from ..hf_target import TargetStep
from ..layer_taps import LayerTaps


class V4Target:
    """Same interface as :class:`~dspark_vllm.hf_target.HFTarget`: prefill, extend, commit."""

    def __init__(self, model: torch.nn.Module, layer_ids: list[int]) -> None:
        self.model = model.eval()
        self.layer_ids = list(layer_ids)
        self.device = next(model.parameters()).device
        self.caches: list = []
        self.next_pos = torch.zeros(0, dtype=torch.long)
        self.taps = LayerTaps(model, self.layer_ids)
        self._pending: tuple | None = None

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def _run(self, row: int, tokens: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed tokens [S] to request ``row`` from position ``start``: (logits [S, V], features [S, m*H])."""
        from transformers import DynamicCache

        if self.caches[row] is None:
            self.caches[row] = DynamicCache(config=self.model.config)
        s = tokens.shape[0]
        out = self.model(input_ids=tokens[None].to(self.device), position_ids=torch.arange(start, start + s)[None].to(self.device),
                         past_key_values=self.caches[row], use_cache=True)
        self.caches[row] = out.past_key_values
        return out.logits[0].float(), self.taps.features()[0].float()

    def _padded(self, parts: list[tuple[torch.Tensor, torch.Tensor] | None], width: int) -> TargetStep:
        ref = next(p for p in parts if p is not None)
        logits = ref[0].new_zeros(len(parts), width, ref[0].shape[-1])
        feats = ref[1].new_zeros(len(parts), width, ref[1].shape[-1])
        for r, p in enumerate(parts):
            if p is not None:
                logits[r, : p[0].shape[0]], feats[r, : p[1].shape[0]] = p
        return TargetStep(logits, feats)

    def prefill(self, prompts: list[list[int]]) -> TargetStep:
        """Prompts run one by one; a repeated prompt copies the first one's cache and outputs."""
        self.caches = [None] * len(prompts)
        self.next_pos = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        seen: dict[tuple[int, ...], int] = {}
        parts = []
        for r, prompt in enumerate(prompts):
            first = seen.setdefault(tuple(prompt), r)
            if first == r:
                parts.append(self._run(r, torch.tensor(prompt), 0))
            else:
                self.caches[r] = copy.deepcopy(self.caches[first])
                parts.append(parts[first])
        return self._padded(parts, max(len(p) for p in prompts))

    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor) -> TargetStep:
        """Feed the first ``lengths[r]`` of tokens [N, S] to each request; :meth:`commit` keeps some."""
        snapshot = [copy.deepcopy(c) for c in self.caches]
        parts = [self._run(r, tokens[r, : int(n)], int(self.next_pos[r])) if int(n) > 0 else None
                 for r, n in enumerate(lengths.tolist())]
        self._pending = (tokens, lengths.clone(), snapshot)
        if all(p is None for p in parts):
            v, w = self.model.config.vocab_size, len(self.layer_ids) * self.model.config.hidden_size
            return TargetStep(torch.zeros(len(parts), tokens.shape[1], v), torch.zeros(len(parts), tokens.shape[1], w))
        return self._padded(parts, tokens.shape[1])

    def commit(self, kept: torch.Tensor) -> None:
        """Keep the first ``kept[r]`` tokens of the last :meth:`extend` (replaying when fewer than fed)."""
        tokens, lengths, snapshot = self._pending
        for r, (k, n) in enumerate(zip(kept.tolist(), lengths.tolist())):
            if k < n:
                self.caches[r] = snapshot[r]
                if k > 0:
                    self._run(r, tokens[r, :k], int(self.next_pos[r]))
        self.next_pos = self.next_pos + kept.cpu().long()
        self._pending = None
