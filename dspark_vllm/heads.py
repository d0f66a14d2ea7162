"""DSpark's sequential heads: Markov transition bias and confidence (paper Eq. 5-7).

All heads share one interface so the left-to-right sampler does not care which one it drives:
``init_state`` -> per-request recurrent state (None for stateless heads), ``step_bias`` -> the
bias B_k added to the base logits U_k of block position k given the previous token.

Tensor names follow DeepSpec (``markov_w1``, ``markov_w2``, ``gate_proj``, ``joint_proj``,
``proj``) so ``state_dict()`` is the checkpoint format.
"""

from __future__ import annotations

import torch
from torch import nn


class MarkovHead(nn.Module):
    """Low-rank first-order transition bias B(prev, .) = W1[prev] W2 (paper Eq. 5).

    ``markov_w1`` is the [V, r] embedding W1; ``markov_w2`` is a Linear(r -> V) whose weight is
    stored [V, r] (the transpose of the paper's W2).
    """

    head_type = "vanilla"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rank = rank
        self.hidden_size = hidden_size
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    def prev_embedding(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """W1[prev]: the r-dim Markov feature of the previous token (also feeds the confidence head)."""
        return self.markov_w1(prev_tokens)

    def project(self, latent: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Map an r-dim latent to a V-dim logit bias with W2, in fp32 (only the ``vocab`` rows
        when given: training on a vocabulary subset)."""
        if vocab is None:
            return self.markov_w2(latent).float()
        return (latent @ self.markov_w2.weight[vocab].t()).float()

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        return None

    def step_bias(
        self, hidden: torch.Tensor, prev_tokens: torch.Tensor, state: torch.Tensor | None,
        vocab: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bias for one block position. hidden [N, H], prev_tokens [N] -> ([N, V] fp32, state)."""
        return self.project(self.prev_embedding(prev_tokens), vocab), state

    def block_bias(self, hidden: torch.Tensor, prev_tokens: torch.Tensor,
                   vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced biases for a whole block: hidden [N, B, H], prev [N, B] -> [N, B, V]."""
        state = self.init_state(hidden.shape[0], hidden.device, hidden.dtype)
        out = []
        for k in range(hidden.shape[1]):
            bias, state = self.step_bias(hidden[:, k], prev_tokens[:, k], state, vocab)
            out.append(bias)
        return torch.stack(out, dim=1)


class VanillaMarkovHead(MarkovHead):
    """The paper's default head; stateless, so the block bias is one batched GEMM."""

    def block_bias(self, hidden: torch.Tensor, prev_tokens: torch.Tensor,
                   vocab: torch.Tensor | None = None) -> torch.Tensor:
        return self.project(self.prev_embedding(prev_tokens), vocab)


class GatedMarkovHead(MarkovHead):
    """Markov bias with a hidden-state gate: B_k = W2 (sigma(W_g [h_k; e_k] + b_g) * e_k)."""

    head_type = "gated"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, rank, hidden_size)
        self.gate_proj = nn.Linear(hidden_size + rank, rank)

    def step_bias(self, hidden, prev_tokens, state, vocab=None):
        emb = self.prev_embedding(prev_tokens).to(hidden.dtype)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, emb], dim=-1)))
        return self.project(gate * emb, vocab), state

    def block_bias(self, hidden: torch.Tensor, prev_tokens: torch.Tensor,
                   vocab: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.prev_embedding(prev_tokens).to(hidden.dtype)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden, emb], dim=-1)))
        return self.project(gate * emb, vocab)


class RNNHead(MarkovHead):
    """Recurrent head (paper Eq. 6): the bias sees the whole in-block prefix through state s_k.

    z_k = [s_{k-1}; W1[prev_k]; h_k];  [a; c; o] = J z_k + b_J;
    s_k = sigma(a) * s_{k-1} + (1 - sigma(a)) * tanh(c);  B_k = W2 tanh(o);  s_{-1} = 0.
    """

    head_type = "rnn"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, rank, hidden_size)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def init_state(self, batch, device, dtype):
        return torch.zeros(batch, self.rank, device=device, dtype=dtype)

    def step_bias(self, hidden, prev_tokens, state, vocab=None):
        assert state is not None, "RNNHead needs the state from init_state()"
        emb = self.prev_embedding(prev_tokens).to(hidden.dtype)
        gate_raw, cand_raw, out_raw = self.joint_proj(torch.cat([state, emb, hidden], dim=-1)).chunk(3, dim=-1)
        gate = torch.sigmoid(gate_raw)
        new_state = gate * state + (1.0 - gate) * torch.tanh(cand_raw)
        return self.project(torch.tanh(out_raw), vocab), new_state


MARKOV_HEADS: dict[str, type[MarkovHead]] = {
    "vanilla": VanillaMarkovHead,
    "gated": GatedMarkovHead,
    "rnn": RNNHead,
}


def build_markov_head(head_type: str | None, vocab_size: int, rank: int, hidden_size: int) -> MarkovHead | None:
    """Build the configured sequential head, or None for a DFlash-style drafter (rank 0)."""
    if rank <= 0 or head_type is None:
        return None
    if head_type not in MARKOV_HEADS:
        raise ValueError(f"unknown markov_head_type '{head_type}'; expected one of {sorted(MARKOV_HEADS)}")
    return MARKOV_HEADS[head_type](vocab_size, rank, hidden_size)


class ConfidenceHead(nn.Module):
    """c_k = sigma(w . [h_k; W1[prev_k]] + b): estimated P(d_k accepted | prefix accepted).
    (DeepSeek-V4's head has no b: ``bias=False``.)

    It never looks at d_k itself, only at what was known before d_k was sampled, which is what
    keeps causal prefix truncation lossless (paper Appendix A). Output logits are fp32.
    """

    def __init__(self, input_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, 1, bias=bias)

    def bias_or_zero(self) -> torch.Tensor:
        """b as a [1] tensor (zero for a head without bias), as the fused kernel takes it."""
        return self.proj.bias if self.proj.bias is not None else self.proj.weight.new_zeros(1)

    def forward(self, hidden: torch.Tensor, prev_embedding: torch.Tensor | None) -> torch.Tensor:
        feats = hidden if prev_embedding is None else torch.cat([hidden, prev_embedding.to(hidden.dtype)], dim=-1)
        return self.proj(feats.to(self.proj.weight.dtype)).float().squeeze(-1)  # the head may be kept in fp32
