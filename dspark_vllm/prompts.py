"""Prompt handling: DeepSpec JSONL prompt sets and chat-template encoding."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def encode_chat(tokenizer: Any, user_text: str) -> list[int]:
    """Token ids of a one-turn chat prompt with the generation prompt appended.

    Falls back to the raw text for tokenizers without a chat template (base models)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                             add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(user_text)["input_ids"])


def load_prompts(path: str | Path, limit: int | None = None, offset: int = 0) -> list[str]:
    """First-turn prompts of a DeepSpec-format JSONL file ({"turns": [...]} per line)."""
    out: list[str] = []
    with open(path) as fh:
        for i, line in enumerate(fh):
            if i < offset:
                continue
            if limit is not None and len(out) >= limit:
                break
            turns = json.loads(line).get("turns") or []
            if turns:
                out.append(str(turns[0]))
    return out


ENV_DATASETS = "DSPARK_VLLM_DATASETS"  # a folder of DeepSpec JSONL prompt sets (gsm8k.jsonl, ...)


class DatasetsNotFound(SystemExit):
    """No folder of prompt sets was given; the message names the flag and the variable."""


def datasets_dir(explicit: str | Path | None = None) -> Path:
    """The folder of DeepSpec JSONL prompt sets: ``explicit`` (a tool's ``--datasets-dir``), else
    ``$DSPARK_VLLM_DATASETS``. The package ships no prompt sets and assumes no folder."""
    choice = explicit or os.environ.get(ENV_DATASETS)
    if not choice:
        raise DatasetsNotFound(f"no prompt sets given: pass --datasets-dir DIR or set {ENV_DATASETS}=DIR "
                               "(a folder of DeepSpec *.jsonl prompt sets, e.g. gsm8k.jsonl)")
    root = Path(choice).expanduser()
    if not root.is_dir() or not any(root.glob("*.jsonl")):
        raise DatasetsNotFound(f"{root} holds no *.jsonl prompt sets: point --datasets-dir (or {ENV_DATASETS}) at a "
                               "folder of DeepSpec JSONL files")
    return root


def resolve_spec(spec: str, explicit_dir: str | Path | None = None) -> str:
    """``path.jsonl[:start:stop]`` as given when the file exists, else relative to :func:`datasets_dir`."""
    path, sep, window = spec.partition(":")
    if Path(path).expanduser().exists():
        return spec
    return str(datasets_dir(explicit_dir) / path) + sep + window
# Prompt windows the shipped drafter trains on (``dspark-vllm train`` defaults).
TRAIN_WINDOWS = {"gsm8k": (0, 520), "mbpp": (0, 200), "math500": (0, 120), "livecodebench": (0, 40),
                 "arena-hard-v2": (0, 60)}


def count_prompts(path: str | Path) -> int:
    with open(path) as fh:
        return sum(1 for line in fh if line.strip())


def held_out_specs(root: str | Path, size: int = 12) -> list[str]:
    """``path:start:stop`` of the last ``size`` prompts of every prompt set in ``root``: never
    inside a training window, so every set (chat included) is measured on prompts the drafter
    did not see."""
    specs = []
    for path in sorted(Path(root).glob("*.jsonl")):
        total = count_prompts(path)
        start = max(total - size, 0)
        train = TRAIN_WINDOWS.get(path.stem)
        if train is not None and start < train[1]:
            raise ValueError(f"{path.name} has {total} prompts: its last {size} overlap the training window {train}")
        specs.append(f"{path}:{start}:{total}")
    if not specs:
        raise FileNotFoundError(f"no *.jsonl prompt sets in {root}")
    return specs
