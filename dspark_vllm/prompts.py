"""Prompt handling: DeepSpec JSONL prompt sets and chat-template encoding."""

from __future__ import annotations

import json
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
