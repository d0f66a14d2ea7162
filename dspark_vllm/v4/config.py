"""The draft fields of a DeepSeek-V4 target config (the drafter has no config of its own).

The V4 drafter is described by the target's ``config.json``: the backbone sizes are the
target's, and the DSpark keys (``dspark_target_layer_ids``, ``dspark_markov_rank``,
``dspark_block_size``, ``dspark_noise_token_id``, ``n_mtp_layers``, ...) say how the shipped
``mtp.*`` stages draft. A missing key raises :class:`DSparkConfigError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..drafter_config import DSparkConfigError

V4_MODEL_TYPES = ("deepseek_v4",)
DEFAULT_MTP_LAYERS = 3  # DeepSeek-V4 ships three DSpark stages


def is_deepseek_v4_config(raw: dict[str, Any]) -> bool:
    """A DeepSeek-V4 target config (whose checkpoint may carry an in-checkpoint drafter)."""
    return raw.get("model_type") in V4_MODEL_TYPES or "DeepseekV4ForCausalLM" in (raw.get("architectures") or [])


def _get(raw: dict[str, Any], key: str, default: Any = None, required: bool = True) -> Any:
    if key in raw and raw[key] is not None:
        return raw[key]
    if required and default is None:
        raise DSparkConfigError(f"DeepSeek-V4 config is missing '{key}', which the in-checkpoint DSpark drafter "
                                "needs; is this a DeepSeek-V4 checkpoint with DSpark stages (mtp.*)?")
    return default


class _Field:
    """A config.json key read as ``kind`` (required when ``default`` is None), named on the class."""

    def __init__(self, kind: type, default: Any = None, key: str | None = None) -> None:
        self.kind, self.default, self.key = kind, default, key

    def __set_name__(self, owner, name: str) -> None:
        self.key = self.key or name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return self.kind(_get(obj.raw, self.key, self.default))


@dataclass(frozen=True)
class V4DraftConfig:
    """Typed view of the fields the V4 drafter reads (names as in the target's config.json)."""

    raw: dict[str, Any]

    def __post_init__(self) -> None:
        for name, field_ in vars(type(self)).items():  # every required key, named if missing
            if isinstance(field_, _Field):
                getattr(self, name)
        _get(self.raw, "dspark_target_layer_ids")
        if self.num_attention_heads % self.o_groups:
            raise DSparkConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of o_groups "
                                    f"{self.o_groups}")
        if not 0 < self.rope_head_dim <= self.head_dim or self.rope_head_dim % 2:
            raise DSparkConfigError(f"rope dims {self.rope_head_dim} must be even and within head_dim {self.head_dim}")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad:
            raise DSparkConfigError(f"dspark_target_layer_ids {self.target_layer_ids} holds {bad}, outside the "
                                    f"target's layers 0..{self.num_target_layers - 1}")

    # ---- what the generic drafter code reads (DSparkConfig's names) -------------------------
    family = "deepseek_v4"
    markov_head_type = "vanilla"
    confidence_head_with_markov = True
    final_logit_softcapping = None
    vocab_size = _Field(int)
    hidden_size = _Field(int)
    num_target_layers = _Field(int, key="num_hidden_layers")
    markov_rank = _Field(int, key="dspark_markov_rank")

    # ---- backbone sizes -------------------------------------------------------------------
    num_attention_heads = _Field(int)
    head_dim = _Field(int)
    q_lora_rank = _Field(int)
    o_groups = _Field(int)
    o_lora_rank = _Field(int)
    rms_norm_eps = _Field(float, 1e-6)
    hc_mult = _Field(int, 4)
    hc_eps = _Field(float, 1e-6)
    hc_sinkhorn_iters = _Field(int, 20)
    sliding_window = _Field(int, 128)
    n_routed_experts = _Field(int)
    num_experts_per_tok = _Field(int)
    moe_intermediate_size = _Field(int)
    routed_scaling_factor = _Field(float, 1.0)
    norm_topk_prob = _Field(bool, True)
    scoring_func = _Field(str, "sqrtsoftplus")

    @property
    def num_layers(self) -> int:
        return int(_get(self.raw, "n_mtp_layers", DEFAULT_MTP_LAYERS))

    @property
    def target_layer_ids(self) -> list[int]:
        return [int(i) for i in self.raw["dspark_target_layer_ids"]]

    @property
    def block_size(self) -> int:
        return int(_get(self.raw, "dspark_block_size"))

    @property
    def mask_token_id(self) -> int:
        """vLLM's precedence: ``dflash_config.mask_token_id``, ``mask_token_id``, then
        ``dspark_noise_token_id`` (the same token must fill the block whichever engine serves)."""
        for value in ((self.raw.get("dflash_config") or {}).get("mask_token_id"), self.raw.get("mask_token_id"),
                      self.raw.get("dspark_noise_token_id")):
            if value is not None:
                return int(value)
        raise DSparkConfigError("DeepSeek-V4 config is missing 'dspark_noise_token_id' (the block's MASK token)")

    @property
    def enable_confidence_head(self) -> bool:
        return bool(self.raw.get("enable_confidence_head", True))

    @property
    def draft_vocab_size(self) -> int:
        return int(self.raw.get("draft_vocab_size") or self.vocab_size)

    @property
    def rope_head_dim(self) -> int:
        """Trailing channels of each head that carry (interleaved) RoPE."""
        if self.raw.get("qk_rope_head_dim"):
            return int(self.raw["qk_rope_head_dim"])
        factor = self.raw.get("partial_rotary_factor")
        if factor is None:
            main = (self.raw.get("rope_parameters") or {}).get("main") or {}
            factor = main.get("partial_rotary_factor", 64 / 512)
        return int(self.head_dim * float(factor))

    @property
    def rope_theta(self) -> float:
        main = (self.raw.get("rope_parameters") or {}).get("main") or {}
        return float(main.get("rope_theta", self.raw.get("rope_theta", 10000.0)))

    @property
    def swiglu_limit(self) -> float | None:
        value = self.raw.get("swiglu_limit")
        return None if value is None else float(value)

    @property
    def expert_dtype(self) -> str | None:
        return self.raw.get("expert_dtype")

    @property
    def experts_fp4(self) -> bool:
        """Routed experts stored as MXFP4 (V4-Flash); the loader fills ``expert_dtype`` in from
        the checkpoint's tensors when config.json omits it."""
        return self.expert_dtype == "fp4"
