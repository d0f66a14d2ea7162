"""Left-to-right block sampling through the sequential head.

The parallel backbone gives base logits U [N, B, V] for the whole block at once; this loop adds
the head's transition bias position by position, samples d_k, and feeds it forward as prev.
The distributions q_k it sampled from are returned because rejection sampling needs them.

Temperature is per request; rows with temperature < GREEDY_EPS are drafted greedily (q is then
one-hot, which verification treats exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .heads import ConfidenceHead, MarkovHead

GREEDY_EPS = 1e-5
SEED_LIMIT = 2**31 - 1  # per-request draft seeds are drawn from [0, SEED_LIMIT): int32-safe in kernels
_MASK64 = 2**64 - 1


def derive_seed(seed: int, position: int) -> int:
    """The draft seed of a seeded request's block anchored at ``position``: a splitmix64 mix of
    both, in [0, SEED_LIMIT). A request's drafts are then a function of its own seed and
    position only, whatever else shares the batch (and identical on every rank)."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) % SEED_LIMIT


@dataclass
class DraftBlock:
    """One proposal per request.

    tokens: [N, B] draft tokens d_0..d_{B-1}.
    probs: [N, B, V] fp32 distributions the tokens were sampled from (one-hot rows for greedy
        requests); None when every request was drafted greedily.
    confidence_logits: [N, B] fp32 logits of c_k, or None without a confidence head.
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None
    confidence_logits: torch.Tensor | None = None


def is_greedy(temperature: torch.Tensor) -> torch.Tensor:
    return temperature < GREEDY_EPS


def safe_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """Temperature in fp32 with greedy rows set to 1, so dividing by it is always defined."""
    return torch.where(is_greedy(temperature), torch.ones_like(temperature), temperature).float()


def sample_logits(
    logits: torch.Tensor, temperature: torch.Tensor, generator: torch.Generator | None = None,
    greedy_all: bool | None = None, seeds: torch.Tensor | None = None, position: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [N, V]; return (tokens [N], probs [N, V] fp32).

    probs is softmax(logits / T) for sampled rows and one-hot(argmax) for greedy rows, i.e.
    always the exact distribution the token was drawn from. ``greedy_all``: whether every
    temperature is 0, when the caller already knows (else one device check). With ``seeds`` [N]
    the draw is Gumbel-max with the fused kernel's counter-based noise at block ``position``
    (a pure function of the row's seed); else ``torch.multinomial`` with ``generator``.
    """
    logits = logits.float()
    greedy = is_greedy(temperature)
    argmax = logits.argmax(dim=-1)
    if greedy_all is None:
        greedy_all = bool(greedy.all())
    if greedy_all:  # fast path: no softmax, q is one-hot
        return argmax, torch.nn.functional.one_hot(argmax, logits.shape[-1]).float()
    scaled = logits * (1.0 / safe_temperature(temperature))[:, None]  # as the fused kernel scales
    probs = torch.softmax(scaled, dim=-1)
    if seeds is not None:
        from .kernels.markov_reference import gumbel_noise

        sampled = (scaled + gumbel_noise(seeds.to(logits.device), position, logits.shape[-1], logits.device)).argmax(-1)
    else:
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    tokens = torch.where(greedy, argmax, sampled)
    one_hot = torch.nn.functional.one_hot(argmax, logits.shape[-1]).float()
    return tokens, torch.where(greedy[:, None], one_hot, probs)


def sample_block(
    base_logits: torch.Tensor,
    hidden: torch.Tensor,
    anchor: torch.Tensor,
    temperature: torch.Tensor,
    markov_head: MarkovHead | None,
    confidence_head: ConfidenceHead | None,
    confidence_with_markov: bool,
    generator: torch.Generator | None = None,
    vocab: torch.Tensor | None = None,
    greedy_all: bool | None = None,
    seeds: torch.Tensor | None = None,
) -> DraftBlock:
    """Draft a block left to right.

    base_logits [N, B, V] (fp32, already soft-capped for Gemma4: the bias is added after),
    hidden [N, B, H] final-normed backbone states, anchor [N] the block's first input token,
    temperature [N]. ``seeds`` [N]: per-row draft seeds (see :func:`sample_logits`; the fused
    kernel draws the same noise). With ``vocab`` [K] (a draft vocabulary) base_logits are [N, B, K] over those
    ids, tokens come back as target ids and probs stay [N, B, K] in vocab order.
    """
    n, block, _ = base_logits.shape
    if greedy_all is None:
        greedy_all = bool(is_greedy(temperature).all())
    prev = anchor
    state = None if markov_head is None else markov_head.init_state(n, hidden.device, hidden.dtype)
    tokens, probs = [], []
    for k in range(block):
        logits = base_logits[:, k]
        if markov_head is not None:
            bias, state = markov_head.step_bias(hidden[:, k], prev, state, vocab)
            logits = logits + bias
        if greedy_all:  # q is one-hot and never materialised
            tok = logits.argmax(dim=-1)
        else:
            tok, prob = sample_logits(logits, temperature, generator, greedy_all=False, seeds=seeds, position=k)
            probs.append(prob)
        if vocab is not None:
            tok = vocab[tok]
        tokens.append(tok)
        prev = tok
    tokens_t = torch.stack(tokens, dim=1)
    conf = None
    if confidence_head is not None:
        prev_tokens = torch.cat([anchor[:, None], tokens_t[:, :-1]], dim=1)
        prev_emb = markov_head.prev_embedding(prev_tokens) if (confidence_with_markov and markov_head) else None
        conf = confidence_head(hidden, prev_emb)
    return DraftBlock(tokens=tokens_t, probs=None if greedy_all else torch.stack(probs, dim=1),
                      confidence_logits=conf)
