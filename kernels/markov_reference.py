"""PyTorch reference of the fused Markov-head sampling kernel (the semantics the kernel matches).

For request n and block position k = 0..B-1, with prev_0 = anchor and prev_k = d_{k-1}:

    e_k    = W1[prev_k]                                 (r)
    z_k    = U_k + W2 e_k                               (V, fp32; W2 stored [V, r])
    d_k    = argmax_v z_k[v]                            (greedy, temperature 0)
           = argmax_v z_k[v] / T + g_k[v]               (sampled: Gumbel-max, g = -log(-log u))
    lse_k  = logsumexp(z_k / T)                         (q_k(v) = exp(z_k[v] / T - lse_k))
    conf_k = w_h . h_k + w_e . e_k + b                  (confidence logit, fp32)

The uniforms u come from a counter-based hash of (seed_n, k * V + v), so a request's draft is a
pure function of its seed: the Triton kernel and this reference draw the same noise, and results
do not depend on batch composition. All arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

from ..sampling import GREEDY_EPS

MASK32 = 0xFFFFFFFF


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """1/T in fp32, with 1 for greedy rows (their scores are the raw logits)."""
    greedy = temperature < GREEDY_EPS
    return torch.where(greedy, torch.ones_like(temperature), 1.0 / temperature.clamp_min(GREEDY_EPS)).float()


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer hash (Wellons' lowbias32) on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def uniform_from_counter(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """u in (0, 1) from (seed [N, 1], counter [..]) -> fp32, identical bits to the kernel."""
    s = _lowbias32(seed.long() & MASK32)
    x = _lowbias32((counter.long() ^ s) & MASK32)
    return ((x >> 8).float() + 0.5) * (1.0 / 16777216.0)


def gumbel_noise(seed: torch.Tensor, position: int, vocab: int, device=None) -> torch.Tensor:
    counter = position * vocab + torch.arange(vocab, device=device)
    u = uniform_from_counter(seed.view(-1, 1), counter.view(1, -1))
    return -torch.log(-torch.log(u))


def markov_sample_reference(
    base_logits: torch.Tensor,                # [N, B, V]
    w1: torch.Tensor,                         # [V, r]
    w2: torch.Tensor,                         # [V, r]
    anchor: torch.Tensor,                     # [N]
    temperature: torch.Tensor,                # [N]
    seeds: torch.Tensor,                      # [N]
    hidden: torch.Tensor | None = None,       # [N, B, H]: the confidence head's input
    conf_weight: torch.Tensor | None = None,  # [H + r]
    conf_bias: torch.Tensor | None = None,    # [1]
    all_greedy: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reference: (tokens [N, B] int64, lse [N, B] fp32, conf_logits [N, B] fp32 or None)."""
    n, block, vocab = base_logits.shape
    greedy = temperature < GREEDY_EPS
    inv_t = inverse_temperature(temperature)
    w2f = w2.float()
    prev = anchor.long()
    if all_greedy is None:  # callers that know it from host data save this device check
        all_greedy = bool(greedy.all())
    tokens, lses, confs = [], [], []
    for k in range(block):
        e = w1[prev].float()
        z = base_logits[:, k].float() + e @ w2f.T
        scaled = z * inv_t[:, None]
        lses.append(torch.logsumexp(scaled, dim=-1))
        if all_greedy:  # no noise to draw: same result, without hashing V counters per row
            score = z
        else:
            score = torch.where(greedy[:, None], z, scaled + gumbel_noise(seeds, k, vocab, z.device))
        if conf_weight is not None and hidden is not None:
            h = hidden.shape[-1]
            conf = hidden[:, k].float() @ conf_weight[:h].float() + e @ conf_weight[h:].float()
            confs.append(conf + conf_bias.float())
        prev = score.argmax(dim=-1)
        tokens.append(prev)
    conf_out = torch.stack(confs, 1) if confs else None
    return torch.stack(tokens, 1), torch.stack(lses, 1), conf_out


def markov_draft_probs(base_logits: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, anchor: torch.Tensor,
                       tokens: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Recompute the draft distributions q [N, B, V] (one-hot rows for greedy requests) from the
    sampled tokens, for rejection sampling of probabilistic drafts."""
    prev = torch.cat([anchor.view(-1, 1).long(), tokens[:, :-1]], dim=1)
    z = base_logits.float() + w1[prev].float() @ w2.float().T
    greedy = temperature < GREEDY_EPS
    inv_t = inverse_temperature(temperature)
    probs = torch.softmax(z * inv_t.view(-1, 1, 1), dim=-1)
    one_hot = torch.nn.functional.one_hot(tokens, z.shape[-1]).float()
    return torch.where(greedy.view(-1, 1, 1), one_hot, probs)
