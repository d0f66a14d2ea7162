"""Find and read the DSpark drafter inside a DeepSeek-V4 target folder (``mtp.{s}.*`` tensors).

The tensors sit in the target's safetensors shards (listed by ``model.safetensors.index.json``
when there is one) under the original DeepSeek names: per stage s the V4 block
(``attn.wq_a``, ``attn.q_norm``, ``attn.wq_b``, ``attn.wkv``, ``attn.kv_norm``, ``attn.wo_a``,
``attn.wo_b``, ``attn.attn_sink``, ``ffn.gate.{weight,bias}``, ``ffn.experts.{e}.w{1,2,3}``,
``ffn.shared_experts.w{1,2,3}``, ``attn_norm``, ``ffn_norm``, ``hc_{attn,ffn}_{fn,base,scale}``)
and, on one stage, the drafter-level tensors (``main_proj``, ``main_norm``, ``norm``,
``hc_head_{fn,base,scale}``, ``markov_head.*``, ``confidence_head.*``). FP8 weights come with a
``.scale`` of one factor per 128 x 128 block and are dequantised here. The drafter's embedding
and LM head are the target's (``embed.weight`` / ``head.weight``, or their transformers names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..drafter_config import DSparkConfigError
from .config import V4DraftConfig, is_deepseek_v4_config
from .drafter import DSparkV4Drafter

INDEX_FILE = "model.safetensors.index.json"
MTP_SHARD = "mtp.safetensors"  # where save_v4_drafter writes the stages
FP8_BLOCK = (128, 128)
DRAFTER_LEVEL = ("main_proj.", "main_norm.", "norm.", "hc_head.", "markov_head.", "confidence_head.")
EMBED_NAMES = ("embed.weight", "model.embed_tokens.weight")
HEAD_NAMES = ("head.weight", "lm_head.weight")
# checkpoint's mHC parameter names <-> this package's module names
HC_NAMES = {"hc_attn_": "attn_hc.", "hc_ffn_": "ffn_hc.", "hc_head_": "hc_head."}


class V4CheckpointError(ValueError):
    """A DeepSeek-V4 folder lacks a tensor or field its in-checkpoint drafter needs."""


def module_name(checkpoint_name: str) -> str | None:
    """``mtp.{s}.<rest>`` -> the drafter's parameter name (None: not a drafter tensor)."""
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", checkpoint_name)
    if m is None:
        return None
    stage, rest = m.groups()
    for old, new in HC_NAMES.items():
        rest = re.sub(rf"(^|\.){old}(fn|base|scale)$", rf"\g<1>{new}\2", rest)
    return rest if rest.startswith(DRAFTER_LEVEL) else f"layers.{stage}.{rest}"


def checkpoint_name(param: str, head_stage: int) -> str:
    """The inverse of :func:`module_name`."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", param)
    if m:
        stage, rest = m.groups()
    else:  # the context combiner on the first stage, the head stack on ``head_stage``
        stage, rest = ("0" if param.startswith(("main_proj.", "main_norm.")) else str(head_stage)), param
    for old, new in HC_NAMES.items():
        rest = re.sub(rf"(^|\.){re.escape(new)}(fn|base|scale)$", rf"\g<1>{old}\2", rest)
    return f"mtp.{stage}.{rest}"


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard holding it (the index file, else every ``*.safetensors``)."""
    index = folder / INDEX_FILE
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update((name, shard) for name in f.keys())
    return out


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_shard: dict[Path, list[str]] = {}
    for name in names:
        by_shard.setdefault(files[name], []).append(name)
    out = {}
    for shard, shard_names in by_shard.items():
        with safe_open(str(shard), "pt") as f:
            out.update((name, f.get_tensor(name)) for name in shard_names)
    return out


