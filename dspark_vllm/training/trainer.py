"""Resumable DSpark drafter training on cached target features.

Trained: fc, hidden_norm, layers, norm, Markov head, confidence head. Frozen: embed_tokens and
lm_head, copied from the target (DeepSpec's recipe). AdamW with linear warm-up and cosine decay;
every ``save_every`` steps the drafter is written in DeepSpec format (plus optimizer state in
``trainer_state.pt``), so ``train`` called again with the same output folder resumes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..drafter import DSparkDrafter
from .batch import TrainBatch, build_batch, sample_candidates
from .data import FeatureShard
from .loss import LossWeights, dspark_loss

STATE_FILE = "trainer_state.pt"
LOG_FILE = "training_log.jsonl"


@dataclass
class TrainConfig:
    steps: int = 400
    seqs_per_step: int = 4
    anchors_per_seq: int = 64
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 50
    log_every: int = 10
    seed: int = 0
    threads: int = 2
    # "cpu" or a torch device such as "cuda": drafter, optimizer and the feature shard live there
    device: str = "cpu"
    # "full": softmax over the whole vocabulary (DeepSpec). "active": over the tokens that occur
    # in the training answers plus `negatives` random other ids drawn fresh each step (a sampled
    # softmax; both distributions renormalised on that subset) - several times cheaper on CPU,
    # where the LM-head GEMMs are most of a step.
    loss_vocab: str = "full"
    negatives: int = 4096
    loss: LossWeights = field(default_factory=LossWeights)


def trainable_parameters(drafter: DSparkDrafter) -> list[torch.nn.Parameter]:
    """Everything but the frozen shared embedding and LM head."""
    drafter.embed_tokens.weight.requires_grad_(False)
    drafter.lm_head.weight.requires_grad_(False)
    return [p for p in drafter.parameters() if p.requires_grad]


def init_for_training(drafter: DSparkDrafter, seed: int) -> None:
    """Small-normal init for the trained matrices and a zero Markov W2, so training starts from
    the plain DFlash prediction and the transition bias grows only where it helps."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.startswith(("embed_tokens", "lm_head")) or not p.requires_grad:
                continue
            if name.endswith("markov_w2.weight"):
                p.zero_()
            elif p.dim() >= 2:  # matrices, and stacked experts [E, out, in]
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def packed_hidden(drafter: DSparkDrafter, batch: TrainBatch) -> torch.Tensor:
    """Block hidden states [S*A, B, H]; block b of row s equals what ``forward_block`` gives at
    inference with context = that row's positions before its anchor."""
    hidden = drafter.packed_block_hidden(batch.context, batch.context_pos, batch.block_ids, batch.block_pos,
                                         batch.mask)
    s_n, a_n, b_n = batch.labels.shape
    return hidden.view(s_n * a_n, b_n, -1)


def teacher_forced_outputs(drafter: DSparkDrafter, batch: TrainBatch, vocab: torch.Tensor | None = None):
    """Run the packed blocks; return (draft logits, confidence logits, flat index tensors) for
    the supervised positions only (the LM head GEMM dominates the cost, so padding is skipped).
    With ``vocab`` the logits cover only those token ids."""
    hidden = packed_hidden(drafter, batch)
    s_n, a_n, b_n = batch.labels.shape
    valid = batch.valid.view(s_n * a_n, b_n)
    block_index, pos = torch.nonzero(valid, as_tuple=True)
    h = hidden[block_index, pos]
    prev = batch.prev.view(s_n * a_n, b_n)[block_index, pos]
    logits = drafter.base_logits(h, vocab)
    head = drafter.markov_head
    if head is not None:
        logits = logits + head.block_bias(h[:, None], prev[:, None], vocab)[:, 0]
    conf = None
    if drafter.confidence_head is not None:
        emb = head.prev_embedding(prev) if (head is not None and drafter.config.confidence_head_with_markov) else None
        conf = drafter.confidence_head(h, emb)
    return logits, conf, block_index, pos, s_n * a_n


@torch.no_grad()
def target_logits(drafter: DSparkDrafter, batch: TrainBatch, block_index: torch.Tensor, pos: torch.Tensor,
                  vocab: torch.Tensor | None = None) -> torch.Tensor:
    """The target's own logits at each supervised label: frozen lm_head on its last hidden state."""
    s_n, a_n, b_n = batch.labels.shape
    th = batch.target_hidden.view(s_n * a_n, b_n, -1)[block_index, pos]
    return drafter.lm_logits(th.to(drafter.dtype), vocab)


def feature_scale(shard: FeatureShard, sample: int = 20000) -> torch.Tensor:
    """Per-dimension RMS of the target features [m*H] (from an evenly spaced sample).

    Target residual streams carry a few huge "massive activation" dimensions (hundreds, vs ~1
    elsewhere), which would dominate ``fc`` at a random init. Training therefore runs ``fc`` on
    features divided by this scale and folds the scale back into ``fc.weight`` when saving:
    fc_saved(x) = W (x / s) exactly, so the checkpoint format and inference are unchanged."""
    idx = torch.linspace(0, len(shard.features) - 1, min(sample, len(shard.features))).long().to(shard.features.device)
    rms = shard.features[idx].float().pow(2).mean(0).sqrt()
    return rms.clamp_min(1e-3)


