"""DeepSpec-format drafter checkpoints: load, save, validate against a target, build random.

Format (docs/architecture.md, *Checkpoints*): a folder with ``config.json`` (the target's config plus the drafter's
keys) and ``model.safetensors`` whose tensor names are the drafter's ``state_dict`` names.
Every mismatch with the target raises :class:`CheckpointMismatchError` naming the field, both
values, and what to do, so a wrong drafter never produces silently wrong tokens.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .drafter_config import GEMMA4_ARCH, HEAD_TYPES, QWEN3_ARCH, DSparkConfig, DSparkConfigError
from .drafter import DSparkDrafter

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointMismatchError(ValueError):
    """The drafter checkpoint does not fit the target model or the requested settings."""


def _mismatch(field: str, ckpt_value: Any, target_value: Any, fix: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"DSpark checkpoint does not match the target: {field} is {ckpt_value} in the drafter "
        f"checkpoint but {target_value} in the target. {fix}"
    )


def target_text_config(target: Any) -> dict[str, Any]:
    """The target's (text) config as a dict, from a transformers config, model, dict or folder."""
    if isinstance(target, (str, Path)):
        target = json.loads((Path(target) / CONFIG_FILE).read_text())
    if hasattr(target, "config") and not isinstance(target, dict):
        target = target.config
    if not isinstance(target, dict):
        text = getattr(target, "text_config", None)
        target = (text if text is not None else target).to_dict()
    return dict(target.get("text_config") or target)


def validate_against_target(config: DSparkConfig, target: Any, block_size: int | None = None) -> None:
    """Check the drafter fits ``target`` and, if given, the requested block size.

    Raises CheckpointMismatchError for: vocab size, hidden size, target_layer_ids outside the
    target's depth (the last layer is excluded: HF returns it already normed), num_target_layers,
    block size != trained block size. Head type problems raise DSparkConfigError.
    """
    tgt = target_text_config(target)
    retrain = "Use a drafter trained for this target model (or train one with `dspark-vllm train`)."
    if int(tgt["vocab_size"]) != config.vocab_size:
        raise _mismatch("vocab_size", config.vocab_size, tgt["vocab_size"], retrain)
    if int(tgt["hidden_size"]) != config.hidden_size:
        raise _mismatch("hidden_size", config.hidden_size, tgt["hidden_size"], retrain)
    depth = int(tgt["num_hidden_layers"])
    bad = [i for i in config.target_layer_ids if not -1 <= i <= depth - 2]
    if bad:
        raise CheckpointMismatchError(
            f"DSpark checkpoint does not match the target: target_layer_ids {config.target_layer_ids} "
            f"contains {bad}, outside the target's usable layers -1..{depth - 2} (the target has "
            f"{depth} layers; -1 is the embedding output and the last layer is excluded). {retrain}"
        )
    if config.num_target_layers is not None and config.num_target_layers != depth:
        raise _mismatch("num_target_layers", config.num_target_layers, depth, retrain)
    validate_block_size(config, block_size)


def validate_block_size(config: DSparkConfig, block_size: int | None) -> None:
    """Raise CheckpointMismatchError when a requested block size is not the trained one."""
    if block_size is not None and int(block_size) != config.block_size:
        raise CheckpointMismatchError(
            f"num_speculative_tokens is {block_size} but the drafter was trained with block_size "
            f"{config.block_size}. The block is drafted non-causally as one unit, so other sizes are "
            f"out of distribution: set num_speculative_tokens to {config.block_size} (or leave it "
            f"unset) and trim verification with the scheduler policy instead."
        )