class ShardReader:
    """One tensor at a time from the shards (each opened once, memory-mapped): a load holds at
    most one checkpoint tensor (and its scale) in host memory besides what it has placed."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def handle(self, name: str):
        from safetensors import safe_open

        shard = self.files[name]
        if shard not in self._open:
            self._open[shard] = safe_open(str(shard), "pt")
        return self._open[shard]

    def get(self, name: str) -> torch.Tensor:
        return self.handle(name).get_tensor(name)

    def dtype_name(self, name: str) -> str:
        """The stored dtype as safetensors names it ("BF16", "F8_E4M3", "U8", ...), without reading data."""
        return self.handle(name).get_slice(name).get_dtype()


EXPERT_TENSOR = re.compile(r"(.+\.ffn\.experts)\.(\d+)\.(w[123])\.weight")
FP4_STORED = ("U8", "I8", "F4", "F4_E2M1", "F4_E2M1_X2")


def stored_expert_dtype(files: dict[str, Path]) -> str | None:
    """"fp4" when the routed experts are stored as packed bytes, "fp8" for FP8, None otherwise
    (what the tensors say, whatever config.json's ``expert_dtype`` claims)."""
    name = next((n for n in files if n.startswith("mtp.") and EXPERT_TENSOR.fullmatch(n)), None)
    if name is None:
        return None
    stored = ShardReader(files).dtype_name(name)
    return "fp4" if stored in FP4_STORED else "fp8" if stored.startswith("F8") else None


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> torch.Tensor:
    """float32 weight from an FP8 one with one scale per ``block`` (rows x columns) tile."""
    rows, cols = weight.shape
    full = scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * full


def _fp8_block(raw: dict) -> tuple[int, int]:
    block = (raw.get("quantization_config") or {}).get("weight_block_size") or FP8_BLOCK
    return int(block[0]), int(block[1])


def read_config(folder: Path) -> V4DraftConfig:
    """The draft view of a DeepSeek-V4 folder's config.json (V4CheckpointError naming the problem)."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise V4CheckpointError(f"{folder}: cannot read config.json ({exc})") from None
    if not is_deepseek_v4_config(raw):
        raise V4CheckpointError(f"{folder} is not a DeepSeek-V4 checkpoint (model_type {raw.get('model_type')!r})")
    try:
        return V4DraftConfig(raw)
    except DSparkConfigError as exc:
        raise V4CheckpointError(f"{folder}: {exc}") from None


EXPERT_SCALE = re.compile(r".+\.experts\.\d+\.w[123]\.scale")


def _drafter_params(config: V4DraftConfig) -> set[str]:
    """Checkpoint-level names of the drafter's own tensors, MXFP4 expert scales excepted (they
    travel with their weights); shapes only: built on the meta device."""
    with torch.device("meta"):
        drafter = DSparkV4Drafter(config)
    return {p for p in drafter.state_dict()
            if not p.startswith(("embed_tokens.", "lm_head.")) and not EXPERT_SCALE.fullmatch(p)}


def check_v4_checkpoint(folder: str | Path) -> tuple[V4DraftConfig, dict[str, Path]]:
    """Validate, without reading any tensor, that ``folder`` holds a complete drafter: its config
    fields and every ``mtp.*`` tensor it needs. Returns the config and the tensor -> shard map."""
    folder = Path(folder)
    config = read_config(folder)
    files = tensor_files(folder)
    stored = stored_expert_dtype(files)
    if stored != config.expert_dtype and (stored == "fp4" or config.experts_fp4):
        config = V4DraftConfig({**config.raw, "expert_dtype": stored or "bf16"})  # the tensors decide
    stages = {int(m.group(1)) for n in files if (m := re.match(r"mtp\.(\d+)\.", n))}
    if not stages:
        raise V4CheckpointError(f"{folder} has no mtp.* tensors: this DeepSeek-V4 checkpoint ships no DSpark "
                                "drafter (or its index file does not list them)")
    present = {module_name(n) for n in files
               if n.startswith("mtp.") and not (n.endswith(".scale") and f"{n[:-6]}.weight" in files)}
    expected = _drafter_params(config)
    missing = sorted(expected - present)
    if config.enable_confidence_head and any(m.startswith("confidence_head.") for m in missing):
        raise V4CheckpointError(f"{folder}: enable_confidence_head is true but mtp.*.confidence_head.proj.weight "
                                "is missing; set enable_confidence_head: false in config.json to draft without it")
    if missing:
        shown = [checkpoint_name(m, max(stages)) for m in missing[:5]]
        raise V4CheckpointError(f"{folder}: the DSpark drafter needs {len(missing)} tensors that are missing, "
                                f"e.g. {shown}")
    return config, files


def load_v4_drafter(folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    bind_embeddings: bool = True) -> DSparkV4Drafter:
    """Build the drafter of the DeepSeek-V4 target in ``folder`` from its ``mtp.*`` tensors; with
    ``bind_embeddings`` also read the target's embedding and LM head (else bind them later, e.g.
    from the served target model).

    Bounded memory: the drafter is built on the meta device, cast there, and allocated on
    ``device`` in its final dtypes (``dtype``; MXFP4 experts as packed bytes; the float32
    parameters of :data:`~dspark_vllm.v4.drafter.FLOAT32_PARAMS` in float32). Tensors are then
    read one at a time, FP8 ones dequantised one at a time, and copied into place: host memory
    holds one checkpoint tensor at a time, never the drafter.
    """
    folder = Path(folder)
    config, files = check_v4_checkpoint(folder)
    with torch.device("meta"):
        drafter = DSparkV4Drafter(config)
    drafter.to(dtype or torch.float32)
    for name, child in drafter.named_children():
        if name not in ("embed_tokens", "lm_head"):  # the target's: bound below or by the engine
            child.to_empty(device=device)
    drafter.rotary_emb.reset()
    reader = ShardReader(files)
    block = _fp8_block(config.raw)
    names = [n for n in files if module_name(n) is not None and int(n.split(".")[1]) < config.num_layers
             and not (n.endswith(".scale") and f"{n[:-6]}.weight" in files)]
    for name in names:
        _place(drafter, reader, name, block)
    unexpected = sorted({module_name(n) for n in names} - _drafter_params(config))
    if unexpected:
        raise V4CheckpointError(f"{folder}: mtp.* tensors the drafter does not know: {unexpected[:5]}")
    if bind_embeddings:
        embed = next((n for n in EMBED_NAMES if n in files), None)
        head = next((n for n in HEAD_NAMES if n in files), None)
        if embed is None or head is None:
            raise V4CheckpointError(f"{folder}: the target's embedding ({' or '.join(EMBED_NAMES)}) and LM head "
                                    f"({' or '.join(HEAD_NAMES)}) are needed by the drafter but not found")
        drafter.bind_target_embeddings(reader.get(embed), reader.get(head))
    return drafter.eval()


def _place(drafter: DSparkV4Drafter, reader: ShardReader, name: str, block: tuple[int, int]) -> None:
    """Read checkpoint tensor ``name`` (with its scale) and copy it into the drafter."""
    tensor = reader.get(name)
    scale_name = f"{name[:-7]}.scale"
    scale = reader.get(scale_name) if name.endswith(".weight") and scale_name in reader else None
    target = module_name(name)
    expert = EXPERT_TENSOR.fullmatch(target)
    if expert is not None:
        experts = drafter.get_submodule(expert.group(1))
        if not experts.fp4 and scale is not None:
            tensor, scale = dequantize_fp8(tensor, scale, block), None
        experts.store(expert.group(3), int(expert.group(2)), tensor, scale)
        return
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if scale is None:
            raise V4CheckpointError(f"FP8 tensor {name} has no {scale_name}")
        tensor = dequantize_fp8(tensor, scale, block)
    param = drafter.get_parameter(target)
    if tuple(param.shape) != tuple(tensor.shape):
        raise V4CheckpointError(f"{name} has shape {tuple(tensor.shape)} but the drafter expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor.to(param.device, param.dtype))


def read_stages(folder: str | Path) -> dict[str, torch.Tensor]:
    """The drafter's parameters stored as ``mtp.*`` in ``folder`` (unquantised, e.g. a training run)."""
    files = tensor_files(Path(folder))
    names = [n for n in files if module_name(n) is not None]
    return {module_name(n): t for n, t in read_tensors(files, names).items()}


def save_v4_drafter(drafter: DSparkV4Drafter, folder: str | Path, head_stage: int | None = None) -> Path:
    """Write the drafter's stages into ``folder`` as ``mtp.*`` tensors: one more shard, listed in
    the index file (created from the folder's shards if absent). A folder without a config.json
    (a training run) gets the target config the drafter was built from."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():
        (folder / "config.json").write_text(json.dumps(drafter.config.raw, indent=1))
    files = {name: path.name for name, path in tensor_files(folder).items() if not name.startswith("mtp.")}
    stage = drafter.config.num_layers - 1 if head_stage is None else head_stage
    tensors = {checkpoint_name(p, stage): t.detach().contiguous().cpu() for p, t in drafter.state_dict().items()
               if not p.startswith(("embed_tokens.", "lm_head."))}
    save_file(tensors, str(folder / MTP_SHARD))
    files.update((name, MTP_SHARD) for name in tensors)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(files.items()))}, indent=1))
    return folder / MTP_SHARD
