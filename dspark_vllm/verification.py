"""Lossless verification: speculative rejection sampling (Leviathan et al.; Chen et al. 2023).

For request r with L_r verified drafts d_0..d_{L-1} drawn from q_k, and target distributions
p_0..p_L (p_k from the target's logits at the input position of d_k after the request's
temperature, top-k and top-p), each draft is accepted with probability min(1, p_k(d_k)/q_k(d_k))
until the first rejection; at a rejection at k the emitted token is drawn from
norm(max(p_k - q_k, 0)); if all L are accepted a bonus token is drawn from p_L. The emitted
sequence is then distributed exactly as sampling the target autoregressively.

Greedy requests (temperature ~ 0) accept while d_k equals the target's argmax and then emit the
argmax, which makes the output identical to greedy decoding of the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import is_greedy, safe_temperature

RESIDUAL_EPS = 1e-8


@dataclass
class VerificationResult:
    """num_accepted [N]: accepted drafts n_r (0..L_r); output_tokens [N, B+1]: the n_r accepted
    drafts followed by the correction/bonus token, padded with -1."""

    num_accepted: torch.Tensor
    output_tokens: torch.Tensor

    def emitted(self, row: int) -> list[int]:
        n = int(self.num_accepted[row])
        return [int(t) for t in self.output_tokens[row, : n + 1]]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits [N, S, V] outside each request's top-k set and top-p nucleus with -inf.

    top_k [N] (<= 0 or >= V: off), top_p [N] (>= 1: off). The nucleus keeps the smallest set of
    highest-probability tokens whose mass reaches top_p (the token crossing the threshold is kept).
    """
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    ranks = torch.arange(vocab, device=logits.device)
    if top_k is not None:
        k = torch.where((top_k <= 0) | (top_k >= vocab), torch.full_like(top_k, vocab), top_k)
        remove |= ranks.view(1, 1, vocab) >= k.view(-1, 1, 1)
    if top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= top_p.view(-1, 1, 1).float()
        remove[..., 0] = False
    mask = torch.zeros_like(remove).scatter(-1, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))


def target_probs(logits: torch.Tensor, temperature: torch.Tensor,
                 top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None) -> torch.Tensor:
    """Target distributions p [N, S, V] (fp32) for sampled requests: softmax(filter(logits) / T)."""
    t = safe_temperature(temperature)
    return torch.softmax(apply_top_k_top_p(logits.float(), top_k, top_p) / t.view(-1, 1, 1), dim=-1)


def verify(
    draft_tokens: torch.Tensor,               # [N, B]
    draft_probs: torch.Tensor | None,         # [N, B, V]; None: greedy drafts (one-hot q)
    draft_lens: torch.Tensor,                 # [N] in 0..B
    target_logits: torch.Tensor,              # [N, B+1, V]: row k scores the token after input k
    temperature: torch.Tensor,                # [N]
    top_k: torch.Tensor | None = None,        # [N]
    top_p: torch.Tensor | None = None,        # [N]
    generator: torch.Generator | None = None,
) -> VerificationResult:
    """Verify per-request draft prefixes against the target (inputs [anchor, d_0, ..., d_{B-1}])."""
    n, block = draft_tokens.shape
    device = draft_tokens.device
    draft_lens = draft_lens.to(device).long()
    pos = torch.arange(block, device=device)
    in_range = pos[None, :] < draft_lens[:, None]
    greedy = is_greedy(temperature.to(device))

    # Greedy requests: accept while the draft equals the target argmax.
    target_argmax = target_logits.argmax(dim=-1)  # [N, B+1]
    greedy_ok = (draft_tokens == target_argmax[:, :block]) & in_range
    rows = torch.arange(n, device=device)
    if bool(greedy.all()):
        num_accepted = _accepted_prefix(greedy_ok)
        return _emit(draft_tokens, num_accepted, target_argmax[rows, num_accepted])

    # Sampled requests: u < p(d)/q(d).
    p = target_probs(target_logits, temperature, top_k, top_p)  # [N, B+1, V]
    p_d = p[:, :block].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1)
    if draft_probs is None:
        q_d = torch.ones_like(p_d)
    else:
        q_d = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1).float()
    u = torch.rand(n, block, device=device, generator=generator)
    sampled_ok = (u * q_d.clamp_min(RESIDUAL_EPS) < p_d) & in_range

    ok = torch.where(greedy[:, None], greedy_ok, sampled_ok)
    num_accepted = _accepted_prefix(ok)  # [N]

    # Token emitted after the accepted prefix.
    greedy_next = target_argmax[rows, num_accepted]
    p_next = p[rows, num_accepted]  # [N, V]
    rejected = num_accepted < draft_lens
    if bool((~greedy & rejected).any()):
        idx = num_accepted.clamp(max=block - 1)
        if draft_probs is None:
            q_next = torch.nn.functional.one_hot(draft_tokens[rows, idx], p.shape[-1]).float()
        else:
            q_next = draft_probs[rows, idx].float()
        residual = (p_next - q_next).clamp_min(0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        residual = torch.where(mass > RESIDUAL_EPS, residual / mass.clamp_min(RESIDUAL_EPS), p_next)
        p_next = torch.where(rejected[:, None], residual, p_next)
    sampled_next = torch.multinomial(p_next, 1, generator=generator).squeeze(-1)
    next_token = torch.where(greedy, greedy_next, sampled_next)

    return _emit(draft_tokens, num_accepted, next_token)


def _accepted_prefix(ok: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of accepted positions per row: ok [N, B] -> [N]."""
    return ok.long().cumprod(dim=1).sum(dim=1)


def _emit(draft_tokens: torch.Tensor, num_accepted: torch.Tensor, next_token: torch.Tensor) -> VerificationResult:
    n, block = draft_tokens.shape
    rows = torch.arange(n, device=draft_tokens.device)
    pos = torch.arange(block, device=draft_tokens.device)
    out = torch.full((n, block + 1), -1, dtype=torch.long, device=draft_tokens.device)
    out[:, :block] = torch.where(pos[None, :] < num_accepted[:, None], draft_tokens, out[:, :block])
    out[rows, num_accepted] = next_token
    return VerificationResult(num_accepted=num_accepted, output_tokens=out)