SHARED_EMBEDDINGS_KEY = "dspark_shared_embeddings"
SHARED_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def save_checkpoint(drafter: DSparkDrafter, path: str | Path, shared_embeddings: bool = False) -> Path:
    """Write config.json + model.safetensors in DeepSpec format.

    shared_embeddings=True leaves out embed_tokens/lm_head (frozen copies of the target's, most
    of a small drafter's bytes) and records ``dspark_shared_embeddings: true`` in config.json;
    loading then takes them from the target model."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    raw = dict(drafter.config.raw)
    if shared_embeddings:
        raw[SHARED_EMBEDDINGS_KEY] = True
    else:
        raw.pop(SHARED_EMBEDDINGS_KEY, None)
    (out / CONFIG_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()
               if not (shared_embeddings and k in SHARED_TENSORS)}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)
    return out


def shares_target_embeddings(config: DSparkConfig) -> bool:
    return bool(config.raw.get(SHARED_EMBEDDINGS_KEY, False))


def _read_state(path: str | Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors weights in {path}.")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_weights_into(drafter: DSparkDrafter, path: str | Path) -> None:
    """Load a checkpoint's tensors into an existing drafter (training resume); shared
    embeddings stay as they are."""
    state = _read_state(path)
    drafter.load_state_dict({k: v.to(drafter.dtype) if v.is_floating_point() else v for k, v in state.items()},
                            strict=False)


def load_config(path: str | Path) -> DSparkConfig:
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {path}: expected a DeepSpec DSpark checkpoint folder.")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise DSparkConfigError(f"{cfg_path} is not valid JSON: {exc}") from exc
    return DSparkConfig(raw)


DRAFT_VOCAB_FILE = "draft_vocab.json"


def read_draft_vocab(path: str | Path, size: int | None, vocab_size: int) -> list[int] | None:
    """Token ids the drafter may propose: the first ``size`` ids of ``draft_vocab.json`` (ranked
    most useful first) beside the checkpoint. size None = every id in the file; 0 = the full
    vocabulary (also what a checkpoint without the file gets)."""
    file = Path(path) / DRAFT_VOCAB_FILE
    if size == 0 or (size is None and not file.exists()):
        return None
    if not file.exists():
        raise FileNotFoundError(f"draft_vocab_size={size} but {file} does not exist; build it with "
                                "`dspark-vllm draft-vocab --drafter <folder>` or set draft_vocab_size: 0")
    try:
        ids = [int(t) for t in json.loads(file.read_text())["token_ids"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file} is not a draft vocabulary ({{\"token_ids\": [...]}}): {exc}") from exc
    if size is not None and size < 0:
        raise ValueError(f"draft_vocab_size must be >= 0, got {size}")
    if size is not None and size > len(ids):
        raise ValueError(f"draft_vocab_size={size} but {file} ranks only {len(ids)} ids; rebuild it larger "
                         "or lower draft_vocab_size")
    ids = ids if size is None else ids[:size]
    if size is None and len(ids) >= vocab_size:
        return None
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{file} holds ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return ids


def load_checkpoint(path: str | Path, target: Any | None = None, block_size: int | None = None,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    draft_vocab_size: int | None = None) -> DSparkDrafter:
    """Load a DeepSpec-format drafter; validate against ``target`` when given.

    dtype None keeps the checkpoint's own floating dtype, so save -> load is bit-identical.
    A ``draft_vocab.json`` beside the weights restricts drafting to its ids (see
    :func:`read_draft_vocab`; ``draft_vocab_size=0`` drafts from the full vocabulary).
    """
    config = load_config(path)
    if target is not None:
        validate_against_target(config, target, block_size)
    elif block_size is not None:
        validate_against_target(config, _self_as_target(config), block_size)
    state = _read_state(path)
    drafter = DSparkDrafter(config)
    expected = drafter.state_dict()
    shared = shares_target_embeddings(config)
    if shared:
        expected = {k: v for k, v in expected.items() if k not in SHARED_TENSORS}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"Checkpoint tensors in {path} do not match its config.json "
            f"(markov_head_type={config.markov_head_type}, markov_rank={config.markov_rank}, "
            f"enable_confidence_head={config.enable_confidence_head}): missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}. Re-save the checkpoint or fix config.json."
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointMismatchError(
                f"Tensor {name} in {path} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}. Check hidden_size / markov_rank / target_layer_ids."
            )
    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    drafter.to(dtype)
    drafter.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                            strict=not shared)
    if shared:
        drafter.embeddings_bound = False
        if isinstance(target, torch.nn.Module):
            drafter.bind_target_embeddings(target.get_input_embeddings().weight,
                                           target.get_output_embeddings().weight)
    drafter.set_draft_vocab(read_draft_vocab(path, draft_vocab_size, config.vocab_size))
    return drafter.to(device).eval()


def _self_as_target(config: DSparkConfig) -> dict[str, Any]:
    depth = config.num_target_layers or (max(config.target_layer_ids) + 2)
    return {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "num_hidden_layers": depth}


def default_target_layer_ids(num_target_layers: int, count: int = 5) -> list[int]:
    """Evenly spread layer ids from 1 to L-3 (DeepSpec's pattern, e.g. [1,9,17,25,33] for L=36)."""
    hi = max(num_target_layers - 3, 0)
    lo = min(1, hi)
    count = max(1, min(count, hi - lo + 1))
    if count == 1:
        return [lo]
    return sorted({round(lo + (hi - lo) * i / (count - 1)) for i in range(count)})


def build_drafter_config(
    target: Any,
    *,
    num_layers: int = 1,
    block_size: int = 7,
    target_layer_ids: list[int] | None = None,
    mask_token_id: int | None = None,
    markov_rank: int = 64,
    markov_head_type: str = "vanilla",
    enable_confidence_head: bool = True,
    confidence_head_with_markov: bool = True,
    intermediate_size: int | None = None,
) -> DSparkConfig:
    """A DeepSpec drafter config for ``target``: a copy of its text config plus drafter keys."""
    tgt = copy.deepcopy(target_text_config(target))
    depth = int(tgt["num_hidden_layers"])
    if markov_head_type not in HEAD_TYPES:
        raise DSparkConfigError(f"markov_head_type '{markov_head_type}' unknown; use one of {HEAD_TYPES}")
    gemma = str(tgt.get("model_type", "")).startswith("gemma4")
    raw = dict(tgt)
    raw.update(
        architectures=[GEMMA4_ARCH if gemma else QWEN3_ARCH],
        num_target_layers=depth,
        num_hidden_layers=num_layers,
        block_size=block_size,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * num_layers,
        mask_token_id=int(mask_token_id if mask_token_id is not None else tgt["vocab_size"] - 1),
        target_layer_ids=list(target_layer_ids if target_layer_ids is not None
                              else default_target_layer_ids(depth)),
        num_anchors=512,
        enable_confidence_head=enable_confidence_head,
        markov_rank=markov_rank,
    )
    if intermediate_size:  # the drafter's own MLP width (default: the target's)
        raw["intermediate_size"] = int(intermediate_size)
    if enable_confidence_head:
        raw["confidence_head_with_markov"] = bool(confidence_head_with_markov and markov_rank > 0)
    if markov_rank > 0:
        raw["markov_head_type"] = markov_head_type
    if gemma:
        raw.update(_gemma4_global_attention(tgt))
        raw.pop("per_layer_config", None)
        raw["target_model_type"] = tgt.get("model_type")
        raw["target_text_model_type"] = tgt.get("model_type")
    config = DSparkConfig(raw)
    validate_against_target(config, tgt)
    return config


def _gemma4_global_attention(tgt: dict[str, Any]) -> dict[str, Any]:
    """global_head_dim / num_global_key_value_heads of a Gemma4 target (newer transformers keep
    them only inside per_layer_config of the full-attention layers)."""
    out = {k: tgt[k] for k in ("global_head_dim", "num_global_key_value_heads") if tgt.get(k) is not None}
    types = tgt.get("layer_types") or []
    per_layer = tgt.get("per_layer_config") or {}
    for idx, kind in enumerate(types):
        override = per_layer.get(idx) or per_layer.get(str(idx))
        if kind == "full_attention" and override:
            out.setdefault("global_head_dim", override.get("head_dim"))
            if override.get("num_key_value_heads") is not None:
                out.setdefault("num_global_key_value_heads", override["num_key_value_heads"])
            break
    out.setdefault("global_head_dim", tgt.get("head_dim"))
    out.setdefault("num_global_key_value_heads", tgt.get("num_key_value_heads"))
    return out


def build_random_drafter(target: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                         **config_kwargs: Any) -> DSparkDrafter:
    """A random-weight drafter for any HF target; embed_tokens/lm_head copied from the target
    model when ``target`` is a model (DeepSpec freezes them as copies of the target's)."""
    config = build_drafter_config(target, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drafter = DSparkDrafter(config)
    if isinstance(target, torch.nn.Module):
        with torch.no_grad():
            drafter.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
            drafter.lm_head.weight.copy_(target.get_output_embeddings().weight)
    return drafter.to(dtype).eval()
