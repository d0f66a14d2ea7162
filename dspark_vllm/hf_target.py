"""A Hugging Face transformers target model driven for speculative decoding.

The batch shares one KV cache laid out in *slots*: every verification forward appends S slots to
every request; slots holding rejected drafts (or padding) stay in the cache but are masked out
forever through the 2-D attention mask, and trailing slots rejected by every request are cropped.
Positions are passed explicitly, so RoPE sees each request's true token positions. With batch
size 1 this reduces to plain crop-on-reject rollback.

The drafter's context features are the raw outputs of the decoder layers named by
``target_layer_ids`` (HF ``hidden_states[id + 1]``; -1 = embedding output), concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class TargetStep:
    """logits [N, S, V] fp32 for the S fed tokens, features [N, S, m*H] for the drafter."""

    logits: torch.Tensor
    features: torch.Tensor


class HFTarget:
    """Wraps an HF causal LM: prefill, verify forwards over [anchor, drafts], rollback."""

    def __init__(self, model: torch.nn.Module, layer_ids: list[int]) -> None:
        self.model = model.eval()
        self.layer_ids = list(layer_ids)
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | None = None
        self.slot_valid = torch.zeros(0, 0, dtype=torch.bool)
        self.next_pos = torch.zeros(0, dtype=torch.long)

    @property
    def config(self):
        return self.model.config

    def _features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if not self.layer_ids:
            return hidden_states[0].new_zeros(*hidden_states[0].shape[:2], 0)
        return torch.cat([hidden_states[i + 1] for i in self.layer_ids], dim=-1)

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> TargetStep:
        self.slot_valid = torch.cat([self.slot_valid, valid], dim=1)
        out = self.model(
            input_ids=tokens.to(self.device),
            attention_mask=self.slot_valid.long().to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            output_hidden_states=True,
        )
        self.cache = out.past_key_values
        return TargetStep(out.logits.float(), self._features(out.hidden_states))

    def prefill(self, prompts: list[list[int]]) -> TargetStep:
        """Run the prompts (right-padded). Returns logits/features for every prompt position."""
        n, longest = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros(n, longest, dtype=torch.long)
        valid = torch.zeros(n, longest, dtype=torch.bool)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
            valid[i, : len(p)] = True
        self.cache = DynamicCache(config=self.model.config)
        self.slot_valid = torch.zeros(n, 0, dtype=torch.bool)
        self.next_pos = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        positions = torch.arange(longest)[None, :].expand(n, -1)
        return self._forward(tokens, valid, positions)

    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor) -> TargetStep:
        """Feed tokens [N, S] (first ``lengths[r]`` real) at each request's next positions.
        Call :meth:`commit` afterwards to keep only the accepted ones."""
        n, s = tokens.shape
        offs = torch.arange(s)[None, :]
        valid = offs < lengths[:, None].cpu()
        positions = self.next_pos[:, None] + offs
        self._pending = (s, valid)
        return self._forward(tokens, valid, positions)

    def commit(self, kept: torch.Tensor) -> None:
        """Keep the first ``kept[r]`` tokens of the last :meth:`extend`; mask out the rest."""
        s, valid = self._pending
        kept = kept.cpu().long()
        keep = torch.arange(s)[None, :] < kept[:, None]
        self.slot_valid[:, -s:] = valid & keep
        self.next_pos = self.next_pos + kept
        live = self.slot_valid.any(dim=0).nonzero()
        end = int(live.max()) + 1 if live.numel() else 0
        if end < self.slot_valid.shape[1]:
            self.cache.crop(end - self.slot_valid.shape[1])  # negative: drop trailing slots
            self.slot_valid = self.slot_valid[:, :end]
