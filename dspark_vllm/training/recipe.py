"""``dspark-vllm train``: data preparation + training in one resumable command.

    out/data/answers.json   target answers (regenerated once)
    out/data/features.pt    target features for them (captured once)
    out/                    the drafter in DeepSpec format, trainer_state.pt, training_log.jsonl
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import build_random_drafter, load_config
from .data import prepare_dataset
from .trainer import TrainConfig, Trainer, init_for_training


@dataclass
class DrafterShape:
    num_layers: int = 2
    block_size: int = 7
    markov_rank: int = 32
    markov_head_type: str = "vanilla"
    intermediate_size: int | None = None
    target_layer_ids: list[int] | None = None


def train_drafter(target: str, datasets: list[str], out: Path, shape: DrafterShape, cfg: TrainConfig,
                  data_dir: Path | None = None, max_new_tokens: int = 256, max_len: int = 512,
                  backend: str = "auto", time_budget_s: float | None = None,
                  max_samples: int | None = None, gen_batch_size: int = 1, sampled_answers: int = 0,
                  sample_temperature: float = 0.8) -> Path:
    """Prepare (or reuse) the data, then train (or resume) a drafter for ``target`` into ``out``."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cfg.threads)
    out = Path(out)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    kwargs = dict(num_layers=shape.num_layers, block_size=shape.block_size, markov_rank=shape.markov_rank,
                  markov_head_type=shape.markov_head_type, target_layer_ids=shape.target_layer_ids,
                  intermediate_size=shape.intermediate_size)
    if (out / "config.json").exists():  # resume with the stored shape
        stored = load_config(out)
        kwargs.update(num_layers=stored.num_layers, block_size=stored.block_size, markov_rank=stored.markov_rank,
                      markov_head_type=stored.markov_head_type or "vanilla", target_layer_ids=stored.target_layer_ids,
                      intermediate_size=stored.raw.get("intermediate_size"))
    drafter = build_random_drafter(model, seed=cfg.seed, **kwargs)
    layer_ids = drafter.config.target_layer_ids
    t0 = time.perf_counter()
    shard = prepare_dataset(target, datasets, layer_ids, data_dir or out / "data", max_new_tokens, backend,
                            cfg.threads, max_len, max_samples, cfg.seed, cfg.device, gen_batch_size,
                            sampled_answers, sample_temperature)
    print(f"[train] data: {shard.num_samples} samples, {int(shard.loss_mask.sum())} answer tokens "
          f"({time.perf_counter() - t0:.0f} s)")
    init_for_training(drafter, cfg.seed)
    del model
    Trainer(drafter, shard, out, cfg).run(time_budget_s)
    return out


def export_drafter(src: Path, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Release copy of a trained drafter: weights in ``dtype`` without the shared embeddings,
    plus its training log, calibration and draft vocabulary (no optimizer state, no data)."""
    import shutil

    from ..checkpoint import load_checkpoint, save_checkpoint

    drafter = load_checkpoint(src, dtype=dtype)
    save_checkpoint(drafter, out, shared_embeddings=True)
    for name in ("training_log.jsonl", "calibration.json", "TRAINING.md", "draft_vocab.json"):
        if (Path(src) / name).exists() and Path(src).resolve() != Path(out).resolve():
            shutil.copy(Path(src) / name, Path(out) / name)
    return Path(out)
