"""The drafter's ``config.json`` (DeepSpec format) as a typed view.

A DeepSpec drafter config is a copy of the target's (text) config with the drafter's own keys
added (see docs/architecture.md, *Checkpoints*). We keep the raw dict untouched so a checkpoint round-trips bit for bit, and
expose the fields the drafter needs as properties with DeepSpec's names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

HEAD_TYPES = ("vanilla", "gated", "rnn")
QWEN3_ARCH = "Qwen3DSparkModel"
GEMMA4_ARCH = "Gemma4DSparkModel"
SUPPORTED_ARCHS = (QWEN3_ARCH, GEMMA4_ARCH)


class DSparkConfigError(ValueError):
    """A drafter config.json is missing a key or holds an invalid value."""


def _require(raw: dict[str, Any], key: str) -> Any:
    if key not in raw:
        raise DSparkConfigError(
            f"DSpark config is missing required key '{key}'. A DeepSpec DSpark config.json must "
            f"define it (see docs: checkpoint format)."
        )
    return raw[key]


@dataclass
class DSparkConfig:
    """Typed access to a DeepSpec DSpark drafter config; ``raw`` is what config.json holds."""

    raw: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- identity -------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.raw.get("architectures") or [QWEN3_ARCH]
        return str(archs[0])

    @property
    def family(self) -> str:
        """'qwen3' or 'gemma4': which draft-layer flavour the backbone uses."""
        return "gemma4" if self.architecture == GEMMA4_ARCH else "qwen3"

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.raw["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.raw["num_hidden_layers"])

    @property
    def num_target_layers(self) -> int | None:
        value = self.raw.get("num_target_layers")
        return None if value is None else int(value)

    @property
    def block_size(self) -> int:
        return int(self.raw["block_size"])

    @property
    def target_layer_ids(self) -> list[int]:
        return [int(i) for i in self.raw["target_layer_ids"]]

    @property
    def mask_token_id(self) -> int:
        return int(self.raw["mask_token_id"])

    # ---- heads ----------------------------------------------------------------------------
    @property
    def markov_rank(self) -> int:
        return int(self.raw.get("markov_rank", 0) or 0)

    @property
    def markov_head_type(self) -> str | None:
        if self.markov_rank <= 0:
            return None
        return str(self.raw.get("markov_head_type", "vanilla"))

    @property
    def enable_confidence_head(self) -> bool:
        return bool(self.raw.get("enable_confidence_head", False))

    @property
    def confidence_head_with_markov(self) -> bool:
        return self.enable_confidence_head and bool(self.raw.get("confidence_head_with_markov", False))

    @property
    def final_logit_softcapping(self) -> float | None:
        value = self.raw.get("final_logit_softcapping")
        return None if value is None else float(value)

    def validate(self) -> None:
        """Check internal consistency; raise :class:`DSparkConfigError` naming the key."""
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "block_size",
                    "target_layer_ids", "mask_token_id"):
            _require(self.raw, key)
        if self.architecture not in SUPPORTED_ARCHS:
            raise DSparkConfigError(
                f"architectures[0] is '{self.architecture}', but dspark-vllm loads only "
                f"{', '.join(SUPPORTED_ARCHS)} drafters. Point the config at a DeepSpec DSpark checkpoint."
            )
        if self.block_size < 1:
            raise DSparkConfigError(f"block_size must be >= 1, got {self.block_size}.")
        if not self.target_layer_ids:
            raise DSparkConfigError("target_layer_ids is empty; the drafter needs at least one target layer.")
        if self.markov_rank > 0 and self.markov_head_type not in HEAD_TYPES:
            raise DSparkConfigError(
                f"markov_head_type is '{self.markov_head_type}'; supported: {', '.join(HEAD_TYPES)}."
            )
        if self.confidence_head_with_markov and self.markov_rank <= 0:
            raise DSparkConfigError(
                "confidence_head_with_markov is true but markov_rank is 0: the confidence head "
                "needs the Markov embedding W1. Set confidence_head_with_markov=false."
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DSparkConfigError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})."
            )

    def attention_dims(self) -> tuple[int, int, bool]:
        """(head_dim, num_kv_heads, k_eq_v) of the draft attention.

        Gemma4 drafters use the target's *global* (full-attention) geometry; with
        ``attention_k_eq_v`` the value projection is the key projection.
        """
        raw = self.raw
        heads = int(raw["num_attention_heads"])
        if self.family == "gemma4":
            k_eq_v = bool(raw.get("attention_k_eq_v", False))
            head_dim = int(_require(raw, "global_head_dim"))
            kv = raw["num_global_key_value_heads"] if k_eq_v else raw.get("num_key_value_heads", heads)
            return head_dim, int(kv), k_eq_v
        head_dim = int(raw.get("head_dim") or self.hidden_size // heads)
        return head_dim, int(raw.get("num_key_value_heads", heads)), False

    def copy(self) -> "DSparkConfig":
        return DSparkConfig(copy.deepcopy(self.raw))

    def backbone_hf_config(self) -> Any:
        """A transformers config object for the draft layers' building blocks (norms, MLP, RoPE)."""
        if self.family == "gemma4":
            from transformers import Gemma4TextConfig

            keys = {k: v for k, v in self.raw.items() if k not in _DRAFT_ONLY_KEYS}
            keys["layer_types"] = ["full_attention"] * self.num_layers
            # Gemma4TextMLP reads this against the *draft* layer count: with use_double_wide_mlp,
            # draft layers i >= num_layers - num_kv_shared_layers > 0 have twice the intermediate
            # size, as DeepSpec builds them from the same config.
            keys["num_kv_shared_layers"] = int(self.raw.get("num_kv_shared_layers") or 0)
            keys["global_head_dim"], _, _ = self.attention_dims()
            return Gemma4TextConfig(**keys)
        from transformers import Qwen3Config

        raw = self.raw
        rope = raw.get("rope_parameters") or {"rope_type": "default",
                                              "rope_theta": raw.get("rope_theta", 10000.0)}
        heads = int(raw["num_attention_heads"])
        return Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=self.num_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
            head_dim=int(raw.get("head_dim") or self.hidden_size // heads),
            hidden_act=raw.get("hidden_act", "silu"),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_parameters=dict(rope),
            attention_bias=bool(raw.get("attention_bias", False)),
        )


# Keys DeepSpec adds to the copied target config; not understood by the HF config classes.
_DRAFT_ONLY_KEYS = frozenset({
    "architectures", "block_size", "target_layer_ids", "num_target_layers", "mask_token_id",
    "num_anchors", "markov_rank", "markov_head_type", "enable_confidence_head",
    "confidence_head_with_markov", "target_model_type", "target_text_model_type",
    "_attn_implementation", "layer_types", "dspark_vllm", "per_layer_config",
    "num_global_key_value_heads", "global_head_dim", "num_kv_shared_layers",
})