def active_vocabulary(shard: FeatureShard) -> torch.Tensor:
    """Sorted ids of every token that occurs in the training answers (all labels are among them)."""
    return torch.unique(shard.tokens[shard.loss_mask])


class Trainer:
    """Owns the drafter, optimizer and data; ``run`` trains to ``cfg.steps`` with resume."""

    def __init__(self, drafter: DSparkDrafter, shard: FeatureShard, out: Path, cfg: TrainConfig) -> None:
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        self.drafter = drafter.float().to(self.device).train()
        self.shard = shard.to(self.device)
        self.out = Path(out)
        self.cfg = cfg
        self.params = trainable_parameters(self.drafter)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.elapsed = 0.0
        if cfg.loss_vocab not in ("full", "active"):
            raise ValueError(f"loss_vocab must be 'full' or 'active', not {cfg.loss_vocab!r}")
        self.active = active_vocabulary(self.shard) if cfg.loss_vocab == "active" else None
        # fc.weight is trained in the normalised parametrisation (see feature_scale); a fresh
        # init is used as such, a resumed checkpoint is converted in try_resume.
        self.feature_scale = feature_scale(self.shard)
        self.candidates = sample_candidates(self.shard)

    def step_vocabulary(self) -> torch.Tensor | None:
        """This step's loss vocabulary: None (full) or active ids + fresh random negatives."""
        if self.active is None:
            return None
        vocab_size = self.drafter.config.vocab_size
        negatives = torch.randint(0, vocab_size, (self.cfg.negatives,), generator=self.gen).to(self.device)
        return torch.unique(torch.cat([self.active, negatives]))

    # ---- persistence -----------------------------------------------------------------------
    def save(self) -> None:
        fc = self.drafter.context_proj.weight
        with torch.no_grad():
            trained = fc.detach().clone()
            fc.div_(self.feature_scale)  # fold the input scaling back: the checkpoint takes raw features
            self.drafter.save_trained(self.out)
            fc.copy_(trained)
        torch.save({"step": self.step, "optimizer": self.opt.state_dict(), "generator": self.gen.get_state(),
                    "elapsed": self.elapsed, "config": asdict(self.cfg)}, self.out / STATE_FILE)

    def try_resume(self) -> bool:
        path = self.out / STATE_FILE
        if not path.exists():
            return False
        self.drafter.load_trained(self.out)
        with torch.no_grad():
            self.drafter.context_proj.weight.mul_(self.feature_scale)
        state = torch.load(path, weights_only=False, map_location=self.device)
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"].cpu())
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        return True

    # ---- loop ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        seqs = torch.randint(0, self.shard.num_samples, (cfg.seqs_per_step,), generator=self.gen).tolist()
        batch = build_batch(self.shard, seqs, cfg.anchors_per_seq, self.drafter.block_size,
                            self.drafter.config.mask_token_id, self.gen, self.candidates,
                            context_window=self.drafter.context_window)
        batch.context = batch.context.float() / self.feature_scale
        vocab = self.step_vocabulary()
        logits, conf, block_index, pos, n_blocks = teacher_forced_outputs(self.drafter, batch, vocab)
        tgt = target_logits(self.drafter, batch, block_index, pos, vocab)
        s_n, a_n, b_n = batch.labels.shape
        labels = batch.labels.view(s_n * a_n, b_n)[block_index, pos]
        if vocab is not None:  # label ids -> positions in the subset (labels are answer tokens)
            labels = torch.searchsorted(vocab, labels)
        out = dspark_loss(logits, tgt, labels, pos, block_index, n_blocks, b_n, conf, cfg.loss)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        out.metrics.update(grad_norm=float(gnorm), lr=self.opt.param_groups[0]["lr"], tokens=int(len(labels)))
        return out.metrics

    def run(self, time_budget_s: float | None = None) -> None:
        torch.set_num_threads(self.cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.try_resume()
        log = open(self.out / LOG_FILE, "a")
        if not resumed:
            log.write(json.dumps({"event": "start", "config": asdict(self.cfg),
                                  "samples": self.shard.num_samples, "tokens": int(len(self.shard.tokens))}) + "\n")
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train drafter", unit="step")
        window: list[dict[str, float]] = []
        started = time.perf_counter() - self.elapsed
        while self.step < self.cfg.steps:
            metrics = self.train_step()
            self.step += 1
            self.elapsed = time.perf_counter() - started
            window.append(metrics)
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                avg = {k: sum(m.get(k, 0.0) for m in window) / len(window) for k in window[-1]}
                avg.update(step=self.step, elapsed_s=round(self.elapsed, 1))
                log.write(json.dumps(avg) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{avg['loss']:.3f}", tau_g=f"{avg.get('tau_greedy', 0):.2f}",
                                top1=f"{avg['top1_match@0']:.2f}")
                window = []
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                self.save()
            if time_budget_s is not None and self.elapsed > time_budget_s:
                self.save()
                log.write(json.dumps({"event": "time_budget_reached", "step": self.step}) + "\n")
                break
        bar.close()
        log.close()
        self.drafter.eval()
