"""The DSpark training loss (paper Eq. 7-8; docs/paper-map.md) on teacher-forced blocks.

For block output k (0-based) with label x*_k, draft logits z_k = U_k + B_k(prev_k) (prev_0 = the
anchor, prev_k = x*_{k-1}) and the target's logits z^t_k at the same label position:

    L_ce   = sum_k w_k CE(z_k, x*_k) / sum_k w_k
    L_tv   = sum_k w_k ||softmax(z_k) - softmax(z^t_k)||_1 / sum_k w_k
    L_conf = sum_k w_k BCE(conf_k, c*_k) / sum_k w_k,   c*_k = clamp(1 - ||.||_1 / 2, 0, 1) (detached)
    L      = 0.1 L_ce + 0.9 L_tv + 1.0 L_conf,          w_k = valid_k * exp(-k / 4)

``valid`` is the contiguous prefix of labels inside the answer (a cumulative product).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    conf: float = 1.0
    decay_gamma: float = 4.0


@dataclass
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float]


def position_weights(pos_in_block: torch.Tensor, gamma: float) -> torch.Tensor:
    """w_k = exp(-k / gamma) for the block position k of each supervised token."""
    return torch.exp(-pos_in_block.float() / gamma)


def dspark_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                pos_in_block: torch.Tensor, block_index: torch.Tensor, num_blocks: int, block_size: int,
                conf_logits: torch.Tensor | None, weights: LossWeights = LossWeights()) -> LossOutput:
    """Loss over the M supervised tokens of ``num_blocks`` blocks.

    draft/target logits [M, V] fp32, labels [M], pos_in_block [M] (k), block_index [M],
    conf_logits [M] or None. Unsupervised (invalid) positions are simply absent."""
    w = position_weights(pos_in_block, weights.decay_gamma)
    denom = w.sum().clamp_min(1e-6)
    log_pd = torch.log_softmax(draft_logits, dim=-1)
    with torch.no_grad():
        p_t = torch.softmax(target_logits, dim=-1)
    l1 = (log_pd.exp() - p_t).abs().sum(-1)  # [M] = 2 TV
    ce = F.nll_loss(log_pd, labels, reduction="none")
    l_ce = (w * ce).sum() / denom
    l_tv = (w * l1).sum() / denom
    alpha = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)  # per-position acceptance estimate, 1 - TV
    loss = weights.ce * l_ce + weights.tv * l_tv
    metrics = {"ce": float(l_ce.detach()), "l1": float(l_tv.detach())}
    if conf_logits is not None:
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), alpha, reduction="none")
        l_conf = (w * bce).sum() / denom
        loss = loss + weights.conf * l_conf
        metrics["conf_bce"] = float(l_conf.detach())
        metrics["conf_abs_error"] = float((torch.sigmoid(conf_logits.detach().float()) - alpha).abs().mean())
    with torch.no_grad():
        metrics.update(block_metrics(alpha, draft_logits.argmax(-1) == target_logits.argmax(-1),
                                     pos_in_block, block_index, num_blocks, block_size))
    metrics["loss"] = float(loss.detach())
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite DSpark loss: {metrics}")
    return LossOutput(loss, metrics)


def block_metrics(alpha: torch.Tensor, greedy_hit: torch.Tensor, pos_in_block: torch.Tensor,
                  block_index: torch.Tensor, num_blocks: int, block_size: int) -> dict[str, float]:
    """Expected acceptance length of fully supervised blocks: tau_prob = 1 + sum_k prod_{i<=k}
    alpha_i (sampling at T=1), tau_greedy = the same with alpha = 1[draft argmax == target argmax]."""
    grid = torch.zeros(num_blocks, block_size, device=alpha.device)
    hits = torch.zeros(num_blocks, block_size, device=alpha.device)
    seen = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=alpha.device)
    grid[block_index, pos_in_block] = alpha
    hits[block_index, pos_in_block] = greedy_hit.float()
    seen[block_index, pos_in_block] = True
    full = seen.all(dim=1)
    out = {"top1_match@0": float(hits[:, 0][seen[:, 0]].mean()) if bool(seen[:, 0].any()) else 0.0}
    if bool(full.any()):
        out["tau_prob"] = float(1.0 + torch.cumprod(grid[full], dim=1).sum(dim=1).mean())
        out["tau_greedy"] = float(1.0 + torch.cumprod(hits[full], dim=1).sum(dim=1).mean())
    return out
